"""Checkers of lesson 06_ldm_autoencoder: the latent-diffusion autoencoder."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._runner import Case, CaseRejected, _gen, _seeded, run_check


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
                     "z + (e - z).detach() so that the gradient reaches z unchanged.", rtol=1e-5, atol=1e-5,
                     nudge="Two things are checked: the value (each latent vector, taken across the channel axis, "
                           "goes to the code at the smallest distance) and the gradient that reaches z (exactly "
                           "the decoder's, as if the lookup were the identity).")
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
                     "pushed above +1, fake ones below -1, and a patch already past its margin costs nothing.",
                     nudge="A real patch costs nothing once its logit is above +1, a reconstructed one once it is "
                           "below -1; average each kind over all its patch logits, then weigh the two kinds equally.")


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
                     "of the GAN gradient + 1e-4, clamp to [0, 1e4] and .detach() the result.", rtol=1e-4, atol=1e-6,
                     nudge="The weight compares the sizes of two gradients at the decoder's last layer, not of the "
                           "two losses; it must stay finite when the GAN gradient vanishes, and it is a number, "
                           "not part of the graph.")
    return fn if used is wrapped else ref_adaptive_weight


# -- Exercise 6.4: the autoencoder's side of L_AE ----------------------------------------------------------------

_LOG_KEYS = ("rec", "reg", "g", "d_weight")
_LOG_MEANING = {"rec": "L_rec, pixel + perceptual terms averaged over the batch",
               "reg": "the regulariser before its weight: out.reg_loss averaged over the batch",
               "g": "L_G = -mean D_psi(x_rec), 0.0 before disc_start or without a discriminator",
               "d_weight": "w_disc * w_adv, 0.0 before disc_start or without a discriminator"}


class _TinyPerceptual(nn.Module):
    """A stand-in for :class:`~diffusion_course.losses.PerceptualLoss` that the checker can build in a moment:
    one fixed random 3x3 convolution and a ReLU, features unit-normalised over channels, squared differences
    summed over channels and averaged over positions, ``(B,)``."""

    def __init__(self, channels: int, seed: int) -> None:
        super().__init__()
        self.register_buffer("weight", 0.3 * torch.randn(8, channels, 3, 3, generator=_gen(seed)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = (F.relu(F.conv2d(t, self.weight, padding=1)) for t in (x, y))
        unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
        return (unit(fx) - unit(fy)).pow(2).sum(1).mean((1, 2))


def _generator_step_inputs(seed: int, regularizer: str, step: int, disc_start: int, perceptual_weight: float,
                           disc_weight: float, pixel: str, kl_weight: float, codebook_weight: float):
    """A tiny autoencoder, its loss module (with a discriminator and a stand-in perceptual network as asked), a
    seeded batch and the model's output on it: the same every time for the same arguments."""
    from ..autoencoder import Autoencoder, AutoencoderConfig
    from ..losses import AutoencoderLoss

    with _seeded(seed):                          # the CPU generator alone, given back afterwards
        model = Autoencoder(AutoencoderConfig.for_factor(2, in_channels=3, image_size=16, channels=8,
                                                         latent_channels=2, regularizer=regularizer, n_embed=8,
                                                         norm_groups=4, attention=False)).train()
        perceptual = _TinyPerceptual(3, seed) if perceptual_weight > 0 else None
        ae_loss = AutoencoderLoss(3, pixel, perceptual_weight, perceptual, disc_weight, disc_start, "hinge",
                                  disc_layers=1, disc_channels=8, kl_weight=kl_weight, codebook_weight=codebook_weight)
        g = _gen(seed)
        x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
        out = model(x, generator=g)
    return ae_loss, x, out, model


def ref_autoencoder_loss(ae_loss: Any, x: torch.Tensor, out: Any, step: int, last_layer: torch.Tensor,
                         regularizer: str) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The loss that the encoder and decoder minimise at ``step`` and its logged parts, as
    ``AutoencoderLoss.autoencoder_loss`` computes them, with the loss module as first argument (the signature
    of ``AETrainer``'s ``autoencoder_loss_fn``). Lesson: 06_ldm_autoencoder."""
    return ae_loss.autoencoder_loss(x, out, step, last_layer, regularizer)


def _run_generator_step(fn: Callable, **kw: Any):
    """fn on fresh inputs built from ``kw``: (result, gradient of the total at the decoder's last layer, at the
    encoder), the gradients None when the result is not a total with a graph."""
    ae_loss, x, out, model = _generator_step_inputs(**kw)
    last = model.decoder.last_layer
    result = fn(ae_loss, x, out, kw["step"], last, kw["regularizer"])
    total = result[0] if isinstance(result, tuple) and len(result) == 2 else None
    if not (isinstance(total, torch.Tensor) and total.requires_grad and total.numel() == 1):
        return result, None, None
    enc = [p for p in model.encoder.parameters()]
    grads = torch.autograd.grad(total.sum(), [last] + enc, allow_unused=True)
    flat = lambda gs, ps: torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(gs, ps)])  # noqa: E731
    return result, flat(grads[:1], [last]), flat(grads[1:], enc)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-12)).item()


