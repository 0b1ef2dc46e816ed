"""Checkers of lesson 03_training_and_sampling: Algorithms 1 and 2, DDIM."""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch

from ..ddpm import GaussianDiffusion
from ._runner import Case, _gen, _random_betas, run_check
from .lesson01 import ref_q_sample


class _FixedEps(torch.nn.Module):
    """A deterministic stand-in for eps_theta used by the checkers: a fixed smooth function of (x, t)."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T = T

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (t.float() / self.T).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x) * (0.5 + scale) + 0.1 * scale


def ref_simple_loss(eps_model: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    alpha_bar: torch.Tensor) -> torch.Tensor:
    """|| eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2 averaged over all entries (a scalar).

    Lesson: 03_training_and_sampling.
    """
    xt = ref_q_sample(x0, t, noise, alpha_bar)
    return ((noise - eps_model(xt, t)) ** 2).mean()


def check_simple_loss(fn: Callable) -> Callable:
    """Exercise 3.1: the loss of Algorithm 1. Lesson: 03_training_and_sampling."""
    cases = []
    for seed, shape in ((10, (8, 2)), (11, (4, 1, 6, 6))):
        g = _gen(seed)
        T = 100
        cases.append(Case({"eps_model": _FixedEps(T), "x0": torch.randn(shape, generator=g),
                           "t": torch.randint(0, T, (shape[0],), generator=g), "noise": torch.randn(shape, generator=g),
                           "alpha_bar": torch.cumprod(1 - _random_betas(T, seed), 0)}, f"batch of shape {shape}"))
    return run_check("3.1", fn, ref_simple_loss, cases,
                     "noise x0 with the closed form (your q_sample), ask the model for eps at (x_t, t), and return the "
                     "mean squared difference to the true noise (a scalar tensor): the target is eps, not x0.")


def ref_sampling_step(eps_model: Callable, xt: torch.Tensor, t: int, z: torch.Tensor,
                      betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 2, line 4, with sigma_t^2 = beta_t and z ignored at index t = 0. Lesson: 03_training_and_sampling."""
    diffusion = GaussianDiffusion(betas)
    tt = torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device)
    mean = diffusion.mu_from_eps(xt, tt, eps_model(xt, tt))
    if t == 0:
        return mean
    return mean + math.sqrt(float(betas[t])) * z


def check_sampling_step(fn: Callable) -> Callable:
    """Exercise 3.2: one step of Algorithm 2. Lesson: 03_training_and_sampling."""
    cases = []
    T = 100
    for seed, t, shape in ((12, 57, (8, 2)), (13, 0, (8, 2)), (14, 99, (2, 1, 5, 5))):
        g = _gen(seed)
        cases.append(Case({"eps_model": _FixedEps(T), "xt": torch.randn(shape, generator=g), "t": t,
                           "z": torch.randn(shape, generator=g), "betas": _random_betas(T, seed)},
                          f"t index {t}, batch of shape {shape}"))
    return run_check("3.2", fn, ref_sampling_step, cases,
                     "x_{t-1} = 1/sqrt(alpha_t) * (x_t - (1 - alpha_t)/sqrt(1 - abar_t) * eps) + sigma_t z with "
                     "sigma_t = sqrt(beta_t): alpha_t (not abar_t) in front, and no noise at the last step (index 0).",
                     rtol=1e-5, atol=1e-5)


def ref_ddim_step(eps: torch.Tensor, xt: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float) -> torch.Tensor:
    """The deterministic DDIM update (eta = 0):
    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev) eps, x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

    Lesson: 03_training_and_sampling.
    """
    x0_pred = (xt - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(1 - alpha_bar_prev) * eps


def check_ddim_step(fn: Callable) -> Callable:
    """Exercise 3.3: the deterministic DDIM step. Lesson: 03_training_and_sampling."""
    cases = []
    for seed, ab, ab_prev in ((15, 0.3, 0.6), (16, 0.01, 0.2), (17, 0.9, 1.0)):
        g = _gen(seed)
        shape = (6, 2)
        cases.append(Case({"eps": torch.randn(shape, generator=g), "xt": torch.randn(shape, generator=g),
                           "alpha_bar_t": ab, "alpha_bar_prev": ab_prev}, f"abar_t={ab}, abar_prev={ab_prev}"))
    return run_check("3.3", fn, ref_ddim_step, cases,
                     "first recover x0_pred from (x_t, eps) with abar_t, then re-noise it to the earlier level with "
                     "abar_prev, reusing the same eps (no fresh noise when eta = 0).")


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("3.1", check_simple_loss, ref_simple_loss),
    ("3.2", check_sampling_step, ref_sampling_step),
    ("3.3", check_ddim_step, ref_ddim_step),
]
