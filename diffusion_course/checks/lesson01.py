"""Checkers of lesson 01_forward_process: the forward process."""
from __future__ import annotations

from typing import Callable, List, Tuple
import torch

from ..schedules import cosine_betas as _cosine_betas
from ._runner import Case, _gen, _random_betas, run_check


def ref_compute_alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s=1}^t (1 - beta_s), shape ``(T,)``. Lesson: 01_forward_process."""
    return torch.cumprod(1.0 - betas, dim=0)


def check_compute_alpha_bar(fn: Callable) -> Callable:
    """Exercise 1.1: abar_t from the betas. Lesson: 01_forward_process."""
    cases = [Case({"betas": _random_betas(T, seed)}, f"T={T} random betas") for T, seed in ((10, 0), (1000, 1), (1, 2))]
    # float64 at the lesson's own tolerance: the next cell asserts rtol=1e-12 against the package's Schedule
    return run_check("1.1", fn, ref_compute_alpha_bar, cases,
                     "abar_t is the running product of alpha_s = 1 - beta_s (torch.cumprod), not of the betas, "
                     "and not alpha_t alone. Keep the float64 dtype of betas.",
                     rtol=1e-12, atol=0.0, check_dtype=True,
                     nudge="abar_t is what is left of the signal after every step from 1 to t, so each entry builds "
                           "on the one before it; look at what one step keeps of the signal (not what it adds), "
                           "and keep the float64 of the betas.")


def ref_cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule's betas, float64 ``(T,)``. Lesson: 01_forward_process."""
    return _cosine_betas(T, s, max_beta)


def check_cosine_betas(fn: Callable) -> Callable:
    """Exercise 1.2: the cosine schedule. Lesson: 01_forward_process."""
    cases = [Case({"T": T, "s": s, "max_beta": m}, f"T={T}, s={s}, max_beta={m}")
             for T, s, m in ((1000, 0.008, 0.999), (50, 0.008, 0.2), (200, 0.02, 0.999))]
    cases.append(Case({"T": 100, "s": 0.0}, "T=100, s=0 and the default max_beta (the lesson calls it so)"))
    # float64 at 1e-10: an equally correct order of operations moves the smallest betas by a few 1e-12
    return run_check("1.2", fn, ref_cosine_betas, cases,
                     "g(t) = cos(((t/T + s)/(1 + s)) * pi/2) ** 2, abar(t) = g(t)/g(0), beta_t = 1 - abar(t)/abar(t-1) "
                     "for t = 1..T (torch.arange(1, T + 1)), then clamp at max_beta. Work in float64.",
                     rtol=1e-10, atol=0.0, check_dtype=True,
                     nudge="each beta_t is the share of the signal that step t loses, read off the curve g at the "
                           "lecture times t and t - 1; check where T and s enter g, that t runs over 1..T, that "
                           "the clip comes last, and that everything stays in float64.")


def ref_q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with ``t`` array indices ``(B,)``, in the dtype of ``x0``;
    the square roots are taken in the schedule's float64 before the cast, as the package's
    ``GaussianDiffusion.q_sample`` does. Lesson: 01_forward_process."""
    ab = alpha_bar[t].reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt().to(x0.dtype) * x0 + (1 - ab).sqrt().to(x0.dtype) * noise


def check_q_sample(fn: Callable) -> Callable:
    """Exercise 1.3: the closed form q(x_t | x_0). Lesson: 01_forward_process."""
    cases = []
    for seed, shape, dtype in ((0, (4, 1, 8, 8), torch.float32), (1, (16, 2), torch.float32),
                               (2, (3, 3, 5, 5), torch.float32), (3, (5, 2, 4), torch.float64)):
        g = _gen(seed)
        T = 100
        ab = torch.cumprod(1 - _random_betas(T, seed), 0)
        t = torch.randint(0, T, (shape[0],), generator=g)
        if seed == 1:  # the first step of a gentle schedule: abar_t close to 1, where float32 loses the most
            gentle = torch.cat([torch.tensor([4e-5], dtype=torch.float64), _random_betas(T - 1, seed)])
            ab = torch.cumprod(1 - gentle, 0)
            t[:4] = 0
        cases.append(Case({"x0": torch.randn(shape, generator=g, dtype=dtype), "t": t,
                           "noise": torch.randn(shape, generator=g, dtype=dtype), "alpha_bar": ab},
                          f"batch of shape {shape}, {str(dtype).replace('torch.', '')}"
                          + (", some t = 0 with abar_t close to 1" if seed == 1 else ""),
                          **({"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {})))
    # float32 tolerance: casting abar_t to float32 before the square root (as the hint says) costs up to about
    # 1e-5 where abar_t is close to 1; the cell after the next one asserts the same tolerance
    return run_check("1.3", fn, ref_q_sample, cases,
                     "index alpha_bar with t (array indices, no -1), reshape to (B, 1, ...) so it broadcasts, cast it "
                     "to x0.dtype, and use square roots: sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise.",
                     rtol=1e-5, atol=2e-5, check_dtype=True,
                     nudge="each example has its own step, so pick its abar with t (array indices, already 0-based) "
                           "and shape it to broadcast over the example's other axes; signal and noise are scaled "
                           "by standard deviations, and the result keeps the dtype of x0.")


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("1.1", check_compute_alpha_bar, ref_compute_alpha_bar),
    ("1.2", check_cosine_betas, ref_cosine_betas),
    ("1.3", check_q_sample, ref_q_sample),
]
