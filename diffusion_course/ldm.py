"""Latent diffusion, the whole model of the lecture's "Figure 4" (Rombach et al. 2022).

Taught in lesson 08_latent_diffusion.

    pixel space                        latent space                                   pixel space
    x (B, C, H, W) --E, times s--> z_0 (B, c, H/f, W/f) --q--> z_t --eps_theta(z_t, t, tau_theta(y))--> ...
                                                                      ... z_0 --divide by s, D--> x (B, C, H, W)

* The autoencoder E, D of lesson 06 is trained first and then **frozen**: it never receives a gradient and
  stays in eval mode (:class:`LatentDiffusion` enforces both).
* Its latents are multiplied by the **scale factor** s = 1 / std(E(x)) on the way in and divided by it on the
  way out, so that the diffusion model sees latents of about unit variance, which its noise schedule is built
  for (LDM does the same). The latents of a whole data set are encoded once and cached
  (:func:`encode_images`): training never runs the encoder again.
* The denoiser is lesson 07's conditional U-Net, trained in latent space with
  L_cond = E_{E(x), y, eps, t} || eps - eps_theta(z_t, t, tau_theta(y)) ||^2 (:meth:`LatentDiffusion.loss`).
* Predictions of z_0 are **not clipped** while sampling: latents do not live in [-1, 1].
* Conditions reach the U-Net two ways, as the lecture shows: tokens tau_theta(y) through cross-attention
  (``cond``: a class, a caption, a layout) and **spatial conditions concatenated to z_t** (``concat``):

  ==========  =============================================  ======================
  spatial     concatenated to z_t                            channels
  ==========  =============================================  ======================
  inpaint     the known latent z_0 * m and the keep mask m    c + 1
  semantic    the one-hot semantic map, averaged per f x f    number of classes K
  ==========  =============================================  ======================

Inpainting (:meth:`LatentDiffusion.inpaint`) also combines, at every sampling step, the generated latent
with the known latent noised to the same step (:func:`blend_known`), so the kept region is the known image up
to the autoencoder's own error.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attend
from .autoencoder import Autoencoder, AutoencoderConfig
from .conditions import build_model
from .ddpm import GaussianDiffusion
from .guidance import ClassifierFreeGuidance
from .nn import ConditionalDenoiser, ConditionerConfig, UNetConfig
from .pretrained import asset_sha256, read_asset
from .solvers import sample_with
from .utils import Autocast, get_device

SPATIAL = ("none", "inpaint", "semantic")


def _check_spatial(kind: str) -> None:
    if kind not in SPATIAL:
        raise ValueError(f"unknown spatial condition {kind!r}; valid: {', '.join(SPATIAL)}")


def spatial_channels(kind: str, latent_channels: int, num_classes: int = 0) -> int:
    """How many channels a spatial condition adds to z_t: 0, c + 1 (inpaint) or K (semantic).

    Lesson: 08_latent_diffusion."""
    _check_spatial(kind)
    if kind == "semantic" and num_classes < 2:
        raise ValueError(f"a semantic map needs num_classes >= 2 (background and at least one class), got {num_classes}")
    return {"none": 0, "inpaint": latent_channels + 1, "semantic": num_classes}[kind]


# ----------------------------------------------------------------------------------------------
# Spatial conditions and the inpainting combination
# ----------------------------------------------------------------------------------------------

def keep_mask_to_latent(keep: torch.Tensor, f: int) -> torch.Tensor:
    """A pixel keep-mask ``(B, 1, H, W)`` (1: known, 0: to generate) -> ``(B, 1, H/f, W/f)``: a latent cell
    counts as known only when every pixel of its f x f block is (a min-pool). Lesson: 08_latent_diffusion."""
    if keep.ndim != 4 or keep.shape[1] != 1:
        raise ValueError(f"a keep mask has shape (B, 1, H, W), got {tuple(keep.shape)}")
    if keep.shape[-1] % f or keep.shape[-2] % f:
        raise ValueError(f"the mask's size {tuple(keep.shape[-2:])} is not divisible by the autoencoder's f = {f}")
    keep = keep.float()
    if ((keep != 0) & (keep != 1)).any():
        raise ValueError("a keep mask holds only 0 (generate) and 1 (keep)")
    return -F.max_pool2d(-keep, f)


def semantic_condition(masks: torch.Tensor, num_classes: int, f: int) -> torch.Tensor:
    """A semantic map ``(B, H, W)`` of class ids in 0..K-1 -> ``(B, K, H/f, W/f)``: the one-hot map averaged
    over each f x f block (the share of each class in the cell), what is concatenated to z_t.
    Lesson: 08_latent_diffusion."""
    if masks.ndim != 3 or masks.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise ValueError(f"a semantic map has shape (B, H, W) with integer class ids, got {tuple(masks.shape)} "
                         f"{masks.dtype}")
    if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= num_classes):
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}, got {int(masks.min())}..{int(masks.max())}")
    one_hot = F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    return F.avg_pool2d(one_hot, f)


def inpaint_condition(z_known: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``cat([z_known * m, m])``, ``(B, c + 1, h, w)``, from the known latent ``(B, c, h, w)`` and the latent
    keep mask m ``(B, 1, h, w)``: what an inpainting LDM sees beside z_t. Lesson: 08_latent_diffusion."""
    if keep.shape != (z_known.shape[0], 1) + tuple(z_known.shape[-2:]):
        raise ValueError(f"the keep mask must have shape {(z_known.shape[0], 1) + tuple(z_known.shape[-2:])}, "
                         f"got {tuple(keep.shape)}")
    return torch.cat([z_known * keep, keep], dim=1)


