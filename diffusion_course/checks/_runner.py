"""The shared runner of every checker: test cases, the comparison, the verdict, and help in tiers.

A checker runs the learner's function and the package's reference on seeded random cases. Its verdict:
correct (it says so and returns the learner's function), not implemented yet (it says so and returns the
reference), or wrong: it raises :class:`ExerciseFailed`, and the help in that message comes in tiers. The first
failure of an exercise in this Python session names the failing case and gives a *nudge* (the idea, not the
formula); from the second failure on, the message carries the full *hint*. ``show_hint("N.k")`` prints the full
hint at any time after the checker has run once, ``show_solution("N.k")`` the worked solution, and
``set_hints("full")`` (or the environment variable ``DIFFUSION_COURSE_HINTS=full``) always shows the full hint.
Lesson: 00_setup.
"""
from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..exercises import BEGIN, END, EXERCISE_RE, _source

HINTS_ENV = "DIFFUSION_COURSE_HINTS"
GENERIC_NUDGE = ("compare your function with the formula in the exercise's text and with the shapes its "
                 "docstring gives, one term at a time.")

_failures: Dict[str, int] = {}                         # exercise -> failures so far in this session
_registry: Dict[str, Tuple[str, Optional[str]]] = {}   # exercise -> (hint, nudge), filled when its checker runs
_mode: Optional[str] = None                            # set_hints(); None: the environment variable decides


class ExerciseFailed(AssertionError):
    """The learner's function gave a wrong result on a checker's test case.

    ``exercise``, ``reason`` and ``case_label`` say what failed; ``tier`` is ``"nudge"`` on a first failure and
    ``"hint"`` once the full hint is shown.
    """

    exercise: str = ""
    reason: str = ""
    case_label: str = ""
    tier: str = ""


class CaseRejected(Exception):
    """Raised by a checker's wrapper around the learner's function when a case fails for a reason the value
    comparison cannot see (no gradient, a condition that never reaches the network, wrongly named parts);
    :func:`run_check` turns it into a failure of that case. Lesson: 00_setup."""


@dataclass
class Case:
    """One test case: keyword arguments for the function and a short description; ``rtol`` and ``atol``, when
    given, replace the checker's tolerances for this case (e.g. 0 where a later cell asserts exact equality).
    Lesson: 00_setup."""

    kwargs: Dict[str, Any]
    label: str
    rtol: Optional[float] = None
    atol: Optional[float] = None


# -- tiers of help ----------------------------------------------------------------------------------------------

def set_hints(mode: str) -> None:
    """``"full"``: every failure shows the full hint at once; ``"tiered"`` (the default): a nudge first, the
    full hint from the second failure of the same exercise on. Overrides ``DIFFUSION_COURSE_HINTS``.
    Lesson: 00_setup."""
    global _mode
    if mode not in ("tiered", "full"):
        raise ValueError(f"set_hints takes 'tiered' or 'full', got {mode!r}")
    _mode = mode


def reset_hints() -> None:
    """Forget every failure, every registered hint and any ``set_hints`` choice (for tests). Lesson: 00_setup."""
    global _mode
    _failures.clear()
    _registry.clear()
    _mode = None


def _full_hints() -> bool:
    mode = _mode if _mode is not None else os.environ.get(HINTS_ENV, "tiered")
    return mode.strip().lower() == "full"


def _number(exercise: str) -> str:
    """'8.1' of '8.1 (encode_to_latent)'."""
    m = re.match(r"\s*(\d+\.\d+)", exercise)
    return m.group(1) if m else exercise.strip()


def register_hint(exercise: str, hint: str, nudge: Optional[str] = None) -> None:
    """Make ``show_hint(exercise)`` know this hint. :func:`run_check` and :func:`fail` do it themselves; a checker
    with a path of its own that can end before either (e.g. its own "not implemented yet") calls this first.
    Lesson: 00_setup."""
    _registry[exercise] = (hint, nudge)


_register = register_hint


