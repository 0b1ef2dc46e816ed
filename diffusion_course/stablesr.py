"""StableSR: super-resolution with a frozen diffusion prior steered by a time-aware encoder and SFT.

Taught in lesson 09_stablesr. StableSR (Wang et al., 2023, "Exploiting Diffusion Prior for Real-World Image
Super-Resolution") keeps Stable Diffusion's U-Net frozen and trains only two small parts: a time-aware
encoder that reads the low-resolution (LR) image at the current step t, and the networks M_theta^n that turn
its features into a scale and shift for the U-Net's feature maps:

    F^n              = EncoderUNetModelWT(c_LR, t)[n]           c_LR: the LR image brought to the prior's space
    (alpha^n, beta^n) = M_theta^n(F^n)
    F_hat^n          = (1 + alpha^n) * F_dif^n + beta^n          in every residual block of the U-Net

Sampling starts from noise and runs the prior's sampler with the steered U-Net, so every step sees the LR
image. Here the prior is one of this package's own models of the high-resolution domain: a pixel DDPM
(what a CPU can train) or a latent diffusion model of lesson 08, whose frozen autoencoder then maps the
bicubic-upsampled LR image into latent space as StableSR does with Stable Diffusion's VAE.

Beside it, :class:`ConcatSR` is the plain conditional baseline (SR3, Saharia et al., 2021): a whole U-Net
of the prior's size trained from scratch with the upsampled LR image concatenated to its input.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import Autoencoder
from .ddpm import GaussianDiffusion
from .degradations import upsample
from .nn import UNet, UNetConfig
from .nn.encoder import EncoderUNetModelWT, TimeAwareEncoderConfig
from .pretrained import ASSETS, asset_sha256, available, load_pretrained, read_asset

KINDS = ("stablesr", "concat")


class SRDiffusion(nn.Module):
    """What both super-resolution models share: the diffusion process, the optional frozen autoencoder (a
    latent prior) with its scale factor, the way the LR image enters, the loss and the sampler. A subclass
    defines :meth:`eps` and :meth:`trainable_parameters`. Images are in [-1, 1]. Lesson: 09_stablesr.
    """

    kind = ""

    def __init__(self, diffusion: GaussianDiffusion, scale: int = 4, autoencoder: Optional[Autoencoder] = None,
                 scale_factor: float = 1.0) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"the super-resolution factor must be >= 1, got {scale}")
        if autoencoder is not None and diffusion.clip_x0:
            raise ValueError("a latent prior's latents are not in [-1, 1]: its GaussianDiffusion needs clip_x0=False")
        self.diffusion, self.scale, self.scale_factor = diffusion, int(scale), float(scale_factor)
        self.autoencoder = autoencoder.requires_grad_(False).eval() if autoencoder is not None else None

    def train(self, mode: bool = True) -> "SRDiffusion":
        """Train mode for the trained parts; a frozen autoencoder stays in eval mode. Lesson: 09_stablesr."""
        super().train(mode)
        if self.autoencoder is not None:
            self.autoencoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- the prior's space ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """High-resolution images ``(B, C, H, W)`` -> the prior's x_0: the images themselves (pixel prior)
        or z_0 = s E(x) (latent prior). Lesson: 09_stablesr."""
        x = x.to(self.device)
        return x if self.autoencoder is None else self.autoencoder.encode(x) * self.scale_factor

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The prior's x_0 -> images in [-1, 1] (``D(z_0 / s)`` for a latent prior). Lesson: 09_stablesr."""
        out = x0 if self.autoencoder is None else self.autoencoder.decode(x0 / self.scale_factor)
        return out.clamp(-1.0, 1.0)

    def lr_input(self, lr: torch.Tensor) -> torch.Tensor:
        """c_LR: the LR image ``(B, C, H/scale, W/scale)`` upsampled (bicubic) to the high resolution and
        brought to the prior's space, ``(B, c, h, w)`` like x_t. Lesson: 09_stablesr."""
        if lr.ndim != 4:
            raise ValueError(f"the low-resolution images must be (B, C, h, w), got shape {tuple(lr.shape)}")
        return self.encode(upsample(lr.to(self.device), self.scale))

    # -- the model ---------------------------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, c_lr: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t, c_LR) ``(B, c, h, w)``. Lesson: 09_stablesr."""
        raise NotImplementedError

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters training updates. Lesson: 09_stablesr."""
        raise NotImplementedError

    def parameter_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups, each ``{"name": ..., "params": [...]}``; together exactly
        :meth:`trainable_parameters`. Lesson: 09_stablesr."""
        return [{"name": self.kind, "params": self.trainable_parameters()}]

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The trained weights by name (what a checkpoint or an asset of this model holds beside its prior).
        Lesson: 09_stablesr."""
        ids = {id(p) for p in self.trainable_parameters()}
        return {name: p.detach() for name, p in self.named_parameters() if id(p) in ids}

    def loss(self, hr: torch.Tensor, lr: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The L_simple of the prior, conditioned on the LR image: E_{t, eps} ||eps - eps_theta(x_t, t, c_LR)||^2
        with x_0 the prior's encoding of ``hr`` ``(B, C, H, W)`` and ``lr`` its degraded version. Lesson: 09_stablesr."""
        x0, c_lr = self.encode(hr), self.lr_input(lr)
        if c_lr.shape != x0.shape:
            raise ValueError(f"the upsampled LR image {tuple(c_lr.shape)} does not match the HR image's "
                             f"{tuple(x0.shape)}: LR images must be the HR size divided by scale = {self.scale}")
        t = self.diffusion.sample_t(x0.shape[0], x0.device, generator)
        noise = self.diffusion._randn(x0.shape, like=x0, generator=generator)
        x_t = self.diffusion.q_sample(x0, t, noise)
        return F.mse_loss(self.eps(x_t, t, c_lr), noise)

    @torch.no_grad()
    def sample(self, lr: torch.Tensor, steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
               generator: Optional[torch.Generator] = None, progress: bool = False,
               x_T: Optional[torch.Tensor] = None, start_t: Optional[int] = None,
               ilvr: Optional[int] = None) -> torch.Tensor:
        """Super-resolve ``lr`` ``(B, C, h, w)``: start from noise and run DDIM (``steps`` calls) or DDPM
        (all T) with the LR-steered model; returns images ``(B, C, h * scale, w * scale)`` in [-1, 1].

        ``start_t`` (DDIM only) starts instead from x_k ~ q(x_k | c_LR) at step index k = ``start_t``, the
        upsampled LR image noised to step k, and runs DDIM from there (SDEdit, Meng et al., 2022; StableSR's
        own sampling script starts this way at k = T - 1, which keeps a trace of the LR image under Stable
        Diffusion's schedule). A smaller k keeps more of the LR image and leaves less to the model.

        ``ilvr`` (DDIM only; a number of wavelet levels) holds the low frequencies to the LR image at every
        step, as ILVR does (Choi et al., 2021): after each update to step s, the low band of x_s is replaced by
        that of a fresh draw y_s ~ q(y_s | c_LR) (at the end, by that of c_LR itself), so
        ``x_s = high(x_s) + low(y_s)`` with :func:`wavelet_split`. ILVR's low-pass is "shrink by N, enlarge by
        N"; the a-trous blur used here is the same idea, and the one the wavelet colour fix uses.
        Lesson: 09_stablesr."""
        if ilvr is not None and (isinstance(ilvr, bool) or not isinstance(ilvr, int) or ilvr < 1):
            raise ValueError(f"ilvr is a number of wavelet levels >= 1 (or None), got {ilvr!r}")
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        if sampler != "ddim" and (start_t is not None or ilvr is not None):
            raise ValueError("start_t and ilvr work with the DDIM sampler")
        was_training = self.training
        self.eval()
        c_lr = self.lr_input(lr)
        model = lambda x, t: self.eps(x, t, c_lr)  # noqa: E731
        shape = tuple(c_lr.shape)
        if start_t is not None or ilvr is not None:
            if start_t is not None:
                if x_T is not None:
                    raise ValueError("start_t starts from the noised LR image: give start_t or x_T, not both")
                if not 0 <= start_t < self.diffusion.T:
                    raise ValueError(f"start_t must be a step index in [0, {self.diffusion.T - 1}], got {start_t}")
                x = self.diffusion.q_sample(c_lr, start_t, self.diffusion._randn(shape, like=c_lr, generator=generator))
                seq = start_grid(start_t, steps)
            else:
                x = self.diffusion._start(model, shape, x_T, generator, self.device)
                seq = self.diffusion.ddim_timesteps(steps)
            for k, t in enumerate(seq):
                t_prev = seq[k + 1] if k + 1 < len(seq) else -1
                x = self.diffusion.ddim_step(model, x, t, t_prev, eta, generator=generator)
                if ilvr is not None:
                    noise = self.diffusion._randn(shape, like=c_lr, generator=generator) if t_prev >= 0 else None
                    x = ilvr_swap(x, c_lr, t_prev, ilvr, self.diffusion, noise)
            x0 = x
        elif sampler == "ddim":
            x0 = self.diffusion.ddim_sample(model, shape, steps, eta, x_T=x_T, generator=generator,
                                            device=self.device, progress=progress)
        else:
            x0 = self.diffusion.sample(model, shape, x_T=x_T, generator=generator, device=self.device,
                                       progress=progress)
        self.train(was_training)
        return self.decode(x0)