def blend_known(z_generated: torch.Tensor, z_known_t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The inpainting combination of one sampling step: m * z_known_t + (1 - m) * z_generated, where
    z_known_t is the known latent noised to the same step (m: 1 where known). Lesson: 08_latent_diffusion."""
    if z_generated.shape != z_known_t.shape:
        raise ValueError(f"generated and known latents differ in shape: {tuple(z_generated.shape)} and "
                         f"{tuple(z_known_t.shape)}")
    return keep * z_known_t + (1 - keep) * z_generated


def inpaint_combine(diffusion: GaussianDiffusion, z_generated: torch.Tensor, z_known: torch.Tensor,
                    keep: torch.Tensor, t_prev: int, noise: torch.Tensor) -> torch.Tensor:
    """After a sampling step has produced z_{t_prev}: noise the known latent to the same step,
    q(z_{t_prev} | z_known) = sqrt(abar) z_known + sqrt(1 - abar) noise (array index ``t_prev``; ``-1``
    means the end, z_0, where the known latent is used as it is), and keep it where ``keep`` is 1
    (:func:`blend_known`). Shapes: latents ``(B, c, h, w)``, keep ``(B, 1, h, w)``. Lesson: 08_latent_diffusion."""
    known = z_known if t_prev < 0 else diffusion.q_sample(z_known, t_prev, noise)
    return blend_known(z_generated, known, keep)


def box_keep_masks(boxes: torch.Tensor, size: int, f: int = 1) -> torch.Tensor:
    """Keep masks ``(N, 1, size, size)`` that hide one box per image: ``boxes`` ``(N, 4)`` as ``x0, y0, x1, y1`` in
    [0, 1] (x to the right, y down, as the shapes' layouts), widened outwards to whole f x f latent cells.
    Lesson: 08_latent_diffusion."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes have shape (N, 4) = x0, y0, x1, y1 in [0, 1], got {tuple(boxes.shape)}")
    if size % f:
        raise ValueError(f"size {size} is not divisible by f = {f}")
    keep = torch.ones(len(boxes), 1, size, size)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        c0, r0 = int(x0 * size) // f * f, int(y0 * size) // f * f
        c1, r1 = math.ceil(x1 * size / f) * f, math.ceil(y1 * size / f) * f
        keep[i, :, r0:r1, c0:c1] = 0
    return keep


def masked_psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR in dB between images ``a`` and ``b`` ``(N, C, H, W)`` in [-1, 1] (peak-to-peak 2) over the pixels where
    ``where`` ``(N, 1, H, W)`` is 1, pooled over the batch: 10 log10(4 / MSE). Lesson: 08_latent_diffusion."""
    if a.shape != b.shape or where.shape != (a.shape[0], 1) + tuple(a.shape[-2:]):
        raise ValueError(f"need a and b of one shape (N, C, H, W) and where (N, 1, H, W); got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(where.shape)}")
    w = where.to(a.dtype)
    if w.sum() == 0:
        raise ValueError("the region is empty")
    mse = (((a - b) ** 2) * w).sum() / (w.sum() * a.shape[1])
    return float(10 * torch.log10(4 / mse)) if mse > 0 else float("inf")


def random_keep_masks(n: int, size: int, generator: Optional[torch.Generator] = None,
                      min_frac: float = 0.25, max_frac: float = 0.75, p_hide_all: float = 0.0) -> torch.Tensor:
    """``n`` keep masks ``(n, 1, size, size)``: 1 everywhere but one random rectangle of 0s whose sides are
    ``min_frac`` to ``max_frac`` of the side (the region to generate); with probability ``p_hide_all`` a mask
    hides the whole image instead (nothing known: plain generation). Lesson: 08_latent_diffusion."""
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    if not 0 <= p_hide_all <= 1:
        raise ValueError(f"p_hide_all is a probability in [0, 1], got {p_hide_all}")
    lo, hi = max(1, round(min_frac * size)), max(1, round(max_frac * size))
    sides = torch.randint(lo, hi + 1, (n, 2), generator=generator)
    corner = (torch.rand(n, 2, generator=generator) * (size - sides + 1)).long()
    rows = torch.arange(size)
    inside_y = (rows >= corner[:, :1]) & (rows < corner[:, :1] + sides[:, :1])  # (n, size)
    inside_x = (rows >= corner[:, 1:]) & (rows < corner[:, 1:] + sides[:, 1:])
    hole = inside_y[:, :, None] & inside_x[:, None, :]
    hide_all = torch.rand(n, generator=generator) < p_hide_all
    hole = hole | hide_all[:, None, None]
    return (~hole).float()[:, None]


# ----------------------------------------------------------------------------------------------
# Encoding once
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_images(autoencoder: Autoencoder, images: torch.Tensor, scale_factor: float, batch_size: int = 64,
                  progress: bool = False) -> torch.Tensor:
    """z_0 = s E(x) for every image ``(N, C, H, W)`` in [-1, 1] (the posterior mean), batch by batch on the
    autoencoder's device, returned on the CPU ``(N, c, H/f, W/f)``: the cache a latent model trains on.
    Lesson: 08_latent_diffusion."""
    cfg = autoencoder.config
    if images.ndim != 4 or images.shape[1] != cfg.in_channels or images.shape[-1] != cfg.image_size:
        raise ValueError(f"the autoencoder takes ({cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) images, "
                         f"got {tuple(images.shape)}")
    was = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    out = [autoencoder.encode(images[i:i + batch_size].to(device)).float().cpu() * scale_factor
           for i in tqdm(range(0, len(images), batch_size), desc="encoding", disable=not progress, leave=False)]
    autoencoder.train(was)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class LatentDiffusion(nn.Module):
    """The latent diffusion model: a frozen autoencoder with its scale factor, a (conditional) denoiser over
    latents and the diffusion process (no clipping).

    ``denoiser`` is a :class:`~diffusion_course.nn.ConditionalDenoiser` (with or without a condition encoder)
    whose U-Net works on latents: image size H/f, ``out_channels`` = the latent channels c, and
    ``in_channels`` = c plus the spatial condition's channels. Lesson: 08_latent_diffusion.
    """

    def __init__(self, autoencoder: Autoencoder, denoiser: ConditionalDenoiser, diffusion: GaussianDiffusion,
                 scale_factor: float, spatial: str = "none", num_classes: int = 0) -> None:
        super().__init__()
        _check_spatial(spatial)
        if not isinstance(denoiser, ConditionalDenoiser):
            raise TypeError("the denoiser must be a ConditionalDenoiser (wrap a bare U-Net as ConditionalDenoiser(unet))")
        if diffusion.clip_x0:
            raise ValueError("latents are not in [-1, 1]: build the GaussianDiffusion with clip_x0=False")
        if not scale_factor > 0:
            raise ValueError(f"the scale factor must be positive, got {scale_factor}")
        a, u = autoencoder.config, denoiser.config
        c, h = a.latent_shape[0], a.latent_shape[1]
        extra = spatial_channels(spatial, c, num_classes)
        if (u.image_size, u.out_channels, u.in_channels) != (h, c, c + extra):
            raise ValueError(f"the U-Net must work on the autoencoder's latents: image_size {h}, out_channels {c}, "
                             f"in_channels {c} + {extra} ({spatial} condition) = {c + extra}; it has image_size "
                             f"{u.image_size}, out_channels {u.out_channels}, in_channels {u.in_channels}")
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.denoiser, self.diffusion = denoiser, diffusion
        self.scale_factor, self.spatial, self.num_classes = float(scale_factor), spatial, int(num_classes)

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Train mode for the denoiser; the frozen autoencoder stays in eval mode. Lesson: 08_latent_diffusion."""
        super().train(mode)
        self.autoencoder.eval()  # frozen: always in eval mode
        return self

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def f(self) -> int:
        """The autoencoder's down-sampling factor H / h. Lesson: 08_latent_diffusion."""
        return self.autoencoder.config.image_size // self.autoencoder.config.latent_shape[1]

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        """``(c, h, w)`` of one latent. Lesson: 08_latent_diffusion."""
        return tuple(self.autoencoder.config.latent_shape)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    # -- pixels <-> latents -----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(B, C, H, W)`` in [-1, 1] -> z_0 = s E(x) ``(B, c, h, w)`` (posterior mean). Lesson: 08_latent_diffusion."""
        return self.autoencoder.encode(x.to(self.device)) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z_0 ``(B, c, h, w)`` -> x = D(z_0 / s) ``(B, C, H, W)``. Lesson: 08_latent_diffusion."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents of this model have shape (B, {', '.join(map(str, self.latent_shape))}), got "
                             f"{tuple(z.shape)}")
        return self.autoencoder.decode(z.to(self.device) / self.scale_factor)

    def spatial_input(self, z_known: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None,
                      semantic: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The ``concat`` tensor this model's spatial condition needs, from latent-space inputs: ``z_known``
        ``(B, c, h, w)`` and ``keep`` ``(B, 1, h, w)`` for inpainting, the pixel semantic map ``(B, H, W)``
        for a semantic model, nothing otherwise. Lesson: 08_latent_diffusion."""
        if self.spatial == "inpaint":
            if z_known is None or keep is None:
                raise ValueError("this inpainting model needs the known latent and its keep mask")
            return inpaint_condition(z_known, keep)
        if self.spatial == "semantic":
            if semantic is None:
                raise ValueError("this model is conditioned on a semantic map: pass semantic=(B, H, W) class ids")
            return semantic_condition(semantic, self.num_classes, self.f)
        return None

    def _nothing_known(self, n: int) -> torch.Tensor:
        """An inpainting model's ``concat`` when nothing is known: [z_known * m, m] = 0, ``(n, c + 1, h, w)``."""
        return torch.zeros((n, self.latent_shape[0] + 1) + self.latent_shape[1:])

    # -- L_cond -------------------------------------------------------------------------------------
    def loss(self, z0: torch.Tensor, cond: Any = None, concat: Optional[torch.Tensor] = None,
             drop: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """L_cond = E || eps - eps_theta(z_t, t, tau_theta(y)) ||^2 on a batch of cached latents z_0
        ``(B, c, h, w)`` (gradients reach the denoiser only). Lesson: 08_latent_diffusion."""
        kwargs: Dict[str, Any] = {}
        if cond is not None:
            kwargs.update(cond=cond, drop=drop)
        if concat is not None:
            kwargs["concat"] = concat
        return self.diffusion.L_simple(self.denoiser, z0, model_kwargs=kwargs, generator=generator)

    # -- sampling ---------------------------------------------------------------------------------
    def _eps_model(self, cond: Any, guidance_scale: float, n: int, autocast: Optional[torch.dtype] = None
                   ) -> Tuple[nn.Module, Dict[str, Any]]:
        denoiser = self.denoiser if autocast is None else Autocast(self.denoiser, autocast)
        if self.denoiser.conditioner is None:
            if cond is not None:
                raise ValueError("this model has no condition encoder: sample without cond")
            return denoiser, {}
        if cond is None:
            raise ValueError("this model is conditional: pass cond=... (one condition per image)")
        if len(cond) != n:
            raise ValueError(f"{len(cond)} conditions for {n} images; give one condition per image")
        return ClassifierFreeGuidance(denoiser, guidance_scale), {"cond": cond.to(self.device)}

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, guidance_scale: float = 1.0, concat: Optional[torch.Tensor] = None,
               sampler: str = "ddim", steps: Optional[int] = None, eta: Optional[float] = None, seed: int = 0,
               x_T: Optional[torch.Tensor] = None, decode: bool = True, progress: bool = False,
               spacing: str = "linspace", autocast: Optional[torch.dtype] = None) -> torch.Tensor:
        """``n`` samples: images ``(n, C, H, W)`` in [-1, 1] on the CPU (or the latents ``(n, c, h, w)`` with
        ``decode=False``), by DDIM or DPM-Solver++ 2M (``steps`` calls, default 50 and 20) or DDPM (all T), with classifier-free guidance of scale
        ``guidance_scale`` for a conditional model (0: the unconditional model, i.e. the empty condition).
        ``concat`` is the spatial condition (see :meth:`spatial_input`); an inpainting model without it samples
        with nothing known (the whole image generated). ``autocast`` (``torch.bfloat16`` or ``torch.float16``) runs
        the denoiser under autocast (:class:`~diffusion_course.utils.Autocast`); the decoder stays in float32.
        Lesson: 08_latent_diffusion."""
        model, kwargs = self._eps_model(cond, guidance_scale, n, autocast)
        if concat is None and self.spatial == "inpaint":  # nothing known: the inpainting model generates freely
            concat = self._nothing_known(n)
        if concat is not None:
            kwargs["concat"] = concat.to(self.device)
        elif self.spatial != "none":
            raise ValueError(f"this model needs its {self.spatial} condition: pass concat=model.spatial_input(...)")
        g = torch.Generator().manual_seed(seed)
        shape = (n,) + self.latent_shape
        z = sample_with(self.diffusion, model, shape, sampler, None if sampler == "ddpm" else steps, eta,
                        generator=g, device=self.device, progress=progress, model_kwargs=kwargs, x_T=x_T,
                        spacing=spacing)
        if not decode:
            return z.float().cpu()
        return self.decode(z).clamp(-1.0, 1.0).float().cpu()

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, keep: torch.Tensor, cond: Any = None, guidance_scale: float = 1.0,
                steps: int = 50, seed: int = 0, paste: bool = False, decode: bool = True,
                progress: bool = False, combine: Any = inpaint_combine) -> torch.Tensor:
        """Fill the region where ``keep`` ``(B, 1, H, W)`` is 0 in ``images`` ``(B, C, H, W)``: DDIM in latent
        space, and after every step the kept latent cells replaced by the known latent noised to that step
        (:func:`blend_known`); an inpainting model also sees ``[z_known * m, m]`` concatenated to z_t. With
        ``paste`` the kept pixels are copied from ``images`` at the end. Returns ``(B, C, H, W)`` on the CPU
        (or the final latents ``(B, c, h, w)`` with ``decode=False``). ``combine`` is the combination of each
        step (:func:`inpaint_combine`; the lesson passes the learner's). Lesson: 08_latent_diffusion."""
        n = images.shape[0]
        if keep.shape != (n, 1) + tuple(images.shape[-2:]):
            raise ValueError(f"the keep mask must have shape {(n, 1) + tuple(images.shape[-2:])}, got {tuple(keep.shape)}")
        z_known = self.encode(images)
        m = keep_mask_to_latent(keep, self.f).to(self.device)
        model, kwargs = self._eps_model(cond, guidance_scale, n)
        if self.spatial == "inpaint":
            kwargs["concat"] = inpaint_condition(z_known, m)
        elif self.spatial != "none":
            raise ValueError(f"a {self.spatial}-conditioned model cannot inpaint; use an unconditioned or inpaint model")
        g = torch.Generator().manual_seed(seed)
        d = self.diffusion
        seq = d.ddim_timesteps(steps)
        z = combine(d, d._randn(z_known.shape, like=z_known, generator=g), z_known, m, seq[0],
                    d._randn(z_known.shape, like=z_known, generator=g))
        for k, t in enumerate(tqdm(seq, desc="inpainting", disable=not progress, leave=False)):
            t_prev = seq[k + 1] if k + 1 < len(seq) else -1
            z = d.ddim_step(model, z, t, t_prev, model_kwargs=kwargs)
            z = combine(d, z, z_known, m, t_prev, d._randn(z_known.shape, like=z_known, generator=g))
        if not decode:
            return z.float().cpu()
        out = self.decode(z).clamp(-1.0, 1.0).float().cpu()
        if paste:
            k = keep.float().cpu()
            out = k * images.float().cpu() + (1 - k) * out
        return out

    def attention_guided_sample(self, captions: Sequence[str], guidance_scale: float = 3.0, steps: int = 50,
                                seed: int = 0, decode: bool = True, **kwargs: Any) -> torch.Tensor:
        """One image per caption by DDIM with attention guidance (:func:`attend.attention_guided_sample
        <diffusion_course.attend.attention_guided_sample>`, whose other options ``kwargs`` takes) on the latents
        z_t: the text-conditional denoiser's cross-attention maps over the h x w latent grid steer z_t. An
        inpainting model knows nothing (it generates the whole image). ``step_size=0`` gives the images of
        :meth:`sample` with DDIM, the same ``steps`` and ``seed``. Returns images ``(n, C, H, W)`` in [-1, 1]
        on the CPU, or the latents with ``decode=False``. Lesson: 08_latent_diffusion."""
        n = len(captions)
        extra = {}
        if self.spatial == "inpaint":
            extra["concat"] = self._nothing_known(n)
        z = attend.attention_guided_sample(self.denoiser, self.diffusion, captions, steps=steps,
                                           guidance_scale=guidance_scale, seed=seed, shape=self.latent_shape,
                                           model_kwargs=extra, clip=False, **kwargs)
        return self.decode(z).clamp(-1.0, 1.0).float().cpu() if decode else z

    # -- saving -----------------------------------------------------------------------------------
    def asset_config(self) -> Dict[str, Any]:
        """What an exported LDM's config.json holds beside ``train``/``unet``/``conditioner``:
        ``{"ldm": {...}, "autoencoder": AutoencoderConfig dict}``. Lesson: 08_latent_diffusion."""
        return {"ldm": {"scale_factor": self.scale_factor, "spatial": self.spatial, "num_classes": self.num_classes},
                "autoencoder": self.autoencoder.config.to_dict()}


