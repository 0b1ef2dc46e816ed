"""Checkers of lesson 03_training_and_sampling: Algorithms 1 and 2, DDIM, a step of Langevin dynamics."""
from __future__ import annotations

import math
from typing import Callable, List, Tuple

import torch

from ..ddpm import GaussianDiffusion
from ._runner import Case, CaseRejected, _gen, _random_betas, run_check
from .lesson01 import ref_q_sample


class _FixedEps(torch.nn.Module):
    """A deterministic stand-in for eps_theta used by the checkers: a fixed smooth function of (x, t)."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T = T
        self.gain = torch.nn.Parameter(torch.ones(()))  # a parameter (of value 1) for the loss's gradient to reach

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (t.float() / self.T).reshape(-1, *([1] * (x.ndim - 1)))
        return self.gain * (torch.tanh(x) * (0.5 + scale) + 0.1 * scale)


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
    def learner(eps_model, **kw):  # the loss must carry the gradient to the network's parameters
        loss = fn(eps_model, **kw)
        if isinstance(loss, torch.Tensor):
            if not loss.requires_grad:
                raise CaseRejected("the loss carries no gradient to the network (was it detached, turned into a "
                                   "Python number, or computed under torch.no_grad()?): Algorithm 1 needs its gradient")
            (grad,) = torch.autograd.grad(loss.sum(), eps_model.gain, allow_unused=True)
            if grad is None:
                raise CaseRejected("the loss does not depend on the network's output")
            loss = loss.detach()
        return loss

    used = run_check("3.1", learner, lambda eps_model, **kw: ref_simple_loss(eps_model, **kw).detach(), cases,
                     "noise x0 with the closed form (your q_sample), ask the model for eps at (x_t, t), and return the "
                     "mean squared difference to the true noise (a scalar tensor): the target is eps, not x0.",
                     nudge="the network is shown the noised x_t (never the clean x_0) and asked for the noise that "
                           "made it; the loss averages the squared error over every entry.")
    return fn if used is learner else ref_simple_loss


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
                     rtol=1e-5, atol=1e-5,
                     nudge="line 4 mixes a one-step quantity and a cumulative one: check which alpha each coefficient "
                           "needs, and what line 3 says about z at the last step.")


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
                     "abar_prev, reusing the same eps (no fresh noise when eta = 0).",
                     nudge="go through the clean estimate: undo the closed form at the current level, then apply it "
                           "again at the earlier level with the same noise direction.")


class _MixtureScore(torch.nn.Module):
    """A score function for the Langevin checker that is not linear in x: the score of an equal mixture of two
    Gaussians N(+m, s^2 I) and N(-m, s^2 I), any shape."""

    def __init__(self, m: float, s: float) -> None:
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(2 * self.m * x.flatten(1).sum(1) / self.s ** 2).reshape(-1, *([1] * (x.ndim - 1)))
        return -(x - (2 * w - 1) * self.m) / self.s ** 2


class _GaussianScore(torch.nn.Module):
    """The score -(x - m) / s^2 of N(m, s^2 I)."""

    def __init__(self, m: torch.Tensor, s: float) -> None:
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x - self.m.to(x)) / self.s ** 2


def ref_langevin_step(score_fn: Callable, x: torch.Tensor, step_size: float, z: torch.Tensor) -> torch.Tensor:
    """One step of Langevin dynamics: x + (step / 2) score(x) + sqrt(step) z. Lesson: 03_training_and_sampling."""
    return x + 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * z


def check_langevin_step(fn: Callable) -> Callable:
    """Exercise 3.4: one step of Langevin dynamics. Lesson: 03_training_and_sampling."""
    cases = []
    for seed, shape, step, score in ((18, (8, 2), 0.1, _GaussianScore(torch.tensor([0.5, -1.0]), 0.7)),
                                     (19, (4, 1, 5, 5), 0.02, _MixtureScore(0.8, 0.5)),
                                     (20, (6, 2), 0.5, _MixtureScore(1.5, 0.3))):
        g = _gen(seed)
        cases.append(Case({"score_fn": score, "x": torch.randn(shape, generator=g), "step_size": step,
                           "z": torch.randn(shape, generator=g)}, f"step {step}, batch of shape {shape}"))
    return run_check("3.4", fn, ref_langevin_step, cases,
                     "x + (step_size / 2) * score_fn(x) + sqrt(step_size) * z: half the step on the score, the square "
                     "root of the step on the noise, and a plus sign (the score points uphill in density).",
                     nudge="Langevin dynamics climbs the log-density along the score and adds fresh noise; the drift "
                           "and the noise scale differently with the step (think of the variance the noise adds).")


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("3.1", check_simple_loss, ref_simple_loss),
    ("3.2", check_sampling_step, ref_sampling_step),
    ("3.3", check_ddim_step, ref_ddim_step),
    ("3.4", check_langevin_step, ref_langevin_step),
]
