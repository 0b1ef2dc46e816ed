"""Checkers of lesson 05_vae: the VAE."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from ._runner import Case, _gen, run_check


def ref_reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, the shape of ``mu``. Lesson: 05_vae."""
    from ..vae import reparameterize

    return reparameterize(mu, logvar, eps)


def check_reparameterize(fn: Callable) -> Callable:
    """Exercise 5.1: the reparameterisation z = mu + sigma * eps. Lesson: 05_vae."""
    cases = []
    for seed, shape in ((20, (8, 16)), (21, (3, 4, 2, 2)), (22, (1, 2))):
        g = _gen(seed)
        cases.append(Case({"mu": torch.randn(shape, generator=g), "logvar": 2 * torch.randn(shape, generator=g),
                           "eps": torch.randn(shape, generator=g)}, f"shape {shape}"))
    return run_check("5.1", fn, ref_reparameterize, cases,
                     "sigma is the standard deviation, exp(logvar / 2) (torch.exp(0.5 * logvar)), not the variance "
                     "exp(logvar) and not logvar itself; use the eps you are given, do not draw a new one.")


def ref_kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) elementwise, the shape of ``mu``. Lesson: 05_vae."""
    from ..vae import kl_to_standard_normal

    return kl_to_standard_normal(mu, logvar)


def check_kl_to_standard_normal(fn: Callable) -> Callable:
    """Exercise 5.2: the KL of a diagonal Gaussian to N(0, I), per dimension. Lesson: 05_vae."""
    cases = []
    for seed, shape in ((23, (8, 16)), (24, (2, 4, 3, 3)), (25, (50,))):
        g = _gen(seed)
        cases.append(Case({"mu": torch.randn(shape, generator=g), "logvar": torch.randn(shape, generator=g)},
                          f"shape {shape}"))
    return run_check("5.2", fn, ref_kl_to_standard_normal, cases,
                     "per dimension KL = 0.5 * (mu**2 + exp(logvar) - 1 - logvar): exp(logvar) is sigma^2 (no extra "
                     "square), the 1/2 applies to every term, and the result keeps the shape of mu (no sum).")


def ref_vae_loss(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                 kl_weight: float) -> torch.Tensor:
    """recon + kl_weight * KL, sums over pixels and latent dimensions, means over the batch; a scalar.

    Lesson: 05_vae.
    """
    from ..vae import vae_loss

    return vae_loss(x, x_hat, mu, logvar, kl_weight).loss


def check_vae_loss(fn: Callable) -> Callable:
    """Exercise 5.3: the VAE loss with its reductions. Lesson: 05_vae."""
    cases = []
    for seed, x_shape, z_shape, w in ((26, (8, 1, 6, 6), (8, 4), 0.5), (27, (3, 3, 4, 4), (3, 2, 2, 2), 2.0),
                                      (28, (5, 1, 8, 8), (5, 7), 0.0)):
        g = _gen(seed)
        cases.append(Case({"x": torch.randn(x_shape, generator=g), "x_hat": torch.randn(x_shape, generator=g),
                           "mu": torch.randn(z_shape, generator=g), "logvar": torch.randn(z_shape, generator=g),
                           "kl_weight": w}, f"images {x_shape}, latents {z_shape}, kl_weight {w}"))
    return run_check("5.3", fn, ref_vae_loss, cases,
                     "sum the squared error over every pixel and channel of an image and the KL over every latent "
                     "dimension (x.flatten(1).sum(1)), then average both over the batch (.mean()); kl_weight "
                     "multiplies the KL only. Return one scalar tensor.", rtol=1e-5, atol=1e-5)


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("5.1", check_reparameterize, ref_reparameterize),
    ("5.2", check_kl_to_standard_normal, ref_kl_to_standard_normal),
    ("5.3", check_vae_loss, ref_vae_loss),
]
