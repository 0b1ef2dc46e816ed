"""Checkers of lesson 02_elbo_to_simple_loss: the ELBO and L_simple."""
from __future__ import annotations

from typing import Callable, List, Tuple
import torch

from ..ddpm import GaussianDiffusion, normal_kl
from ._runner import Case, _gen, _random_betas, run_check


def ref_posterior_variance(betas: torch.Tensor) -> torch.Tensor:
    """beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t with abar_0 = 1. Lesson: 02_elbo_to_simple_loss."""
    return GaussianDiffusion(betas).beta_tilde


def check_posterior_variance(fn: Callable) -> Callable:
    """Exercise 2.1: the posterior variance beta_tilde_t. Lesson: 02_elbo_to_simple_loss."""
    cases = [Case({"betas": _random_betas(T, seed)}, f"T={T} random betas") for T, seed in ((10, 3), (1000, 4))]
    return run_check("2.1", fn, ref_posterior_variance, cases,
                     "abar_{t-1} for t = 1 is abar_0 = 1: prepend a one to alpha_bar[:-1] "
                     "(torch.cat). beta_tilde_1 is then exactly 0, and beta_tilde_t < beta_t.")


def ref_gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
                    logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise. Lesson: 02_elbo_to_simple_loss."""
    return normal_kl(mean1, logvar1, mean2, logvar2)


def check_gaussian_kl(fn: Callable) -> Callable:
    """Exercise 2.2: the KL divergence between two Gaussians. Lesson: 02_elbo_to_simple_loss."""
    cases = []
    for seed, shape in ((5, (6,)), (6, (2, 3, 4)), (7, (100,))):
        g = _gen(seed)
        cases.append(Case({"mean1": torch.randn(shape, generator=g), "logvar1": torch.randn(shape, generator=g),
                           "mean2": torch.randn(shape, generator=g), "logvar2": torch.randn(shape, generator=g)},
                          f"shape {shape}"))
    return run_check("2.2", fn, ref_gaussian_kl, cases,
                     "KL = 0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)**2 * exp(-logvar2) - 1). "
                     "KL is not symmetric: the second Gaussian is the one in the denominator.")


def ref_posterior_mean(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """mu_tilde_t(x_t, x_0) with ``t`` array indices ``(B,)``. Lesson: 02_elbo_to_simple_loss."""
    return GaussianDiffusion(betas).q_posterior_mean_variance(x0, xt, t)[0]


def check_posterior_mean(fn: Callable) -> Callable:
    """Exercise 2.3: the posterior mean mu_tilde_t. Lesson: 02_elbo_to_simple_loss."""
    cases = []
    for seed, shape in ((8, (5, 1, 4, 4)), (9, (32, 2))):
        g = _gen(seed)
        T = 50
        cases.append(Case({"x0": torch.randn(shape, generator=g), "xt": torch.randn(shape, generator=g),
                           "t": torch.randint(0, T, (shape[0],), generator=g), "betas": _random_betas(T, seed)},
                          f"batch of shape {shape}"))
    return run_check("2.3", fn, ref_posterior_mean, cases,
                     "mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) * x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) * xt; "
                     "x0 takes sqrt(abar_{t-1}), xt takes sqrt(alpha_t), and abar_0 = 1.", rtol=1e-5, atol=1e-5)


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("2.1", check_posterior_variance, ref_posterior_variance),
    ("2.2", check_gaussian_kl, ref_gaussian_kl),
    ("2.3", check_posterior_mean, ref_posterior_mean),
]
