"""Checkers of lesson 08_latent_diffusion: the latent codec, L_cond and the inpainting combination.

Every checker leaves the learner's random state alone: its small random networks are built from seeded forks
of the global generator, and the learner's function runs inside one. A failure also names the common mistake
that the learner's result matches, when it matches one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..autoencoder import Autoencoder, AutoencoderConfig
from ..conditions import build_model
from ..ddpm import GaussianDiffusion
from ..ldm import inpaint_combine
from ..nn import ConditionerConfig, UNetConfig
from ._runner import Case, CaseRejected, _compare, _gen, _seeded, run_check

_Mistake = Tuple[str, Callable[..., torch.Tensor]]  # (what the learner did, what that gives)


def _which_mistake(got: Any, kw: Dict[str, Any], mistakes: Sequence[_Mistake], rtol: float,
                   atol: float) -> Optional[str]:
    """The description of the first mistake that gives the learner's output ``got`` on the case ``kw``."""
    if not isinstance(got, torch.Tensor):
        return None
    for what, wrong in mistakes:
        try:
            if not _compare(got, wrong(**kw), rtol, atol):
                return what
        except Exception:  # this mistake cannot be made on this case (e.g. an index past T - 1)
            continue
    return None


def _run_diagnosed(exercise: str, fn: Callable, reference: Callable, cases: List[Case], hint: str,
                   mistakes: Sequence[_Mistake], nudge: str, rtol: float = 1e-5, atol: float = 1e-6) -> Callable:
    """:func:`run_check` on keyword arguments; a wrong result is also compared with the common ``mistakes``,
    and the failure names the one it matches. Returns ``fn`` or ``reference``."""
    def diagnose(kw: Dict[str, Any], got: Any) -> Optional[str]:
        what = _which_mistake(got, kw, mistakes, rtol, atol)
        return None if what is None else f"Your result is what one gets when {what}."

    return run_check(exercise, fn, reference, cases, hint, rtol=rtol, atol=atol, nudge=nudge, diagnose=diagnose)


# -- Exercise 8.1: pixels <-> latents ---------------------------------------------------------------