def _failure(exercise: str, reason: str, case_label: str, nudge: Optional[str], hint: str,
             detail: str = "") -> ExerciseFailed:
    """Count a failure of ``exercise`` and build its message, with the nudge or the full hint."""
    if hint or nudge or exercise not in _registry:
        _register(exercise, hint, nudge)
    else:  # a bare fail() uses what its checker registered
        hint, nudge = _registry[exercise]
    _failures[exercise] = count = _failures.get(exercise, 0) + 1
    number = _number(exercise)
    lines = [f"✗ Exercise {exercise}: {reason}", f"  on {case_label}."]
    if detail:
        lines.append(f"  {detail}")
    full = bool(hint) and (count >= 2 or _full_hints())
    if full:
        lines += [f"  Hint: {hint}",
                  f"  Still stuck? checks.show_solution(\"{number}\") prints the worked solution."]
    else:
        lines.append(f"  Nudge: {nudge or GENERIC_NUDGE}")
        if hint:
            lines.append(f"  More help: fix it and run the cell again (a second failure shows the full hint), "
                         f"or call checks.show_hint(\"{number}\") now.")
    lines.append("  Fix it, or put the NotImplementedError stub back to skip.")
    err = ExerciseFailed("\n".join(lines))
    err.exercise, err.reason, err.case_label, err.tier = exercise, reason, case_label, "hint" if full else "nudge"
    return err


def fail(exercise: str, reason: str, case_label: str, nudge: Optional[str] = None, hint: str = "",
         detail: str = "") -> None:
    """Raise :class:`ExerciseFailed` for ``exercise`` on the case ``case_label`` (e.g. ``"case 2 (t = 0)"``),
    with the same tiers as :func:`run_check`: the nudge on the first failure, the full hint from the second on.
    ``detail`` is an extra line (e.g. which common mistake the result matches). Lesson: 00_setup."""
    raise _failure(exercise, reason, case_label, nudge, hint, detail)


def _checker_name(number: str) -> str:
    """The checker of exercise ``number``, found by its docstring in the lesson's module if it is loaded."""
    try:
        module = sys.modules.get(f"{__package__}.lesson{int(number.split('.')[0]):02d}")
    except ValueError:
        module = None
    for name, obj in vars(module).items() if module else ():
        if name.startswith("check_") and re.match(rf"Exercise {re.escape(number)}\b", getattr(obj, "__doc__", "") or ""):
            return f"checks.{name}"
    return "the checker in the cell after the exercise"


def show_hint(exercise: str) -> None:
    """Print the full hint of ``exercise`` (e.g. ``"1.2"``); it is known once that exercise's checker has run
    in this session. Lesson: 00_setup."""
    number = _number(exercise)
    found = {label: h for label, h in _registry.items() if label == exercise or _number(label) == number}
    if not found:
        print(f"Exercise {number} has not been checked yet in this session, so its hint is not known yet: run its "
              f"checker first ({_checker_name(number)}, in the cell after the exercise), then call "
              f"checks.show_hint(\"{number}\") again.")
        return
    for label, (hint, _) in found.items():
        print(f"Exercise {label}, the full hint:")
        print(textwrap.fill(hint or "(this checker has no hint)", 100, initial_indent="  ", subsequent_indent="  "))


def _solutions_folder() -> Optional[Path]:
    """notebooks/solutions next to the package's checkout, or above the current directory."""
    here = Path.cwd().resolve()
    for root in (Path(__file__).resolve().parents[2], here, *here.parents):
        folder = root / "notebooks" / "solutions"
        if folder.is_dir():
            return folder
    return None


def _repository_hint() -> str:
    try:
        from importlib.metadata import metadata

        for entry in metadata("diffusion-course").get_all("Project-URL") or []:
            name, _, url = entry.partition(",")
            if name.strip().lower() == "repository":
                return f" ({url.strip()})"
    except Exception:  # not installed as a distribution: say less
        pass
    return ""


