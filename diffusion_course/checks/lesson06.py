"""Checkers of lesson 06_ldm_autoencoder: the latent-diffusion autoencoder."""
from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch

from ._runner import Case, _gen, run_check


def ref_vq_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each latent vector of ``z`` ``(B, c, h, w)`` replaced by its nearest row of ``codebook`` ``(K, c)``,
    with the straight-through gradient (d z_q / d z = identity). Lesson: 06_ldm_autoencoder."""
    from ..autoencoder import nearest_code

    e = codebook[nearest_code(z, codebook)].permute(0, 3, 1, 2)
    return z + (e - z).detach()


def _value_and_grad(fn: Callable, z: torch.Tensor, codebook: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """fn's output and the gradient it passes back to z for ``upstream``, flattened into one tensor."""
    z = z.clone().requires_grad_(True)
    out = fn(z, codebook)
    if not isinstance(out, torch.Tensor):
        return out
    if not out.requires_grad:  # nothing flows back to the encoder
        return torch.cat([out.detach().flatten(), torch.zeros(z.numel())])
    (grad,) = torch.autograd.grad((out * upstream).sum(), z, allow_unused=True)
    grad = torch.zeros_like(z) if grad is None else grad
    return torch.cat([out.detach().flatten(), grad.flatten()])


def check_vq_quantize(fn: Callable) -> Callable:
    """Exercise 6.1: nearest-code lookup with the straight-through gradient. Lesson: 06_ldm_autoencoder."""
    cases = []
    for seed, b, c, hw, k in ((40, 2, 3, 4, 8), (41, 1, 4, 3, 16), (42, 3, 2, 2, 5)):
        g = _gen(seed)
        cases.append(Case({"z": torch.randn(b, c, hw, hw, generator=g), "codebook": torch.randn(k, c, generator=g),
                           "upstream": torch.randn(b, c, hw, hw, generator=g)}, f"z ({b}, {c}, {hw}, {hw}), K = {k}"))
    wrapped = lambda z, codebook, upstream: _value_and_grad(fn, z, codebook, upstream)  # noqa: E731
    ref = lambda z, codebook, upstream: _value_and_grad(ref_vq_quantize, z, codebook, upstream)  # noqa: E731
    used = run_check("6.1", wrapped, ref, cases,
                     "move the channel axis last and flatten to (B*h*w, c); the squared Euclidean distance to every "
                     "code is (z**2).sum(1, keepdim=True) - 2 * z @ codebook.T + (codebook**2).sum(1); take argmin "
                     "(nearest, not most similar), look the codes up, move the channels back, and return "
                     "z + (e - z).detach() so that the gradient reaches z unchanged.", rtol=1e-5, atol=1e-5)
    return fn if used is wrapped else ref_vq_quantize


def ref_hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The PatchGAN discriminator's hinge loss, a scalar. Lesson: 06_ldm_autoencoder."""
    from ..losses import hinge_d_loss

    return hinge_d_loss(logits_real, logits_fake)


def check_hinge_d_loss(fn: Callable) -> Callable:
    """Exercise 6.2: the discriminator's hinge loss. Lesson: 06_ldm_autoencoder."""
    cases = []
    for seed, shape in ((43, (4, 1, 6, 6)), (44, (2, 1, 2, 2)), (45, (8, 1, 1, 1))):
        g = _gen(seed)
        cases.append(Case({"logits_real": 2 * torch.randn(shape, generator=g),
                           "logits_fake": 2 * torch.randn(shape, generator=g)}, f"patch logits {shape}"))
    return run_check("6.2", fn, ref_hinge_d_loss, cases,
                     "0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()): real patches are "
                     "pushed above +1, fake ones below -1, and a patch already past its margin costs nothing.")


def ref_adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive weight, detached, clamped to [0, 1e4] (delta = 1e-4). Lesson: 06_ldm_autoencoder."""
    from ..losses import adaptive_weight

    return adaptive_weight(rec_loss, g_loss, last_layer)


def _weight_and_detached(fn: Callable, **kwargs: Any) -> torch.Tensor:
    w = fn(**kwargs)
    if not isinstance(w, torch.Tensor):
        return w
    return torch.cat([w.detach().reshape(-1).double(), torch.tensor([float(w.requires_grad)], dtype=torch.float64)])


def check_adaptive_weight(fn: Callable) -> Callable:
    """Exercise 6.3: the adaptive weight of the GAN term. Lesson: 06_ldm_autoencoder."""
    cases = []
    for seed, scale, label in ((46, 1.0, "comparable gradients"), (47, 1e-9, "a vanishing GAN gradient (clamped)"),
                               (48, 30.0, "a strong GAN gradient")):
        g = _gen(seed)
        w = torch.randn(6, 4, generator=g).requires_grad_(True)    # the decoder's last layer
        h = torch.randn(5, 4, generator=g)                          # its input features
        target, d = torch.randn(5, 6, generator=g), torch.randn(6, generator=g)
        out = h @ w.t()
        cases.append(Case({"rec_loss": (out - target).abs().sum(), "g_loss": -scale * (out @ d).mean(),
                           "last_layer": w}, label))
    wrapped = lambda **kw: _weight_and_detached(fn, **kw)  # noqa: E731
    ref = lambda **kw: _weight_and_detached(ref_adaptive_weight, **kw)  # noqa: E731
    used = run_check("6.3", wrapped, ref, cases,
                     "take the gradients of both losses with respect to last_layer (torch.autograd.grad(loss, "
                     "last_layer, retain_graph=True)[0]), divide the norm of the reconstruction gradient by the norm "
                     "of the GAN gradient + 1e-4, clamp to [0, 1e4] and .detach() the result.", rtol=1e-4, atol=1e-6)
    return fn if used is wrapped else ref_adaptive_weight


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("6.1", check_vq_quantize, ref_vq_quantize),
    ("6.2", check_hinge_d_loss, ref_hinge_d_loss),
    ("6.3", check_adaptive_weight, ref_adaptive_weight),
]