class StableSR(SRDiffusion):
    """The frozen prior's U-Net with an SFT layer in every residual block, steered by the time-aware
    encoder: ``eps(x_t, t, c_LR) = unet(x_t, t, struct_cond=encoder(c_LR, t_enc))`` where t_enc = t
    (time-aware) or the fixed ``fixed_t`` (a time-agnostic encoder, for comparison). Only the encoder and
    the SFT layers train; the prior's weights never change. Lesson: 09_stablesr.
    """

    kind = "stablesr"

    def __init__(self, unet: UNet, encoder: EncoderUNetModelWT, diffusion: GaussianDiffusion, scale: int = 4,
                 time_aware: bool = True, fixed_t: int = 0, autoencoder: Optional[Autoencoder] = None,
                 scale_factor: float = 1.0) -> None:
        super().__init__(diffusion, scale, autoencoder, scale_factor)
        u, e = unet.config, encoder.config
        if not u.sft_channels:
            raise ValueError("the U-Net has no SFT layers: build it with UNetConfig(sft_channels=...)")
        if e.out_channels != u.sft_channels:
            raise ValueError(f"the encoder's out_channels ({e.out_channels}) must equal the U-Net's sft_channels "
                             f"({u.sft_channels})")
        if (e.image_size, e.in_channels) != (u.image_size, u.out_channels):
            raise ValueError(f"the encoder reads c_LR in the prior's space: it needs image_size {u.image_size} and "
                             f"in_channels {u.out_channels}, it has {e.image_size} and {e.in_channels}")
        if encoder.resolutions() != unet.sft_resolutions():
            raise ValueError(f"the encoder returns features at {encoder.resolutions()} but the U-Net works at "
                             f"{unet.sft_resolutions()}: give the encoder as many levels as the U-Net "
                             f"(len(channel_mult) = {len(u.channel_mult)})")
        if not 0 <= fixed_t < diffusion.T:
            raise ValueError(f"fixed_t must be a step index in [0, {diffusion.T - 1}], got {fixed_t}")
        self.unet, self.encoder = unet, encoder
        self.time_aware, self.fixed_t = bool(time_aware), int(fixed_t)
        sft = {id(p) for p in unet.sft_parameters()}
        for p in unet.parameters():
            if id(p) not in sft:
                p.requires_grad_(False)  # the prior is frozen

    def struct_cond(self, c_lr: torch.Tensor, t: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The encoder's features of c_LR at step t (or at ``fixed_t`` when time-agnostic), keyed by
        resolution: ``{"32": (B, sft_channels, 32, 32), ...}``. Lesson: 09_stablesr."""
        t_enc = t if self.time_aware else torch.full_like(t, self.fixed_t)
        return self.encoder(c_lr, t_enc)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, c_lr: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, struct_cond=self.struct_cond(c_lr, t))

    def prior_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The frozen prior's own prediction (no steering). Lesson: 09_stablesr."""
        return self.unet(x_t, t)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return list(self.encoder.parameters()) + self.unet.sft_parameters()

    def parameter_groups(self) -> List[Dict[str, Any]]:
        return [{"name": "time-aware encoder", "params": list(self.encoder.parameters())},
                {"name": "SFT layers", "params": self.unet.sft_parameters()}]


class ConcatSR(SRDiffusion):
    """The SR3-style baseline: ``eps(x_t, t, c_LR) = unet(concat(x_t, c_LR), t)``, a U-Net with twice the
    prior's input channels, every weight trained. Lesson: 09_stablesr."""

    kind = "concat"

    def __init__(self, unet: UNet, diffusion: GaussianDiffusion, scale: int = 4,
                 autoencoder: Optional[Autoencoder] = None, scale_factor: float = 1.0) -> None:
        super().__init__(diffusion, scale, autoencoder, scale_factor)
        u = unet.config
        if u.in_channels != 2 * u.out_channels:
            raise ValueError(f"the baseline's U-Net reads x_t and c_LR side by side: in_channels must be "
                             f"2 x out_channels = {2 * u.out_channels}, got {u.in_channels}")
        self.unet = unet

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, c_lr: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x_t, c_lr], dim=1), t)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return list(self.unet.parameters())


