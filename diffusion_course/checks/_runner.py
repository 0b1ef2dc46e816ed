"""The shared runner of every checker: test cases, the comparison, the verdict. Lesson: 00_setup."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence

import torch


class ExerciseFailed(AssertionError):
    """The learner's function gave a wrong result on a checker's test case."""


@dataclass
class Case:
    """One test case: keyword arguments for the function and a short description. Lesson: 00_setup."""

    kwargs: Dict[str, Any]
    label: str


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if callable(v):
        return "a model"
    return repr(v)


def _compare(got: Any, want: torch.Tensor, rtol: float, atol: float) -> str:
    """'' when ``got`` matches ``want``, else a reason."""
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}, expected a torch.Tensor"
    if tuple(got.shape) != tuple(want.shape):
        return f"returned shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return "returned NaN or inf"
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.allclose(got64, want64, rtol=rtol, atol=atol):
        err = (got64 - want64).abs().max().item()
        return f"values differ from the reference (largest absolute error {err:.3g})"
    return ""


def run_check(exercise: str, learner: Callable, reference: Callable, cases: Sequence[Case], hint: str,
              rtol: float = 1e-5, atol: float = 1e-6, verbose: bool = True) -> Callable:
    """Run ``learner`` and ``reference`` on every case and give the verdict (see the module docstring).

    Returns the function the lesson should use from here on. The learner's global random state is the same
    afterwards, whatever the functions draw. Lesson: 00_setup.
    """
    with torch.random.fork_rng(devices=[]):
        return _run_cases(exercise, learner, reference, cases, hint, rtol, atol, verbose)


def _run_cases(exercise: str, learner: Callable, reference: Callable, cases: Sequence[Case], hint: str,
               rtol: float, atol: float, verbose: bool) -> Callable:
    for k, case in enumerate(cases):
        want = reference(**case.kwargs)
        try:
            got = learner(**case.kwargs)
        except NotImplementedError:
            if verbose:
                print(f"… Exercise {exercise}: not implemented yet. The lesson carries on with the package's "
                      f"reference implementation; come back to it when you are ready.")
            return reference
        except Exception as e:  # the learner's code crashed: say where, keep the traceback
            raise ExerciseFailed(f"✗ Exercise {exercise}: your function raised {type(e).__name__}: {e}\n"
                                 f"  on case {k + 1} ({case.label}).\n  Hint: {hint}") from e
        reason = _compare(got, want, rtol, atol)
        if reason:
            args = ", ".join(f"{n}={_describe(v)}" for n, v in case.kwargs.items())
            raise ExerciseFailed(f"✗ Exercise {exercise}: {reason}\n  on case {k + 1} ({case.label}; {args}).\n"
                                 f"  Hint: {hint}\n  Fix it, or put the NotImplementedError stub back to skip.")
    if verbose:
        print(f"✓ Exercise {exercise}: correct on {len(cases)} seeded random cases.")
    return learner


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_betas(T: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return (torch.rand(T, generator=g, dtype=torch.float64) * 0.05 + 1e-4).sort().values


def _no_grad(fn: Callable, *args):
    """``fn(*args)`` without building a graph (for checkers of network layers)."""
    with torch.no_grad():
        return fn(*args)