def build_latent_diffusion(autoencoder: Autoencoder, scale_factor: float, unet_config: UNetConfig,
                           conditioner_config: Optional[ConditionerConfig] = None, schedule: str = "scaled_linear",
                           T: int = 1000, spatial: str = "none", num_classes: int = 0) -> LatentDiffusion:
    """A fresh LDM around a (trained) autoencoder: the denoiser from its configurations, the diffusion
    process (no clipping). Lesson: 08_latent_diffusion."""
    denoiser = build_model(unet_config, conditioner_config)
    if not isinstance(denoiser, ConditionalDenoiser):
        denoiser = ConditionalDenoiser(denoiser)
    return LatentDiffusion(autoencoder, denoiser, GaussianDiffusion(schedule, T, clip_x0=False), scale_factor,
                           spatial, num_classes)


LATENT_FIXED = ("image_size", "in_channels", "out_channels")  # U-Net settings that a latent space fixes


def latent_unet_config(autoencoder_config: AutoencoderConfig, spatial: str = "none", num_classes: int = 0,
                       **unet: Any) -> UNetConfig:
    """The U-Net configuration for latents of this autoencoder: image size H/f, out_channels c, in_channels
    c + the spatial condition's channels; other settings from ``unet``. Lesson: 08_latent_diffusion."""
    c, h, _ = autoencoder_config.latent_shape
    fixed = sorted(set(LATENT_FIXED) & set(unet))
    if fixed:
        raise ValueError(f"{', '.join(fixed)} of a latent U-Net follow from the autoencoder and the spatial condition; "
                         f"leave them out")
    return UNetConfig(image_size=h, in_channels=c + spatial_channels(spatial, c, num_classes), out_channels=c, **unet)