# -- building ---------------------------------------------------------------------------------------------
def encoder_config_for(unet_config: UNetConfig, model_channels: int = 32, out_channels: int = 64,
                       channel_mult: Optional[Sequence[int]] = None, num_res_blocks: int = 1,
                       attention_resolutions: Optional[Sequence[int]] = None, norm_groups: Optional[int] = None,
                       num_heads: int = 4) -> TimeAwareEncoderConfig:
    """A time-aware encoder that fits a prior's U-Net: it reads c_LR in the prior's space (its image size and
    channels) and has one level per U-Net level, so its features land on every resolution the U-Net works at.
    ``channel_mult`` defaults to the U-Net's, the attention to its deepest level. Lesson: 09_stablesr."""
    u = unet_config
    mult = tuple(channel_mult) if channel_mult is not None else tuple(u.channel_mult)
    if len(mult) != len(u.channel_mult):
        raise ValueError(f"the encoder needs one level per U-Net level: channel_mult of length {len(u.channel_mult)}, "
                         f"got {mult}")
    attention = (tuple(attention_resolutions) if attention_resolutions is not None
                 else (2 ** (len(mult) - 1),))
    return TimeAwareEncoderConfig(image_size=u.image_size, in_channels=u.out_channels, model_channels=model_channels,
                                  out_channels=out_channels, channel_mult=mult, num_res_blocks=num_res_blocks,
                                  attention_resolutions=attention, num_heads=num_heads,
                                  norm_groups=norm_groups or u.norm_groups)


