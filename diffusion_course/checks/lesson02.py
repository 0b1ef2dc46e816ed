"""Checkers of lesson 02_elbo_to_simple_loss: the ELBO and L_simple.

The lesson checks every identity in float64 at tolerances down to 1e-10, so these checkers compare in float64
at those tolerances too (and check the dtype the docstrings promise)."""
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
    # atol = 0: entry 0 must be exactly 0, as the docstring says and the next cell asserts
    return run_check("2.1", fn, ref_posterior_variance, cases,
                     "abar_{t-1} for t = 1 is abar_0 = 1: prepend a one to alpha_bar[:-1] "
                     "(torch.cat). beta_tilde_1 is then exactly 0, and beta_tilde_t < beta_t. Stay in float64.",
                     rtol=1e-10, atol=0.0, check_dtype=True,
                     nudge="beta-tilde_t needs abar_{t-1} next to abar_t: shift the running product by one step, "
                           "and decide what abar_{t-1} is at the very first step, where nothing has happened yet "
                           "(entry 0 must come out exactly 0).")


def ref_gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
                    logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise. Lesson: 02_elbo_to_simple_loss."""
    return normal_kl(mean1, logvar1, mean2, logvar2)


def check_gaussian_kl(fn: Callable) -> Callable:
    """Exercise 2.2: the KL divergence between two Gaussians. Lesson: 02_elbo_to_simple_loss."""
    cases = []
    for seed, shapes in ((5, [(6,)] * 4), (6, [(2, 3, 4)] * 4), (7, [(100,)] * 4), (8, [(4, 5), (5,), (4, 1), (1,)])):
        g = _gen(seed)
        kw = {name: torch.randn(shape, generator=g, dtype=torch.float64)
              for name, shape in zip(("mean1", "logvar1", "mean2", "logvar2"), shapes)}
        same = len(set(shapes)) == 1
        label = f"shape {shapes[0]}" if same else f"shapes {', '.join(map(str, shapes))} that broadcast"
        cases.append(Case(kw, label + ", float64"))
    return run_check("2.2", fn, ref_gaussian_kl, cases,
                     "KL = 0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)**2 * exp(-logvar2) - 1). "
                     "KL is not symmetric: the second Gaussian is the one in the denominator.",
                     rtol=1e-10, atol=1e-12, check_dtype=True,
                     nudge="KL(p || q) is not symmetric: it is an average under the first Gaussian, and the second "
                           "one's variance is what its terms are measured against. Try a case you can do by hand, "
                           "two equal Gaussians (KL 0) or equal variances.")


def ref_posterior_mean(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """mu_tilde_t(x_t, x_0) with ``t`` array indices ``(B,)``. Lesson: 02_elbo_to_simple_loss."""
    return GaussianDiffusion(betas).q_posterior_mean_variance(x0, xt, t)[0]


def check_posterior_mean(fn: Callable) -> Callable:
    """Exercise 2.3: the posterior mean mu_tilde_t. Lesson: 02_elbo_to_simple_loss."""
    cases = []
    for seed, shape, dtype in ((8, (5, 1, 4, 4), torch.float64), (9, (32, 2), torch.float64),
                               (10, (6, 1, 3, 3), torch.float32)):
        g = _gen(seed)
        T = 50
        t = torch.randint(0, T, (shape[0],), generator=g)
        t[0] = 0  # the first step, where abar_{t-1} = abar_0 = 1
        float32 = dtype == torch.float32
        cases.append(Case({"x0": torch.randn(shape, generator=g, dtype=dtype),
                           "xt": torch.randn(shape, generator=g, dtype=dtype), "t": t, "betas": _random_betas(T, seed)},
                          f"batch of shape {shape}, {str(dtype).replace('torch.', '')}, t[0] = 0",
                          **({"rtol": 1e-5, "atol": 1e-5} if float32 else {})))
    return run_check("2.3", fn, ref_posterior_mean, cases,
                     "mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) * x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) * xt; "
                     "x0 takes sqrt(abar_{t-1}), xt takes sqrt(alpha_t), and abar_0 = 1. Pick both coefficients "
                     "with t, reshape them to (B, 1, ...), and cast them to x0.dtype.",
                     rtol=1e-10, atol=1e-12, check_dtype=True,
                     nudge="mu-tilde weighs x0 and x_t with two coefficients of step t, one for each; each example "
                           "has its own t, and at the first step abar_{t-1} is that of no step at all. The result "
                           "keeps the dtype of x0.")


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("2.1", check_posterior_variance, ref_posterior_variance),
    ("2.2", check_gaussian_kl, ref_gaussian_kl),
    ("2.3", check_posterior_mean, ref_posterior_mean),
]
