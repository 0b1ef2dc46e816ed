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
    return run_check("1.1", fn, ref_compute_alpha_bar, cases,
                     "abar_t is the running product of alpha_s = 1 - beta_s (torch.cumprod), not of the betas, "
                     "and not alpha_t alone.")


def ref_cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule's betas, float64 ``(T,)``. Lesson: 01_forward_process."""
    return _cosine_betas(T, s, max_beta)


def check_cosine_betas(fn: Callable) -> Callable:
    """Exercise 1.2: the cosine schedule. Lesson: 01_forward_process."""
    cases = [Case({"T": T, "s": s, "max_beta": 0.999}, f"T={T}, s={s}") for T, s in ((1000, 0.008), (50, 0.008), (200, 0.02))]
    return run_check("1.2", fn, ref_cosine_betas, cases,
                     "g(t) = cos(((t/T + s)/(1 + s)) * pi/2) ** 2, abar(t) = g(t)/g(0), beta_t = 1 - abar(t)/abar(t-1) "
                     "for t = 1..T (torch.arange(1, T + 1)), then clamp at max_beta. Work in float64.")


def ref_q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with ``t`` array indices ``(B,)``. Lesson: 01_forward_process."""
    ab = alpha_bar[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def check_q_sample(fn: Callable) -> Callable:
    """Exercise 1.3: the closed form q(x_t | x_0). Lesson: 01_forward_process."""
    cases = []
    for seed, shape in ((0, (4, 1, 8, 8)), (1, (16, 2)), (2, (3, 3, 5, 5))):
        g = _gen(seed)
        T = 100
        ab = torch.cumprod(1 - _random_betas(T, seed), 0)
        cases.append(Case({"x0": torch.randn(shape, generator=g), "t": torch.randint(0, T, (shape[0],), generator=g),
                           "noise": torch.randn(shape, generator=g), "alpha_bar": ab}, f"batch of shape {shape}"))
    return run_check("1.3", fn, ref_q_sample, cases,
                     "index alpha_bar with t (array indices, no -1), reshape to (B, 1, ...) so it broadcasts, and use "
                     "square roots: sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise.")


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("1.1", check_compute_alpha_bar, ref_compute_alpha_bar),
    ("1.2", check_cosine_betas, ref_cosine_betas),
    ("1.3", check_q_sample, ref_q_sample),
]