def _generator_step_mismatch(got: Any, want: Tuple[torch.Tensor, Dict[str, float]], grads: Tuple, want_grads: Tuple,
                             kw: Dict[str, Any]) -> str:
    """'' when the learner's (total, logs) and the gradients of its total match the reference's, else why not."""
    if not (isinstance(got, tuple) and len(got) == 2):
        return f"returned {type(got).__name__}, expected a pair (total, logs)"
    total, logs = got
    if not isinstance(total, torch.Tensor):
        return f"the total is {type(total).__name__}, expected a tensor (keep it a tensor: no .item())"
    if total.numel() != 1 or total.ndim != 0:
        return f"the total has shape {tuple(total.shape)}, expected a scalar (shape ()): average over the batch"
    if not total.requires_grad:
        return ("the total has no graph (.item(), .detach() or torch.no_grad() cut it): the autoencoder could not "
                "learn from it")
    if not isinstance(logs, dict) or any(k not in logs for k in _LOG_KEYS):
        have = sorted(logs) if isinstance(logs, dict) else type(logs).__name__
        return f"the logs must be a dict with the keys {', '.join(_LOG_KEYS)}; got {have}"
    want_total, want_logs = want
    if not math.isclose(total.item(), want_total.item(), rel_tol=1e-5, abs_tol=1e-5):
        found = _generator_step_diagnosis(total.item(), logs, kw)
        return f"the total is {total.item():.6g}, expected {want_total.item():.6g}" + (f". {found}" if found else "")
    for key in _LOG_KEYS:
        try:
            value = float(logs[key])
        except (TypeError, ValueError):
            return f"logs[{key!r}] is {type(logs[key]).__name__}, expected a number"
        if not math.isclose(value, want_logs[key], rel_tol=1e-4, abs_tol=1e-6):
            return f"logs[{key!r}] is {value:.6g}, expected {want_logs[key]:.6g} ({_LOG_MEANING[key]})"
    if _relative_error(grads[0], want_grads[0]) > 1e-3:
        return ("the gradient of the total at the decoder's last layer differs from the reference's (is a term "
                "detached, or the adaptive weight not detached?)")
    if _relative_error(grads[1], want_grads[1]) > 1e-3:
        return ("the gradient of the total at the encoder differs from the reference's (does the regulariser "
                "keep its graph?)")
    return ""