def build_stablesr(prior: UNet, diffusion: GaussianDiffusion, encoder_config: TimeAwareEncoderConfig,
                   sft_hidden: int = 64, scale: int = 4, time_aware: bool = True, fixed_t: int = 0,
                   autoencoder: Optional[Autoencoder] = None, scale_factor: float = 1.0) -> StableSR:
    """StableSR around a trained prior U-Net: a copy of it with SFT layers (``sft_channels`` = the encoder's
    ``out_channels``) carrying the prior's weights, frozen, and a fresh encoder. The result starts as exactly
    the prior (every SFT layer is the identity). Lesson: 09_stablesr."""
    if not isinstance(prior, UNet):
        raise TypeError(f"the prior must be an unconditional UNet (got {type(prior).__name__}); a conditional "
                        f"prior's cross-attention would need its condition at every step")
    if prior.config.sft_channels:
        raise ValueError("the prior already has SFT layers; pass the plain prior U-Net")
    if prior.config.context_dim is not None:
        raise ValueError("the prior must be unconditional (context_dim None)")
    unet = UNet(replace(prior.config, sft_channels=encoder_config.out_channels, sft_hidden=sft_hidden))
    missing, unexpected = unet.load_state_dict(prior.state_dict(), strict=False)
    if unexpected or any(".sft." not in k for k in missing):
        raise RuntimeError(f"the prior's weights do not fit its SFT copy: missing {missing}, unexpected {unexpected}")
    unet = unet.to(next(prior.parameters()).device)
    encoder = EncoderUNetModelWT(encoder_config).to(next(prior.parameters()).device)
    return StableSR(unet, encoder, diffusion, scale, time_aware, fixed_t, autoencoder, scale_factor)


def build_concat_sr(prior_config: UNetConfig, diffusion: GaussianDiffusion, scale: int = 4,
                    autoencoder: Optional[Autoencoder] = None, scale_factor: float = 1.0) -> ConcatSR:
    """The SR3-style baseline of the prior's size: the prior's U-Net configuration with ``in_channels``
    doubled (x_t and c_LR), fresh weights. Lesson: 09_stablesr."""
    config = replace(prior_config, in_channels=2 * prior_config.out_channels, sft_channels=0)
    return ConcatSR(UNet(config), diffusion, scale, autoencoder, scale_factor)


