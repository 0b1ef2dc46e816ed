"""Checkers of lesson 08_latent_diffusion: the latent codec, L_cond and the inpainting combination.

Every checker runs inside ``torch.random.fork_rng``: building its small random networks (or a learner's
function that draws noise) never changes the learner's random state.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..autoencoder import Autoencoder, AutoencoderConfig
from ..conditions import build_model
from ..ddpm import GaussianDiffusion
from ..ldm import inpaint_combine
from ..nn import ConditionerConfig, UNetConfig
from ._runner import Case, ExerciseFailed, _compare, _gen, run_check

_Mistake = Tuple[str, Callable[..., torch.Tensor]]  # (what the learner did, what that gives)


def _which_mistake(last: Dict[str, Any], mistakes: Sequence[_Mistake], rtol: float, atol: float) -> Optional[str]:
    """The description of the first mistake that gives the learner's last output, if any."""
    if not isinstance(last.get("out"), torch.Tensor):
        return None
    for what, wrong in mistakes:
        try:
            if not _compare(last["out"], wrong(**last["kw"]), rtol, atol):
                return what
        except Exception:  # this mistake cannot be made on this case (e.g. an index past T - 1)
            continue
    return None


def _run_diagnosed(exercise: str, fn: Callable, reference: Callable, cases: List[Case], hint: str,
                   mistakes: Sequence[_Mistake], rtol: float = 1e-5, atol: float = 1e-6) -> Callable:
    """:func:`run_check` on keyword arguments; a failure also names the common mistake the learner's output
    matches. Returns ``fn`` or ``reference``."""
    last: Dict[str, Any] = {}

    def learner(**kw: Any) -> Any:
        last.clear()
        last["out"] = fn(**kw)
        last["kw"] = kw
        return last["out"]

    try:
        used = run_check(exercise, learner, reference, cases, hint, rtol=rtol, atol=atol)
    except ExerciseFailed as e:
        what = _which_mistake(last, mistakes, rtol, atol)
        if what is None:
            raise
        diagnosis = f"\n  Your result is what one gets when {what}.\n  Hint: "
        raise ExerciseFailed(str(e).replace("\n  Hint: ", diagnosis, 1)) from e.__cause__
    return fn if used is learner else reference


# -- Exercise 8.1: pixels <-> latents ---------------------------------------------------------------

def ref_encode_to_latent(autoencoder: Autoencoder, x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """z = s E(x): ``x (B, C, H, W)`` in [-1, 1] -> ``(B, c, H/f, W/f)`` (the posterior mean).
    Lesson: 08_latent_diffusion."""
    return scale_factor * autoencoder.encode(x)


def ref_decode_from_latent(autoencoder: Autoencoder, z: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """x = D(z / s): ``z (B, c, h, w)`` -> ``(B, C, f h, f w)``. Lesson: 08_latent_diffusion."""
    return autoencoder.decode(z / scale_factor)


def _random_autoencoder(seed: int) -> Autoencoder:
    torch.manual_seed(seed)  # inside the checker's fork_rng
    config = AutoencoderConfig.for_factor(4, in_channels=1, image_size=16, channels=8, latent_channels=4, norm_groups=4)
    return Autoencoder(config).eval().requires_grad_(False)


def check_latent_codec(encode_fn: Callable, decode_fn: Callable) -> Tuple[Callable, Callable]:
    """Exercise 8.1: encode_to_latent (z = s E(x)) and decode_from_latent (x = D(z / s)), each checked on
    its own. Returns ``(encode, decode)`` to use from here on. Lesson: 08_latent_diffusion."""
    with torch.random.fork_rng(devices=[]):
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
              lambda autoencoder, x, scale_factor: autoencoder.encode(x) / scale_factor)])
        decode = _run_diagnosed(
            "8.1 (decode_from_latent)", decode_fn, ref_decode_from_latent, dec_cases,
            "decode_from_latent is wrong. Undo the encoder's scaling before the decoder: "
            "autoencoder.decode(z / scale_factor). The decoder was trained on E(x), not on s E(x): DIVIDE by the "
            "scale factor; do not multiply by it or leave it out.",
            [("the scaling is not undone on decode: autoencoder.decode(z)",
              lambda autoencoder, z, scale_factor: autoencoder.decode(z)),
             ("decode multiplies by the scale factor: autoencoder.decode(z * scale_factor)",
              lambda autoencoder, z, scale_factor: autoencoder.decode(z * scale_factor))], atol=1e-5)
    return encode, decode


