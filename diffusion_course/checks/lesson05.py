"""Checkers of lesson 05_vae: the VAE."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch

from ._runner import Case, CaseRejected, _gen, run_check


def _keeps_gradient(fn: Callable, names: Tuple[str, ...]) -> Callable:
    """``fn`` wrapped so that a case fails when its result carries no gradient to the inputs ``names`` (the
    docstrings demand a differentiable function: training back-propagates through it)."""
    def wrapped(**kw):
        kw = {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in kw.items()}
        out = fn(**kw)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            if not out.requires_grad:
                raise CaseRejected("the result carries no gradient (was it detached, turned into numbers, or computed "
                                   "under torch.no_grad()?): training back-propagates through it")
            grads = torch.autograd.grad(out.sum(), [kw[k] for k in names], allow_unused=True)
            cut = [k for k, g in zip(names, grads) if g is None]
            if cut:
                raise CaseRejected(f"no gradient reaches {', '.join(cut)}: the result must be a differentiable "
                                   f"function of it")
            out = out.detach()
        return out
    return wrapped


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
    learner = _keeps_gradient(fn, ("mu", "logvar"))
    used = run_check("5.1", learner, ref_reparameterize, cases,
                     "sigma is the standard deviation, exp(logvar / 2) (torch.exp(0.5 * logvar)), not the variance "
                     "exp(logvar) and not logvar itself; use the eps you are given, do not draw a new one.",
                     nudge="z must have standard deviation sigma, and logvar is the logarithm of a variance, not "
                           "of a standard deviation; the noise eps is given, so the function draws nothing.")
    return fn if used is learner else used


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
                     "square), the 1/2 applies to every term, and the result keeps the shape of mu (no sum).",
                     nudge="Compare with the one-dimensional closed form derived above, term by term: which of its "
                           "terms is sigma^2 and which log sigma^2, and what multiplies them all? Keep one value "
                           "per entry of mu.")


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
    learner = _keeps_gradient(fn, ("x_hat", "mu", "logvar"))
    used = run_check("5.3", learner, ref_vae_loss, cases,
                     "sum the squared error over every pixel and channel of an image and the KL over every latent "
                     "dimension (x.flatten(1).sum(1)), then average both over the batch (.mean()); kl_weight "
                     "multiplies the KL only. Return one scalar tensor.", rtol=1e-5, atol=1e-5,
                     nudge="Check the reductions against the table above: each term is a total per image first, "
                           "then an average over the batch, and the KL weight scales one term only.")
    return fn if used is learner else used


_RATE_DISTORTION_KEYS = ("kl_per_dim", "rate_nats", "rate_bits", "bits_per_value", "active_dims", "distortion",
                        "distortion_per_value")


def ref_rate_distortion(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
                        active_threshold: float = 0.01) -> Dict[str, Any]:
    """The rate-distortion bookkeeping of held-out images (``vae.rate_distortion``): a dict with the KL of each
    code dimension, the rate in nats and bits per image and bits per pixel value, the active dimensions, the
    distortion per image and per pixel value. Lesson: 05_vae."""
    from ..vae import rate_distortion

    return rate_distortion(mu, logvar, x, x_hat, active_threshold)


def _rate_distortion_mismatch(got: Any, want: Dict[str, Any]) -> str:
    """'' when the learner's dict matches the reference's, else what differs, named by its key."""
    if not isinstance(got, dict):
        return f"returned {type(got).__name__}, expected a dict with the keys {', '.join(_RATE_DISTORTION_KEYS)}"
    missing = [k for k in _RATE_DISTORTION_KEYS if k not in got]
    if missing:
        return f"the dict has no {', '.join(repr(k) for k in missing)}"
    g, w = got["kl_per_dim"], want["kl_per_dim"]
    if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(w.shape):
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        return f"'kl_per_dim' is {shape}, expected a tensor of shape {tuple(w.shape)} (one value per code dimension)"
    if not torch.allclose(g.detach().double(), w.double(), rtol=1e-5, atol=1e-6):
        return "'kl_per_dim' differs from the reference (the KL of each dimension, averaged over the images)"
    for key in _RATE_DISTORTION_KEYS[1:]:
        try:
            value = float(got[key])
        except (TypeError, ValueError):
            return f"{key!r} is {type(got[key]).__name__}, expected a number"
        if key == "active_dims":
            if value != want[key]:
                return f"'active_dims' is {value:g}, expected {want[key]} (dimensions whose KL is above the threshold)"
        elif not math.isclose(value, want[key], rel_tol=1e-5, abs_tol=1e-8):
            return f"{key!r} is {value:.6g}, expected {want[key]:.6g}"
    return ""


def _flat(result: Dict[str, Any]) -> torch.Tensor:
    return torch.cat([result["kl_per_dim"].detach().double().flatten(),
                      torch.tensor([float(result[k]) for k in _RATE_DISTORTION_KEYS[1:]], dtype=torch.float64)])


def check_rate_distortion(fn: Callable) -> Callable:
    """Exercise 5.4: the rate-distortion bookkeeping of held-out images. Lesson: 05_vae."""
    cases = []
    for seed, n, d, img, threshold in ((29, 40, 8, (1, 6, 6), 0.01), (30, 25, 5, (3, 4, 4), 0.01),
                                       (31, 60, 12, (1, 8, 8), 0.2)):
        g = _gen(seed)
        kind = (torch.arange(d) % 3)[torch.randperm(d, generator=g)]     # 0 collapsed, 1 barely used, 2 used
        mu = torch.randn(n, d, generator=g) * torch.tensor([0.0, 0.25, 1.0])[kind]
        logvar = torch.tensor([0.0, -0.1, -2.0])[kind] * torch.rand(n, d, generator=g) \
            + 0.02 * torch.randn(n, d, generator=g)
        x = torch.rand((n,) + img, generator=g) * 2 - 1
        x_hat = x + 0.3 * torch.randn((n,) + img, generator=g)
        cases.append(Case({"mu": mu, "logvar": logvar, "x": x, "x_hat": x_hat, "active_threshold": threshold},
                          f"{n} images {img}, {d} code dimensions of which {int((kind == 0).sum())} collapsed, "
                          f"threshold {threshold}"))

    def wrapped(**kw: Any) -> torch.Tensor:
        got, want = fn(**kw), ref_rate_distortion(**kw)
        reason = _rate_distortion_mismatch(got, want)
        if reason:
            raise CaseRejected(reason)
        return _flat(want)

    ref = lambda **kw: _flat(ref_rate_distortion(**kw))  # noqa: E731
    used = run_check("5.4", wrapped, ref, cases,
                     "kl_per_dim = kl_to_standard_normal(mu, logvar).mean(0) (average over the images, one value "
                     "per dimension); rate_nats = kl_per_dim.sum(); rate_bits = rate_nats / math.log(2); "
                     "bits_per_value = rate_bits / x[0].numel(); active_dims = int((kl_per_dim > "
                     "active_threshold).sum()); distortion = (x - x_hat).pow(2).flatten(1).sum(1).mean(); "
                     "distortion_per_value = distortion / x[0].numel().",
                     nudge="Every quantity is per image: average over the images, never sum over them; a nat is "
                           "1 / ln 2 bits; 'per value' divides by every number of an image, channels included.")
    return fn if used is wrapped else ref_rate_distortion


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("5.1", check_reparameterize, ref_reparameterize),
    ("5.2", check_kl_to_standard_normal, ref_kl_to_standard_normal),
    ("5.3", check_vae_loss, ref_vae_loss),
]
# checkers whose function returns a dict; tested in tests/test_lesson05_06_checks.py, not through ALL_CHECKS
CHECKS_APART: List[Tuple[str, Callable, Callable]] = [
    ("5.4", check_rate_distortion, ref_rate_distortion),
]