def load_prior(name: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
               ) -> Tuple[UNet, GaussianDiffusion, Optional[Autoencoder], float, Dict[str, Any]]:
    """A shipped (or exported) unconditional prior by name: ``(U-Net, diffusion, autoencoder or None,
    scale factor, config dict)``. A pixel DDPM asset has no autoencoder; a latent diffusion asset (lesson 08)
    brings its frozen autoencoder and scale factor. Lesson: 09_stablesr."""
    from .ldm import load_latent_diffusion

    if "ldm" in _asset_config(name):
        ldm, config = load_latent_diffusion(name, device)
        if ldm.spatial != "none" or ldm.denoiser.conditioner is not None:
            raise ValueError(f"{name} is a conditional latent model; StableSR needs an unconditional prior")
        return ldm.denoiser.unet, ldm.diffusion, ldm.autoencoder, ldm.scale_factor, config
    unet, diffusion, config = load_pretrained(name, device)
    if not isinstance(unet, UNet):
        raise ValueError(f"{name} is a conditional model; StableSR needs an unconditional prior")
    return unet, diffusion, None, 1.0, config


def _asset_config(name: Union[str, os.PathLike]) -> Dict[str, Any]:
    folder = Path(name) if Path(name).is_dir() else ASSETS / str(name)
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"no shipped prior {str(name)!r}; pixel priors: {', '.join(available('unet'))}; latent "
                         f"priors: {', '.join(available('ldm'))}")
    return json.loads(path.read_text())