def _generator_step_diagnosis(total: float, logs: Any, kw: Dict[str, Any]) -> str:
    """Name the common mistake that a wrong total matches, if any. The GAN term is judged on the total; L_rec and
    L_reg on the total less the learner's own logged GAN term, so that a wrong L_rec (which also changes w_adv) is
    still recognised."""
    ae_loss, x, out, model = _generator_step_inputs(**kw)
    with torch.no_grad():
        rec = ae_loss.reconstruction_loss(x, out.x_rec).mean().item()
        pix = (x - out.x_rec).abs() if kw["pixel"] == "l1" else (x - out.x_rec).pow(2)
        pix = pix.flatten(1).sum(1).mean().item()
        reg = out.reg_loss.mean().item()
    w_reg = kw["kl_weight"] if kw["regularizer"] == "kl" else kw["codebook_weight"]
    _, ref_logs = ref_autoencoder_loss(ae_loss, x, out, kw["step"], model.decoder.last_layer, kw["regularizer"])
    gan, late_gan = ref_logs["d_weight"] * ref_logs["g"], 0.0
    if kw["disc_weight"] > 0 and kw["step"] < kw["disc_start"]:  # the GAN term as it would be once started
        late = dict(kw, step=kw["disc_start"])
        ae_loss, x, out, model = _generator_step_inputs(**late)
        _, late_logs = ref_autoencoder_loss(ae_loss, x, out, late["step"], model.decoder.last_layer, late["regularizer"])
        late_gan = late_logs["d_weight"] * late_logs["g"]
    base = rec + w_reg * reg
    lam = ref_logs["d_weight"] / kw["disc_weight"] if kw["disc_weight"] else 0.0
    on_total = [(base, "L_rec + L_reg without the GAN term (it counts from step >= disc_start on)"),
                (base + late_gan, "the GAN term added before disc_start (step < disc_start: leave it out)"),
                (base - gan, "the GAN term with the wrong sign (the autoencoder minimises -mean D_psi(x_rec))"),
                (base + kw["disc_weight"] * ref_logs["g"], "the GAN term without the adaptive weight w_adv"),
                (base + lam * ref_logs["g"], "the GAN term without disc_weight")]
    try:
        own_gan = float(logs["d_weight"]) * float(logs["g"])
    except (TypeError, ValueError, KeyError):
        own_gan = 0.0
    on_base = [(rec + reg, "the regulariser without its weight (kl_weight for KL, codebook_weight for VQ)"),
               (rec, "L_rec without the regulariser"),
               (pix + w_reg * reg, "the perceptual term left out of L_rec"),
               (pix + (rec - pix) / x[0].numel() + w_reg * reg,
                "the perceptual distance counted once per image instead of once per pixel value (times C H W)")]
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)  # noqa: E731
    for value, what in on_total:
        if not close(value, base + gan) and close(total, value):
            return f"Your total matches {what}"
    for value, what in on_base:
        if not close(value, base) and close(total - own_gan, value):
            return f"Your total matches {what}"
    return ""


_GENERATOR_STEP_CASES = (  # seed, regularizer, step, disc_start, perceptual_weight, disc_weight, pixel, kl_weight, codebook_weight
    (50, "kl", 2, 3, 0.0, 0.8, "l1", 0.05, 1.0, "KL, no perceptual term, before disc_start"),
    (51, "kl", 3, 3, 0.3, 0.8, "l1", 0.05, 1.0, "KL, perceptual term, at disc_start"),
    (52, "vq", 5, 0, 0.3, 0.5, "l1", 1e-6, 0.7, "VQ, perceptual term, after disc_start"),
    (53, "vq", 5, 2, 0.0, 0.0, "l1", 1e-6, 1.3, "VQ, no perceptual term, no discriminator"),
    (54, "kl", 9, 4, 0.5, 0.0, "l2", 0.5, 1.0, "KL, L2 pixel loss, perceptual term, no discriminator"),
    (55, "kl", 4, 0, 0.0, 1.0, "l1", 1e-6, 1.0, "KL as in the lesson (w_KL = 1e-6), discriminator on"),
)
_CASE_FIELDS = ("seed", "regularizer", "step", "disc_start", "perceptual_weight", "disc_weight", "pixel", "kl_weight",
                "codebook_weight")


def check_autoencoder_loss(fn: Callable) -> Callable:
    """Exercise 6.4: the loss that the encoder and decoder minimise (L_rec + L_reg + the adaptively weighted GAN
    term from disc_start on) and its logs, against ``AutoencoderLoss.autoencoder_loss`` on a tiny seeded
    autoencoder and discriminator. Lesson: 06_ldm_autoencoder."""
    cases = [Case(dict(zip(_CASE_FIELDS, c[:-1])), c[-1]) for c in _GENERATOR_STEP_CASES]

    def wrapped(**kw: Any) -> torch.Tensor:
        got, *grads = _run_generator_step(fn, **kw)
        want, *want_grads = _run_generator_step(ref_autoencoder_loss, **kw)
        reason = _generator_step_mismatch(got, want, grads, want_grads, kw)
        if reason:
            raise CaseRejected(reason)
        return want[0].detach()

    ref = lambda **kw: _run_generator_step(ref_autoencoder_loss, **kw)[0][0].detach()  # noqa: E731
    used = run_check("6.4", wrapped, ref, cases,
                     "rec = pixel_loss(x, out.x_rec, ae_loss.pixel), plus ae_loss.perceptual_weight * x[0].numel() * "
                     "ae_loss.perceptual(x, out.x_rec) when ae_loss.perceptual is not None, then .mean(); "
                     "reg = out.reg_loss.mean(); total = rec + (ae_loss.kl_weight if regularizer == 'kl' else "
                     "ae_loss.codebook_weight) * reg; if ae_loss.discriminator is not None and step >= "
                     "ae_loss.disc_start: g = -ae_loss.discriminator(out.x_rec).mean(), d_weight = "
                     "adaptive_weight(rec, g, last_layer) * ae_loss.disc_weight, total = total + d_weight * g. "
                     "Return total and {'rec': rec.item(), 'reg': reg.item(), 'g': g.item() or 0.0, "
                     "'d_weight': d_weight.item() or 0.0}.", rtol=1e-5, atol=1e-5,
                     nudge="Build it term by term as in the L_AE table above: the reconstruction (with its "
                           "perceptual part when there is one), the weighted regulariser of this model's kind, and "
                           "the GAN term only when there is a discriminator and it has started; the total must keep "
                           "its graph.")
    return fn if used is wrapped else ref_autoencoder_loss