def ref_encode_to_latent(autoencoder: Autoencoder, x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """z = s E(x): ``x (B, C, H, W)`` in [-1, 1] -> ``(B, c, H/f, W/f)`` (the posterior mean).
    Lesson: 08_latent_diffusion."""
    return scale_factor * autoencoder.encode(x)


def ref_decode_from_latent(autoencoder: Autoencoder, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """x = D(z / s): ``z (B, c, h, w)`` -> ``(B, C, f h, f w)``. Lesson: 08_latent_diffusion."""
    return autoencoder.decode(z / scale_factor)


def _random_autoencoder(seed: int) -> Autoencoder:
    config = AutoencoderConfig.for_factor(4, in_channels=1, image_size=16, channels=8, latent_channels=4, norm_groups=4)
    with _seeded(seed):
        return Autoencoder(config).eval().requires_grad_(False)


def check_latent_codec(encode_fn: Callable, decode_fn: Callable) -> Tuple[Callable, Callable]:
    """Exercise 8.1: encode_to_latent (z = s E(x)) and decode_from_latent (x = D(z / s)), each checked on
    its own. Returns ``(encode, decode)`` to use from here on. Lesson: 08_latent_diffusion."""
    ae = _random_autoencoder(83)
    enc_cases, dec_cases = [], []
    for seed, B, s in ((84, 2, 0.4), (85, 3, 2.5), (86, 1, 0.18215)):
        g = _gen(seed)
        x = torch.rand(B, 1, 16, 16, generator=g) * 2 - 1
        label = f"{B} random images (B, 1, 16, 16) and scale_factor = {s}"
        enc_cases.append(Case({"autoencoder": ae, "x": x, "scale_factor": s}, label))
        dec_cases.append(Case({"autoencoder": ae, "z": ref_encode_to_latent(ae, x, s), "scale_factor": s},
                              f"the latents s E(x) of {label}"))
    encode = _run_diagnosed(
        "8.1 (encode_to_latent)", encode_fn, ref_encode_to_latent, enc_cases,
        "encode_to_latent is wrong. The diffusion model sees z = scale_factor * autoencoder.encode(x): "
        "MULTIPLY the encoder's output by the scale factor (s = 1 / std(E(x)) gives latents of about unit "
        "variance); do not divide by it or leave it out.",
        [("the scale factor is left out on encode: autoencoder.encode(x)",
          lambda autoencoder, x, scale_factor: autoencoder.encode(x)),
         ("encode divides by the scale factor: autoencoder.encode(x) / scale_factor",
          lambda autoencoder, x, scale_factor: autoencoder.encode(x) / scale_factor)],
        nudge="the diffusion model should see latents of about unit variance, so the encoder's output is rescaled "
              "on the way in, and the scale factor was measured as 1 / std(E(x)): decide whether it multiplies "
              "or divides.")
    decode = _run_diagnosed(
        "8.1 (decode_from_latent)", decode_fn, ref_decode_from_latent, dec_cases,
        "decode_from_latent is wrong. Undo the encoder's scaling before the decoder: "
        "autoencoder.decode(z / scale_factor). The decoder was trained on E(x), not on s E(x): DIVIDE by the "
        "scale factor; do not multiply by it or leave it out.",
        [("the scaling is not undone on decode: autoencoder.decode(z)",
          lambda autoencoder, z, scale_factor: autoencoder.decode(z)),
         ("decode multiplies by the scale factor: autoencoder.decode(z * scale_factor)",
          lambda autoencoder, z, scale_factor: autoencoder.decode(z * scale_factor))],
        nudge="the decoder was trained on the encoder's own outputs, not on the rescaled latents that the "
              "diffusion model works with: undo the rescaling of the way in before decoding.", atol=1e-5)
    return encode, decode


# -- Exercise 8.2: L_cond -----------------------------------------------------------------------------

def ref_l_cond(denoiser: torch.nn.Module, diffusion: GaussianDiffusion, z0: torch.Tensor, cond: Any,
               t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_cond on one batch, a scalar: mean of (noise - eps_theta(z_t, t, tau_theta(y)))^2 with
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise. ``z0, noise (B, c, h, w)``, ``t (B,)`` array indices,
    ``cond (B, ...)``. Lesson: 08_latent_diffusion."""
    return diffusion.L_simple(denoiser, z0, t=t, noise=noise, model_kwargs={"cond": cond})


def _random_denoiser(seed: int) -> torch.nn.Module:
    with _seeded(seed):
        denoiser = build_model(UNetConfig(image_size=8, in_channels=4, model_channels=16, channel_mult=(1, 2),
                                          num_res_blocks=1, attention_resolutions=(2,), norm_groups=8, context_dim=16),
                               ConditionerConfig(kind="class", context_dim=16, num_classes=10)).eval()
        with torch.no_grad():  # undo the zero inits (cross-attention's output, ...) so that the condition counts
            for p in denoiser.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return denoiser


def _loss_with_condition(fn: Callable, **kw: Any) -> Any:
    """The learner's loss; the case fails with its own reason when the condition does not reach the denoiser or
    the loss carries no gradient (the docstring's loss trains the denoiser: the lesson calls backward on it)."""
    try:
        loss = fn(**kw)
    except ValueError as e:
        if "this denoiser is conditional" not in str(e):
            raise
        raise CaseRejected("the condition y never reaches the denoiser: it was called without cond, so it "
                           "cannot learn what y asks for") from e
    if isinstance(loss, torch.Tensor) and not loss.requires_grad:
        raise CaseRejected("the loss carries no gradient: the denoiser trains on it (the lesson calls "
                           "loss.backward()), so it must not be detached or computed under torch.no_grad()")
    return loss


def check_l_cond(fn: Callable) -> Callable:
    """Exercise 8.2: the conditional latent loss L_cond. Lesson: 08_latent_diffusion."""
    denoiser, diffusion = _random_denoiser(87), GaussianDiffusion("scaled_linear", 1000)
    cases = []
    for seed, B in ((88, 3), (89, 4), (90, 2)):
        g = _gen(seed)
        t = torch.tensor([0, 499, 998]) if seed == 88 else torch.randint(0, 999, (B,), generator=g)
        cases.append(Case({"denoiser": denoiser, "diffusion": diffusion, "z0": torch.randn(B, 4, 8, 8, generator=g),
                           "cond": torch.randint(0, 10, (B,), generator=g), "t": t,
                           "noise": torch.randn(B, 4, 8, 8, generator=g)},
                          f"{B} latents (B, 4, 8, 8) with class labels, t = {t.tolist()}"))
    ab = lambda d, t, z: d.alpha_bar[t].to(z.dtype).reshape(-1, 1, 1, 1)  # noqa: E731
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    wrapped = lambda **kw: _loss_with_condition(fn, **kw)  # noqa: E731
    used = _run_diagnosed(
        "8.2", wrapped, ref_l_cond, cases,
        "z_t = sqrt(abar_t) * z0 + sqrt(1 - abar_t) * noise with abar_t = diffusion.alpha_bar[t] (array index t, "
        "not t + 1; square roots on both coefficients), cast to z0.dtype and shaped (B, 1, 1, 1); "
        "eps = denoiser(z_t, t, cond=cond) (z_t, not z0, goes in); return ((noise - eps) ** 2).mean(): the "
        "network predicts the NOISE. It equals diffusion.L_simple(denoiser, z0, t=t, noise=noise, "
        "model_kwargs={'cond': cond}).",
        [("the denoiser is called on z0 instead of z_t",
          lambda denoiser, diffusion, z0, cond, t, noise: mse(noise, denoiser(z0, t, cond=cond))),
         ("z_t = abar_t z0 + (1 - abar_t) noise, without the square roots",
          lambda denoiser, diffusion, z0, cond, t, noise: mse(noise, denoiser(
              ab(diffusion, t, z0) * z0 + (1 - ab(diffusion, t, z0)) * noise, t, cond=cond))),
         ("abar is read at t + 1 instead of the array index t",
          lambda denoiser, diffusion, z0, cond, t, noise: mse(noise, denoiser(
              diffusion.q_sample(z0, t + 1, noise), t, cond=cond))),
         ("the loss compares eps with z0 instead of the noise",
          lambda denoiser, diffusion, z0, cond, t, noise: mse(z0, denoiser(
              diffusion.q_sample(z0, t, noise), t, cond=cond)))],
        nudge="this is lesson 03's loss on latents, with the condition handed to the network: noise z0 to step t "
              "in closed form, and compare what the network predicts from that noisy latent with the noise that "
              "was added.")
    return fn if used is wrapped else ref_l_cond


# -- Exercise 8.3: the inpainting combination ------------------------------------------------------

def ref_inpaint_combine(diffusion: GaussianDiffusion, z_generated: torch.Tensor, z_known: torch.Tensor,
                        keep: torch.Tensor, t_prev: int, noise: torch.Tensor) -> torch.Tensor:
    """keep * known + (1 - keep) * z_generated, known = z_known noised to step ``t_prev`` (``-1``: z_known as
    it is). Latents ``(B, c, h, w)``, keep ``(B, 1, h, w)``. Lesson: 08_latent_diffusion."""
    return inpaint_combine(diffusion, z_generated, z_known, keep, t_prev, noise)


def check_inpaint_combine(fn: Callable) -> Callable:
    """Exercise 8.3: one step's inpainting combination. Lesson: 08_latent_diffusion."""
    diffusion = GaussianDiffusion("scaled_linear", 1000)
    cases = []
    for seed, B, t_prev in ((91, 2, -1), (92, 3, 0), (93, 2, 250), (94, 1, 999)):
        g = _gen(seed)
        keep = (torch.rand(B, 1, 8, 8, generator=g) < 0.5).float()
        cases.append(Case({"diffusion": diffusion, "z_generated": torch.randn(B, 4, 8, 8, generator=g),
                           "z_known": torch.randn(B, 4, 8, 8, generator=g), "keep": keep, "t_prev": t_prev,
                           "noise": torch.randn(B, 4, 8, 8, generator=g)},
                          f"t_prev = {t_prev}" + (" (the last step: z_known is used as it is)" if t_prev < 0 else "")))
    known = lambda d, z, t, n: z if t < 0 else d.q_sample(z, t, n)  # noqa: E731
    return _run_diagnosed(
        "8.3", fn, ref_inpaint_combine, cases,
        "first noise the known latent to the step the sampler has just reached: known = "
        "diffusion.q_sample(z_known, t_prev, noise), or z_known itself when t_prev == -1 (the end, z_0). "
        "Then keep it where keep is 1 and the generated latent where keep is 0: "
        "keep * known + (1 - keep) * z_generated.",
        [("the clean z_known is blended at every step: noise it to t_prev first",
          lambda diffusion, z_generated, z_known, keep, t_prev, noise: keep * z_known + (1 - keep) * z_generated),
         ("the mask is inverted (keep is 1 where the image is KNOWN)",
          lambda diffusion, z_generated, z_known, keep, t_prev, noise: (1 - keep) * known(
              diffusion, z_known, t_prev, noise) + keep * z_generated),
         ("z_known is noised to step t_prev + 1 instead of t_prev",
          lambda diffusion, z_generated, z_known, keep, t_prev, noise: inpaint_combine(
              diffusion, z_generated, z_known, keep, t_prev + 1, noise)),
         ("z_known is noised at t_prev = -1 (alpha_bar[-1] is the LAST step): at the end use z_known as it is",
          lambda diffusion, z_generated, z_known, keep, t_prev, noise: keep * diffusion.q_sample(
              z_known, t_prev % diffusion.T, noise) + (1 - keep) * z_generated)],
        nudge="the known region must sit at the same noise level as the sampler's latent after this step, and at "
              "the very end (t_prev = -1) no noise is left to add; keep is 1 where the image is known.")


# (exercise, checker, reference) of this lesson, for the tests; 8.1 checks two functions at once
CHECKS: List[Tuple[str, Callable, Any]] = [
    ("8.1", check_latent_codec, (ref_encode_to_latent, ref_decode_from_latent)),
    ("8.2", check_l_cond, ref_l_cond),
    ("8.3", check_inpaint_combine, ref_inpaint_combine),
]
