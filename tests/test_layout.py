"""The package's floors (../shared/LAYOUT.md): a module imports only modules of its own floor or lower ones,
and no import, however indirect, comes back to where it started."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_course"

# floor of each top-level module or sub-package; a new module must be placed here
FLOORS = {
    1: ("utils", "data", "shapes", "viz", "checkpoint", "schedules", "distributed", "exercises"),
    2: ("ddpm", "nn", "denoisers", "classifier", "degradations"),
    3: ("vae", "autoencoder", "losses", "guidance", "attend", "conditions", "solvers", "score"),
    4: ("ldm", "stablesr", "pretrained"),
    5: ("training", "ae_training", "metrics", "sr_training", "costs"),
    6: ("train_cli", "__main__", "checks", "cli"),
}
FLOOR_OF = {name: floor for floor, names in FLOORS.items() for name in names}


def _modules():
    """{dotted name inside the package: path}, e.g. 'nn.unet', 'checks' (a package's __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = path
    return out


def _imports(name, path, modules):
    """The package modules that ``name`` imports (anywhere in the file, functions included)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(anchor + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("diffusion_course"):
                mod = node.module[len("diffusion_course"):].lstrip(".")
            else:
                continue
            targets = [mod] + [f"{mod}.{a.name}" if mod else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name[len("diffusion_course"):].lstrip(".") for a in node.names
                       if a.name.startswith("diffusion_course.")]
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_floor():
    missing = sorted({name.split(".")[0] for name in _modules()} - set(FLOOR_OF))
    assert not missing, f"place these modules on a floor in tests/test_layout.py (see LAYOUT.md): {missing}"


def test_no_module_imports_a_higher_floor():
    upward = []
    for name, targets in _graph().items():
        for target in targets:
            here, there = FLOOR_OF[name.split(".")[0]], FLOOR_OF[target.split(".")[0]]
            if there > here:
                upward.append(f"{name} (floor {here}) imports {target} (floor {there})")
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules (the __init__ re-exports them)
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The walk itself works: a planted cycle and a planted upward import are found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "utils.py").write_text("from .training import Trainer\n")
    (pkg / "training.py").write_text("from . import utils\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = _graph()
    assert graph["utils"] == {"training"} and graph["training"] == {"utils"}
    import pytest

    with pytest.raises(AssertionError, match="training"):
        test_no_module_imports_a_higher_floor()
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycles()