# -- Exercise 8.2: L_cond -----------------------------------------------------------------------------

def ref_l_cond(denoiser: torch.nn.Module, diffusion: GaussianDiffusion, z0: torch.Tensor, cond: Any,
               t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_cond on one batch, a scalar: mean of (noise - eps_theta(z_t, t, tau_theta(y)))^2 with
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise. ``z0, noise (B, c, h, w)``, ``t (B,)`` array indices,
    ``cond (B, ...)``. Lesson: 08_latent_diffusion."""
    return diffusion.L_simple(denoiser, z0, t=t, noise=noise, model_kwargs={"cond": cond})


def _random_denoiser(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # inside the checker's fork_rng
    denoiser = build_model(UNetConfig(image_size=8, in_channels=4, model_channels=16, channel_mult=(1, 2),
                                      num_res_blocks=1, attention_resolutions=(2,), norm_groups=8, context_dim=16),
                           ConditionerConfig(kind="class", context_dim=16, num_classes=10)).eval()
    with torch.no_grad():  # undo the zero inits (cross-attention's output, ...) so that the condition counts
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return denoiser


def _loss_with_condition(fn: Callable, **kw: Any) -> Any:
    """The learner's loss, with a clear message when the condition does not reach the denoiser or the loss
    carries no gradient."""
    try:
        loss = fn(**kw)
    except ValueError as e:
        if "this denoiser is conditional" not in str(e):
            raise
        raise ValueError("the condition y must reach the denoiser: you called it without cond; call "
                         "denoiser(z_t, t, cond=cond)") from e
    if isinstance(loss, torch.Tensor) and not loss.requires_grad:
        raise ValueError("the loss carries no gradient: the denoiser trains on it, so do not detach it or compute "
                         "it under torch.no_grad()")
    return loss


def check_l_cond(fn: Callable) -> Callable:
    """Exercise 8.2: the conditional latent loss L_cond. Lesson: 08_latent_diffusion."""
    with torch.random.fork_rng(devices=[]):
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
                  diffusion.q_sample(z0, t, noise), t, cond=cond)))])
    return fn if used is wrapped else ref_l_cond


# -- Exercise 8.3: the inpainting combination ------------------------------------------------------

def ref_inpaint_combine(diffusion: GaussianDiffusion, z_generated: torch.Tensor, z_known: torch.Tensor,
                        keep: torch.Tensor, t_prev: int, noise: torch.Tensor) -> torch.Tensor:
    """keep * known + (1 - keep) * z_generated, known = z_known noised to step ``t_prev`` (``-1``: z_known as
    it is). Latents ``(B, c, h, w)``, keep ``(B, 1, h, w)``. Lesson: 08_latent_diffusion."""
    return inpaint_combine(diffusion, z_generated, z_known, keep, t_prev, noise)


def check_inpaint_combine(fn: Callable) -> Callable:
    """Exercise 8.3: one step's inpainting combination. Lesson: 08_latent_diffusion."""
    with torch.random.fork_rng(devices=[]):
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
        used = _run_diagnosed(
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
                  z_known, t_prev % diffusion.T, noise) + (1 - keep) * z_generated)])
    return used


# (exercise, checker, reference) of this lesson, for the tests; 8.1 checks two functions at once
CHECKS: List[Tuple[str, Callable, Any]] = [
    ("8.1", check_latent_codec, (ref_encode_to_latent, ref_decode_from_latent)),
    ("8.2", check_l_cond, ref_l_cond),
    ("8.3", check_inpaint_combine, ref_inpaint_combine),
]