# -- Exercise 6.5: what one patch logit sees ----------------------------------------------------------------------

_GEOMETRY_FIELDS = ("grid", "receptive_field", "jump", "first")
_GEOMETRY_MEANING = {"grid": "logits per side of the output", "receptive_field": "pixels per side of one logit's window",
                    "jump": "pixels between the windows of neighbouring logits",
                    "first": "first pixel of logit 0's window, negative inside the zero padding"}


def ref_patchgan_geometry(image_size: int, n_layers: int) -> Tuple[int, int, int, int]:
    """(grid, receptive_field, jump, first) of a PatchDiscriminator, measured on the real module: its output shape
    and the gradients of its logits (``losses.measure_patchgan_geometry``). Lesson: 06_ldm_autoencoder."""
    from ..losses import measure_patchgan_geometry

    return tuple(measure_patchgan_geometry(image_size, n_layers))


def _geometry_mismatch(got: Any, want: Tuple[int, ...]) -> str:
    if not (isinstance(got, (tuple, list)) and len(got) == 4):
        return f"returned {type(got).__name__}, expected four integers ({', '.join(_GEOMETRY_FIELDS)})"
    for name, value, w in zip(_GEOMETRY_FIELDS, got, want):
        try:
            v = float(value)
        except (TypeError, ValueError):
            return f"{name} is {type(value).__name__}, expected an integer"
        if v != w:
            return f"{name} is {v:g}, expected {w} ({_GEOMETRY_MEANING[name]}; measured on the real PatchDiscriminator)"
    return ""


def check_patchgan_geometry(fn: Callable) -> Callable:
    """Exercise 6.5: the logit grid and the receptive field of the PatchGAN, against the real module's output
    shape and the window that the gradients of its logits reveal. Lesson: 06_ldm_autoencoder."""
    cases = [Case({"image_size": s, "n_layers": n}, label)
             for s, n, label in ((64, 3, "the lesson's patches, three layers"), (64, 2, "two layers"),
                                 (70, 3, "a side that does not halve evenly"), (100, 4, "four layers"),
                                 (48, 1, "one layer"))]

    def wrapped(**kw: Any) -> torch.Tensor:
        got, want = fn(**kw), ref_patchgan_geometry(**kw)
        reason = _geometry_mismatch(got, want)
        if reason:
            raise CaseRejected(reason)
        return torch.tensor(want, dtype=torch.float64)

    ref = lambda **kw: torch.tensor(ref_patchgan_geometry(**kw), dtype=torch.float64)  # noqa: E731
    used = run_check("6.5", wrapped, ref, cases,
                     "start with size = image_size, field = 1, jump = 1, first = 0; for each (k, s, p) in "
                     "[(4, 2, 1)] * n_layers + [(4, 1, 1)] * 2: size = (size + 2 * p - k) // s + 1; "
                     "field += (k - 1) * jump; first -= p * jump; jump *= s. Return (size, field, jump, first).",
                     nudge="Walk through the convolutions from the image to the logits: each one changes the side "
                           "of the map, widens the window by its kernel measured in input pixels (the jump so far), "
                           "shifts the window's start by its padding, and multiplies the jump by its stride.")
    if used is wrapped:
        return fn
    from ..losses import patchgan_geometry

    return patchgan_geometry


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("6.1", check_vq_quantize, ref_vq_quantize),
    ("6.2", check_hinge_d_loss, ref_hinge_d_loss),
    ("6.3", check_adaptive_weight, ref_adaptive_weight),
]
# checkers of functions that return pairs, dicts or tuples of ints; tested in tests/test_lesson05_06_checks.py
CHECKS_APART: List[Tuple[str, Callable, Callable]] = [
    ("6.4", check_autoencoder_loss, ref_autoencoder_loss),
    ("6.5", check_patchgan_geometry, ref_patchgan_geometry),
]
