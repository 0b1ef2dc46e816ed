"""Help in tiers: a first failure nudges, the second gives the full hint; show_hint, show_solution and
set_hints give more on request; every checker has a nudge of its own and never reseeds a device's generator."""
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest
import torch

from diffusion_course import checks
from diffusion_course.checks import ExerciseFailed, _runner

ROOT = Path(__file__).resolve().parents[1]


def wrong_alpha_bar(betas):
    return 1 - betas  # alpha_t, not abar_t


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise: stub")


@pytest.fixture(autouse=True)
def fresh_hints(monkeypatch):
    monkeypatch.delenv(_runner.HINTS_ENV, raising=False)
    checks.reset_hints()
    yield
    checks.reset_hints()


def _every_checker():
    """(module name, checker name, checker) of every check_* function defined in a lesson module."""
    found = []
    for info in pkgutil.iter_modules(checks.__path__):
        if not info.name.startswith("lesson"):
            continue
        module = importlib.import_module(f"diffusion_course.checks.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("check_") and inspect.isfunction(obj) and obj.__module__ == module.__name__:
                found.append((info.name, name, obj))
    return found


def _run_on_stubs(checker):
    """Call a checker with a stub for each function or class it checks."""
    n = sum(p.default is inspect.Parameter.empty for p in inspect.signature(checker).parameters.values())
    return checker(*[stub] * n)


def _exercise_of(checker):
    m = re.match(r"Exercise (\d+\.\d+)", checker.__doc__ or "")
    assert m, f"{checker.__name__}'s docstring must start with 'Exercise N.k'"
    return m.group(1)


def test_a_first_failure_nudges_and_a_second_gives_the_full_hint():
    with pytest.raises(ExerciseFailed) as first:
        checks.check_compute_alpha_bar(wrong_alpha_bar)
    text = str(first.value)
    hint, nudge = _runner._registry["1.1"]
    assert first.value.tier == "nudge" and first.value.exercise == "1.1"
    assert "on case 1 (T=10 random betas; betas=tensor(10,) float64)" in text
    assert f"Nudge: {nudge}" in text and hint not in text and "Hint:" not in text
    assert 'checks.show_hint("1.1")' in text and "second failure" in text
    with pytest.raises(ExerciseFailed) as second:
        checks.check_compute_alpha_bar(wrong_alpha_bar)
    assert second.value.tier == "hint" and f"Hint: {hint}" in str(second.value) and "Nudge:" not in str(second.value)
    assert 'checks.show_solution("1.1")' in str(second.value)


def test_a_crash_is_tiered_too():
    for tier in ("nudge", "hint"):
        with pytest.raises(ExerciseFailed, match="raised ZeroDivisionError") as failed:
            checks.check_compute_alpha_bar(lambda betas: 1 / 0)
        assert failed.value.tier == tier


def test_tiers_are_counted_per_exercise():
    with pytest.raises(ExerciseFailed):
        checks.check_compute_alpha_bar(wrong_alpha_bar)
    with pytest.raises(ExerciseFailed) as other:  # another exercise starts at the nudge
        checks.check_cosine_betas(lambda T, s=0.008, max_beta=0.999: torch.zeros(T, dtype=torch.float64))
    assert other.value.tier == "nudge"


def test_success_and_stub_messages_are_unchanged(capsys):
    assert checks.check_compute_alpha_bar(checks.ref_compute_alpha_bar) is checks.ref_compute_alpha_bar
    assert checks.check_compute_alpha_bar(stub) is checks.ref_compute_alpha_bar
    out = capsys.readouterr().out
    assert "✓ Exercise 1.1: correct on 3 seeded random cases." in out
    assert "… Exercise 1.1: not implemented yet. The lesson carries on with the package's reference" in out


def test_show_hint_before_and_after_a_check(capsys):
    checks.show_hint("1.2")
    before = capsys.readouterr().out
    assert "not been checked yet" in before and "checks.check_cosine_betas" in before
    checks.check_cosine_betas(stub)  # a stub run is enough: the hint is known from then on
    capsys.readouterr()
    checks.show_hint("1.2")
    after = " ".join(capsys.readouterr().out.split())
    assert "Exercise 1.2, the full hint:" in after and "clamp at max_beta" in after


def test_show_hint_lists_both_halves_of_a_two_function_exercise(capsys):
    checks.check_latent_codec(stub, stub)
    capsys.readouterr()
    checks.show_hint("8.1")
    out = capsys.readouterr().out
    assert "Exercise 8.1 (encode_to_latent), the full hint" in out and "Exercise 8.1 (decode_from_latent)" in out


def test_set_hints_full_and_the_environment_variable(monkeypatch):
    checks.set_hints("full")
    with pytest.raises(ExerciseFailed, match="Hint: abar_t is the running product") as failed:
        checks.check_compute_alpha_bar(wrong_alpha_bar)
    assert failed.value.tier == "hint"
    checks.reset_hints()
    monkeypatch.setenv(_runner.HINTS_ENV, "full")
    with pytest.raises(ExerciseFailed, match="Hint: "):
        checks.check_compute_alpha_bar(wrong_alpha_bar)
    checks.set_hints("tiered")  # the call wins over the environment
    with pytest.raises(ExerciseFailed) as tiered:
        checks.check_cosine_betas(lambda T, s=0.008, max_beta=0.999: torch.zeros(T, dtype=torch.float64))
    assert tiered.value.tier == "nudge"
    with pytest.raises(ValueError, match="'tiered' or 'full'"):
        checks.set_hints("loud")


def test_fail_raises_with_the_same_tiers():
    for tier in ("nudge", "hint"):
        with pytest.raises(ExerciseFailed) as failed:
            checks.fail("9.9", "it returned a list", "case 2 (an empty path)", nudge="think about it",
                        hint="return a dict", detail="Your result is what one gets when nothing is kept.")
        text = str(failed.value)
        assert failed.value.tier == tier
        assert "✗ Exercise 9.9: it returned a list\n  on case 2 (an empty path)." in text
        assert "nothing is kept" in text
        assert ("Nudge: think about it" in text) == (tier == "nudge")
        assert ("Hint: return a dict" in text) == (tier == "hint")


def test_a_case_rejected_by_a_wrapper_fails_that_case_with_its_reason():
    def wrapped(**kw):
        raise checks.CaseRejected("the loss carries no gradient")
    cases = [checks.Case({"x": torch.zeros(2)}, "two zeros")]
    reason = "(?s)Exercise 0.1: the loss carries no gradient\n  on case 1 \\(two zeros"
    with pytest.raises(ExerciseFailed, match=reason):
        checks.run_check("0.1", wrapped, lambda x: x, cases, "the hint", nudge="the nudge")


def test_without_a_nudge_the_message_says_something_plain():
    cases = [checks.Case({"x": torch.zeros(2)}, "two zeros")]
    with pytest.raises(ExerciseFailed, match=f"Nudge: {re.escape(_runner.GENERIC_NUDGE)}"):
        checks.run_check("0.2", lambda x: x + 1, lambda x: x, cases, "the hint")


def _solution_lines(number):
    """The lines between the markers of exercise ``number``'s cell, read straight from the notebook."""
    lesson = number.split(".")[0].zfill(2)
    (path,) = (ROOT / "notebooks" / "solutions").glob(f"{lesson}_*.ipynb")
    for cell in json.loads(path.read_text())["cells"]:
        src = "".join(cell["source"])
        if f"# Exercise {number}:" in src and "### BEGIN SOLUTION" in src:
            inside = src.split("### BEGIN SOLUTION", 1)[1].split("### END SOLUTION", 1)[0]
            return [ln.strip() for ln in inside.splitlines()[1:] if ln.strip()]
    raise AssertionError(f"no solution cell for {number}")


@pytest.mark.parametrize("number", ["3.1", "1.3"])
def test_show_solution_prints_the_worked_solution_from_the_notebook(number, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found next to the package, wherever the learner's kernel runs
    checks.show_solution(number)
    out = capsys.readouterr().out
    assert f"Exercise {number}, the worked solution" in out and "### BEGIN SOLUTION" not in out
    lines = _solution_lines(number)
    assert lines and all(line in out for line in lines)


def test_show_solution_says_where_the_solution_lives_without_a_checkout(capsys, monkeypatch):
    monkeypatch.setattr(_runner, "_solutions_folder", lambda: None)
    checks.show_solution("3.1")
    out = capsys.readouterr().out
    assert "notebooks/solutions/03_*.ipynb" in out and "def " not in out


def test_every_checker_has_a_nudge_of_its_own(capsys):
    """Run every checker of the package on stubs: each must register its hint with a nudge written for it."""
    missing = []
    for module, name, checker in _every_checker():
        checks.reset_hints()
        _run_on_stubs(checker)
        number = _exercise_of(checker)
        entries = {label: h for label, h in _runner._registry.items() if _runner._number(label) == number}
        if not entries:
            missing.append(f"{module}.{name} (its hint is not registered when it runs on a stub)")
        missing += [f"{module}.{name} ({label})" for label, (_, nudge) in entries.items() if not nudge]
    capsys.readouterr()
    assert len(_every_checker()) >= 25
    assert not missing, "checkers without a nudge of their own: " + ", ".join(missing)


LESSONS = sorted({module for module, _, _ in _every_checker()})


@pytest.mark.parametrize("lesson", LESSONS)
def test_no_checker_reseeds_a_device_generator(lesson, monkeypatch, capsys):
    """torch.manual_seed also reseeds every CUDA and MPS generator, which the CPU fork of run_check cannot give
    back: on a GPU a checker would change the learner's random numbers there. Checkers seed the CPU alone."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("cuda", seed)))
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: calls.append(("mps", seed)))
    offenders = []
    for module, name, checker in _every_checker():
        if module != lesson:
            continue
        before = len(calls)
        _run_on_stubs(checker)
        if len(calls) > before:
            offenders.append(name)
    capsys.readouterr()
    assert not offenders, f"these checkers call torch.manual_seed (seed with _runner._seeded instead): {offenders}"