def show_solution(exercise: str) -> None:
    """Print the worked solution of ``exercise`` (e.g. ``"3.1"``): its cell in the solution notebook, read from
    the repository's ``notebooks/solutions`` when it can be found, else where that notebook lives.
    Lesson: 00_setup."""
    number = _number(exercise)
    lesson = f"{int(number.split('.')[0]):02d}" if re.fullmatch(r"\d+\.\d+", number) else "NN"
    folder = _solutions_folder()
    if folder is None:
        print(f"The solution notebooks are not next to this copy of the package. The worked solution of Exercise "
              f"{number} is in notebooks/solutions/{lesson}_*.ipynb of the course repository{_repository_hint()}.")
        return
    for path in sorted(folder.glob(f"{lesson}_*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = _source(cell)
            label = EXERCISE_RE.search(source)
            if cell.get("cell_type") == "code" and label and label.group(1) == number and BEGIN in source:
                code = "\n".join(ln for ln in source.splitlines() if BEGIN not in ln and END not in ln)
                print(f"Exercise {number}, the worked solution (from {path}):\n\n{code}")
                return
    print(f"No solution of Exercise {number} in {folder}: the exercises are numbered as in the lessons' "
          f"'**Your job (Exercise N.k):**' paragraphs.")


# -- comparison and verdict ------------------------------------------------------------------------------------

def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if isinstance(v, dict):
        return f"a dict of {len(v)} entries"
    if isinstance(v, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in v):
        return f"a list of {len(v)} tensors" if len(v) > 4 else "[" + ", ".join(_describe(x) for x in v) + "]"
    if callable(v):
        return "a model"
    return repr(v)


def _compare(got: Any, want: torch.Tensor, rtol: float, atol: float, check_dtype: bool = False) -> str:
    """'' when ``got`` matches ``want``, else a reason."""
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}, expected a torch.Tensor"
    if tuple(got.shape) != tuple(want.shape):
        return f"returned shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if check_dtype and got.dtype != want.dtype:
        return (f"returned dtype {str(got.dtype).replace('torch.', '')}, expected "
                f"{str(want.dtype).replace('torch.', '')} (the docstring says which)")
    if not torch.isfinite(got).all():
        return "returned NaN or inf"
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.allclose(got64, want64, rtol=rtol, atol=atol):
        err = (got64 - want64).abs().max().item()
        return f"values differ from the reference (largest absolute error {err:.3g})"
    return ""


def run_check(exercise: str, learner: Callable, reference: Callable, cases: Sequence[Case], hint: str,
              rtol: float = 1e-5, atol: float = 1e-6, verbose: bool = True, nudge: Optional[str] = None,
              diagnose: Optional[Callable[[Dict[str, Any], Any], Optional[str]]] = None,
              check_dtype: bool = False) -> Callable:
    """Run ``learner`` and ``reference`` on every case and give the verdict (see the module docstring).

    ``hint`` is the full formula, ``nudge`` the one- or two-sentence pointer of a first failure.
    ``diagnose(kwargs, got)``, if given, may name the common mistake that a wrong result matches;
    ``check_dtype`` fails a result of the right values in the wrong dtype. Returns the function the lesson
    should use from here on. The learner's global random state is the same afterwards, whatever the
    functions draw. Lesson: 00_setup.
    """
    _register(exercise, hint, nudge)
    with _learners_rng_kept():
        return _run_cases(exercise, learner, reference, cases, hint, rtol, atol, verbose, nudge, diagnose,
                          check_dtype)


def _run_cases(exercise: str, learner: Callable, reference: Callable, cases: Sequence[Case], hint: str,
               rtol: float, atol: float, verbose: bool, nudge: Optional[str], diagnose: Optional[Callable],
               check_dtype: bool) -> Callable:
    for k, case in enumerate(cases):
        want = reference(**case.kwargs)
        args = ", ".join(f"{n}={_describe(v)}" for n, v in case.kwargs.items())
        where = f"case {k + 1} ({case.label}; {args})"
        try:
            got = learner(**case.kwargs)
        except NotImplementedError:
            if verbose:
                print(f"… Exercise {exercise}: not implemented yet. The lesson carries on with the package's "
                      f"reference implementation; come back to it when you are ready.")
            return reference
        except CaseRejected as e:
            raise _failure(exercise, str(e), where, nudge, hint) from e
        except Exception as e:  # the learner's code crashed: say where, keep the traceback
            raise _failure(exercise, f"your function raised {type(e).__name__}: {e}", where, nudge, hint) from e
        case_rtol = rtol if case.rtol is None else case.rtol
        case_atol = atol if case.atol is None else case.atol
        reason = _compare(got, want, case_rtol, case_atol, check_dtype)
        if reason:
            detail = diagnose(case.kwargs, got) if diagnose is not None else None
            raise _failure(exercise, reason, where, nudge, hint, detail or "")
    if verbose:
        print(f"✓ Exercise {exercise}: correct on {len(cases)} seeded random cases.")
    return learner


@contextmanager
def _learners_rng_kept() -> Iterator[None]:
    """Whatever runs inside draws from forks of the global generators: the CPU's, and CUDA's when the session
    has started CUDA (a learner's function may draw there)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        yield


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build seeded random networks from the global CPU generator, then give the learner's random state back.

    Unlike ``torch.manual_seed``, which also reseeds every CUDA (and MPS) generator that the CPU fork cannot
    restore, this seeds the CPU generator alone. Lesson: 00_setup."""
    with _learners_rng_kept():
        torch.default_generator.manual_seed(seed)
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_betas(T: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return (torch.rand(T, generator=g, dtype=torch.float64) * 0.05 + 1e-4).sort().values


def _no_grad(fn: Callable, *args):
    """``fn(*args)`` without building a graph (for checkers of network layers)."""
    with torch.no_grad():
        return fn(*args)