def load_latent_diffusion(name: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
                          ) -> Tuple[LatentDiffusion, Dict[str, Any]]:
    """A shipped latent diffusion model by name (or an exported folder by path): ``(LatentDiffusion in eval
    mode, config dict)``, the autoencoder's weights included. Lesson: 08_latent_diffusion."""
    state, config = read_asset(name, "ldm")
    return latent_diffusion_from(state, config, device), config


def latent_diffusion_from(state: Dict[str, torch.Tensor], config: Dict[str, Any],
                          device: Optional[Union[str, torch.device]] = None) -> LatentDiffusion:
    """A :class:`LatentDiffusion` from its weights (``autoencoder.*``, ``denoiser.*``) and config dict
    (``ldm``, ``autoencoder``, ``unet``, ``train``, optionally ``conditioner``). Without ``autoencoder.*``
    weights, the autoencoder is the shipped one that ``ldm.autoencoder_asset`` names, checked against the
    SHA-256 recorded at export. Lesson: 08_latent_diffusion."""
    ldm, train = config["ldm"], config["train"]
    if not any(k.startswith("autoencoder.") for k in state):
        name = ldm.get("autoencoder_asset")
        if not name:
            raise ValueError("this latent diffusion model holds no autoencoder weights and names no shipped one")
        if asset_sha256(name) != ldm.get("autoencoder_sha256"):
            raise ValueError(f"the shipped autoencoder {name!r} is not the one this latent model was trained on (its "
                             f"weights changed since); retrain the latent model on it, or restore the autoencoder")
        state = {**state, **{f"autoencoder.{k}": v for k, v in read_asset(name, "autoencoder")[0].items()}}
    cc = config.get("conditioner")
    model = build_latent_diffusion(Autoencoder(AutoencoderConfig.from_dict(config["autoencoder"])),
                                   ldm["scale_factor"], UNetConfig.from_dict(config["unet"]),
                                   ConditionerConfig.from_dict(cc) if cc else None, train["schedule"], train["T"],
                                   ldm["spatial"], ldm["num_classes"])
    model.load_state_dict(state)
    return model.to(torch.device(device) if device is not None else get_device()).eval().requires_grad_(False)


__all__: Sequence[str] = (
    "LATENT_FIXED", "SPATIAL", "LatentDiffusion", "blend_known", "box_keep_masks", "build_latent_diffusion",
    "encode_images", "inpaint_combine", "inpaint_condition", "keep_mask_to_latent", "latent_diffusion_from",
    "latent_unet_config", "load_latent_diffusion", "masked_psnr", "random_keep_masks", "semantic_condition",
    "spatial_channels")