def build_sr(prior: Union[str, os.PathLike], kind: str = "stablesr", encoder: Optional[Dict[str, Any]] = None,
             sft_hidden: int = 64, scale: int = 4, time_aware: bool = True, fixed_t: int = 0,
             device: Optional[Union[str, torch.device]] = None) -> SRDiffusion:
    """A super-resolution model of ``kind`` (``"stablesr"`` or ``"concat"``) on a shipped prior named
    ``prior``, its trained parts fresh: StableSR on the frozen prior with a time-aware encoder of the
    :func:`encoder_config_for` options in ``encoder``, or the SR3-style baseline of the prior's size.
    Lesson: 09_stablesr."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    unet, diffusion, autoencoder, scale_factor, _ = load_prior(prior, device)
    if kind == "concat":
        model: SRDiffusion = build_concat_sr(unet.config, diffusion, scale, autoencoder, scale_factor)
    else:
        model = build_stablesr(unet.requires_grad_(False), diffusion, encoder_config_for(unet.config, **(encoder or {})),
                               sft_hidden, scale, time_aware, fixed_t, autoencoder, scale_factor)
    return model.to(next(unet.parameters()).device)


def sr_config(model: SRDiffusion, prior: Union[str, os.PathLike]) -> Dict[str, Any]:
    """What rebuilds ``model`` (with :func:`sr_from_config`): ``{"sr": {kind, prior, prior_sha256, scale,
    ...}, "unet": ..., "encoder": ...}``. The prior is named, with the SHA-256 of its weights. Lesson: 09_stablesr."""
    sr: Dict[str, Any] = {"kind": model.kind, "prior": str(prior), "prior_sha256": asset_sha256(prior),
                          "scale": model.scale}
    out: Dict[str, Any] = {"sr": sr, "unet": model.unet.config.to_dict()}
    if isinstance(model, StableSR):
        sr.update(time_aware=model.time_aware, fixed_t=model.fixed_t, sft_hidden=model.unet.config.sft_hidden)
        out["encoder"] = model.encoder.config.to_dict()
    return out


def sr_from_config(config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None) -> SRDiffusion:
    """A super-resolution model from :func:`sr_config`'s dict, on its shipped prior (checked against the
    recorded SHA-256), its trained parts fresh. Lesson: 09_stablesr."""
    sr = config["sr"]
    if asset_sha256(sr["prior"]) != sr["prior_sha256"]:
        raise ValueError(f"the prior {sr['prior']!r} is not the one this super-resolution model was trained on "
                         f"(its weights changed since); retrain the model on it, or restore the prior")
    unet, diffusion, autoencoder, scale_factor, _ = load_prior(sr["prior"], device)
    if sr["kind"] == "concat":
        model: SRDiffusion = ConcatSR(UNet(UNetConfig.from_dict(config["unet"])), diffusion, sr["scale"],
                                      autoencoder, scale_factor)
    else:
        encoder = TimeAwareEncoderConfig.from_dict(config["encoder"])
        model = build_stablesr(unet, diffusion, encoder, sr["sft_hidden"], sr["scale"], sr["time_aware"],
                               sr["fixed_t"], autoencoder, scale_factor)
        if model.unet.config.to_dict() != config["unet"]:
            raise ValueError("the recorded U-Net configuration differs from the prior's with SFT layers")
    return model.to(next(unet.parameters()).device)


def load_trainable(model: SRDiffusion, state: Dict[str, torch.Tensor]) -> SRDiffusion:
    """Put trained weights (:meth:`SRDiffusion.trainable_state_dict` names) into ``model``; every trained
    weight must be there and nothing else. Lesson: 09_stablesr."""
    want = model.trainable_state_dict()
    if set(state) != set(want):
        extra, lacking = sorted(set(state) - set(want)), sorted(set(want) - set(state))
        raise ValueError(f"these weights do not fit this model: unexpected {extra[:5]}, missing {lacking[:5]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in state.items():
            if params[k].shape != v.shape:
                raise ValueError(f"weight {k} has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)}")
            params[k].copy_(v.to(params[k].dtype))
    return model


def load_sr(name: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
            ) -> Tuple[SRDiffusion, Dict[str, Any]]:
    """A shipped super-resolution model by name (or an exported folder by path): ``(model in eval mode,
    config dict)``; its prior is the shipped one it names. Lesson: 09_stablesr."""
    state, config = read_asset(name, "sr")
    model = load_trainable(sr_from_config(config, device), state)
    return model.eval().requires_grad_(False), config


def wavelet_split(x: torch.Tensor, levels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split images ``x`` ``(B, C, H, W)`` into (high, low) frequencies with ``high + low == x``: ``low`` is ``x``
    blurred ``levels`` times by the 3x3 binomial kernel [1, 2, 1]^T [1, 2, 1] / 16 with its taps 1, 2, 4, ...
    pixels apart (the "a trous" wavelet transform, as in StableSR's wavelet colour fix); level i removes the
    detail of period about 2^(i+1) pixels. Borders are replicated. Lesson: 09_stablesr."""
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    c = x.shape[1]
    k = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k[:, None] * k[None, :] / 16).expand(c, 1, 3, 3)
    low = x
    for i in range(levels):
        d = 2 ** i
        low = F.conv2d(F.pad(low, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=c)
    return x - low, low


def start_grid(start_t: int, steps: int) -> List[int]:
    """The step indices DDIM visits from ``start_t`` down to 0 with at most ``steps`` calls, evenly spread and in
    decreasing order (repeats merged): the grid of :meth:`SRDiffusion.sample` with ``start_t``. Lesson: 09_stablesr."""
    return sorted({int(round(v)) for v in torch.linspace(0, start_t, steps).tolist()}, reverse=True)


def ilvr_swap(x: torch.Tensor, c_lr: torch.Tensor, t: int, levels: int, diffusion: GaussianDiffusion,
              noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ILVR's step (Choi et al., 2021) for a state ``x`` ``(B, c, h, w)`` just reached at step index ``t``
    (``-1``: x_0): the high band of ``x`` plus the low band of y_t ~ q(y_t | c_LR), that is
    ``sqrt(abar_t) c_lr + sqrt(1 - abar_t) noise`` (at ``t = -1``, ``c_lr`` itself), split by
    :func:`wavelet_split` with ``levels``. :meth:`SRDiffusion.sample` applies it after every step when given
    ``ilvr=levels``. Lesson: 09_stablesr."""
    if x.shape != c_lr.shape:
        raise ValueError(f"the state {tuple(x.shape)} and c_LR {tuple(c_lr.shape)} differ in shape")
    if t < 0:
        y = c_lr
    elif noise is None:
        raise ValueError(f"at step {t} the swap needs the noise of y_t ~ q(y_t | c_LR); only t = -1 (x_0) takes c_LR "
                         f"as it is")
    else:
        y = diffusion.q_sample(c_lr, t, noise)
    return wavelet_split(x, levels)[0] + wavelet_split(y, levels)[1]


def color_fix(sr: torch.Tensor, reference: torch.Tensor, method: str = "adain", levels: int = 2,
              eps: float = 1e-5) -> torch.Tensor:
    """StableSR's two colour corrections, applied after sampling to super-resolved images ``sr`` ``(B, C, H, W)``
    with ``reference`` the bicubic-upsampled LR image (same shape). Sampling decides an image's colours at the
    noisiest steps, where the eps-loss says least about them; the LR image knows them.

    * ``"adain"``: give each image the per-channel mean and standard deviation of ``reference``, keeping its own
      structure.
    * ``"wavelet"``: keep the high frequencies of ``sr`` and take the low ones from ``reference``
      (:func:`wavelet_split` with ``levels``; 2 for a factor-4 LR image, whose pixels are 4 wide, keeps what the LR
      image knows and what it does not apart).

    Returns ``(B, C, H, W)`` clamped to [-1, 1]. Lesson: 09_stablesr."""
    if sr.shape != reference.shape:
        raise ValueError(f"sr {tuple(sr.shape)} and reference {tuple(reference.shape)} differ in shape")
    if method == "adain":
        mu_s, sd_s = sr.mean((2, 3), keepdim=True), sr.std((2, 3), keepdim=True)
        mu_r, sd_r = reference.mean((2, 3), keepdim=True), reference.std((2, 3), keepdim=True)
        out = (sr - mu_s) / (sd_s + eps) * sd_r + mu_r
    elif method == "wavelet":
        out = wavelet_split(sr, levels)[0] + wavelet_split(reference.to(sr), levels)[1]
    else:
        raise ValueError(f"method must be 'adain' or 'wavelet', got {method!r}")
    return out.clamp(-1.0, 1.0)


def per_image_scores(sr: torch.Tensor, hr: torch.Tensor, perceptual: Optional[nn.Module] = None
                     ) -> Dict[str, torch.Tensor]:
    """:func:`sr_scores` image by image: ``{"psnr": (B,), "ssim": (B,)}`` and, given ``perceptual``,
    ``"perceptual": (B,)``, on the CPU; for paired comparisons of two methods on the same patches.
    Lesson: 09_stablesr."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if sr.shape != hr.shape:
        raise ValueError(f"super-resolved {tuple(sr.shape)} and true {tuple(hr.shape)} images differ in shape")
    sr, hr = sr.detach().float().cpu().clamp(-1, 1), hr.detach().float().cpu()
    mse = (sr - hr).pow(2).flatten(1).mean(1)
    out = {"psnr": 10 * torch.log10(4.0 / mse.clamp_min(1e-12)),
           "ssim": structural_similarity_index_measure(sr, hr, data_range=2.0, reduction="none").reshape(-1)}
    if perceptual is not None:
        with torch.no_grad():
            params = list(perceptual.parameters()) if isinstance(perceptual, nn.Module) else []
            where = params[0].device if params else torch.device("cpu")
            out["perceptual"] = perceptual(sr.to(where), hr.to(where)).detach().float().cpu().reshape(-1)
    return out


def sr_scores(sr: torch.Tensor, hr: torch.Tensor, perceptual: Optional[nn.Module] = None) -> Dict[str, float]:
    """How close super-resolved images ``sr`` are to the truth ``hr`` (both ``(B, C, H, W)`` in [-1, 1]),
    averaged over the batch: ``psnr`` (dB, peak-to-peak range 2), ``ssim`` (torchmetrics' structural
    similarity, range 2) and, given a ``perceptual`` distance module (e.g.
    :class:`~diffusion_course.losses.PerceptualLoss`), ``perceptual`` (lower is better). Lesson: 09_stablesr."""
    return {key: float(v.mean()) for key, v in per_image_scores(sr, hr, perceptual).items()}


__all__: Sequence[str] = (
    "KINDS", "SRDiffusion", "StableSR", "ConcatSR", "encoder_config_for", "build_stablesr", "build_concat_sr",
    "load_prior", "build_sr", "sr_config", "sr_from_config", "load_trainable", "load_sr", "wavelet_split", "start_grid",
    "ilvr_swap", "color_fix", "per_image_scores", "sr_scores")
