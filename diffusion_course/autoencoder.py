"""The autoencoder of latent diffusion: E(x) -> z in R^{c x h x w}, D(z) -> x_tilde, with h = H / f.

Taught in lesson 06_ldm_autoencoder. Two ways to keep the latent space tame (the lecture's "L_reg"):

* **KL-reg.**: the encoder gives a diagonal Gaussian q_E(z|x) = N(mu, sigma^2); z is a draw from it, and a
  very small weight (about 1e-6) on KL(q_E(z|x) || N(0, I)) keeps the latents near the origin without
  hurting the reconstruction (unlike the VAE of lesson 05, where the weight is large).
* **VQ-reg.**: a codebook of K vectors; the decoder first replaces every latent vector by its nearest code
  (vector quantisation, as in VQ-VAE/VQGAN), with straight-through gradients. The quantiser belongs to the
  **decoder**, so the encoder's output z stays continuous, and that continuous z is what a diffusion model
  would learn.

Reductions (kept the same everywhere in this module and in :mod:`diffusion_course.losses`): every loss term
is a **per-image total** (a sum over the pixels, or over the latent elements), **averaged over the batch**.
The KL weight 1e-6 is calibrated against exactly that: a reconstruction summed over pixels.

Layout, with L = len(channel_mult) levels and f = 2 ** (L - 1):

    encoder: conv_in -> per level num_res_blocks ResidualBlocks (+ Downsample but at the last level)
             -> middle (ResidualBlock, AttentionBlock, ResidualBlock) -> GroupNorm -> SiLU
             -> conv to 2c (KL: mean and log-variance) or c (VQ) channels -> 1x1 conv ("quant_conv")
    decoder: (VQ: quantise) -> 1x1 conv ("post_quant_conv") -> conv_in -> middle -> per level, deepest
             first, num_res_blocks + 1 ResidualBlocks (+ Upsample) -> GroupNorm -> SiLU -> conv_out
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .nn.attention import AttentionBlock
from .nn.blocks import Downsample, ResidualBlock, Upsample, group_norm
from .vae import LOGVAR_RANGE, LatentGeometry, kl_to_standard_normal


REGULARIZERS = ("kl", "vq")


@dataclass
class AutoencoderConfig(LatentGeometry):
    """Every choice of the autoencoder. ``channel_mult`` sets the levels and so the down-sampling factor
    f = 2 ** (len(channel_mult) - 1); :meth:`for_factor` builds one for f = 4, 8 or 16. ``regularizer``
    is ``"kl"`` or ``"vq"``; ``n_embed`` is the VQ codebook size K and ``beta`` the commitment weight.
    Lesson: 06_ldm_autoencoder.
    """

    _what = "autoencoder configuration"

    in_channels: int = 3
    image_size: int = 64
    channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    latent_channels: int = 4
    regularizer: str = "kl"
    n_embed: int = 256
    beta: float = 0.25
    attention: bool = True
    norm_groups: int = 8

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {self.regularizer!r}")
        if min(self.in_channels, self.channels, self.num_res_blocks, self.latent_channels, self.n_embed) < 1 \
                or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"invalid autoencoder configuration (every size must be positive): {self}")
        if any(self.channels * m % self.norm_groups for m in self.channel_mult):
            raise ValueError(f"every level's channel count (channels x channel_mult = "
                             f"{[self.channels * m for m in self.channel_mult]}) must be divisible by "
                             f"norm_groups = {self.norm_groups}")
        if self.beta < 0:
            raise ValueError(f"beta (the commitment weight) must be >= 0, got {self.beta}")
        f = self.downsampling_factor
        if self.image_size < f or self.image_size % f:
            raise ValueError(f"image_size {self.image_size} does not fit the down-sampling factor f = {f}: the "
                             f"latent would be {self.image_size / f:g} pixels wide. Use an image size that is a "
                             f"multiple of {f}, or a smaller f (fewer levels in channel_mult)")

    @classmethod
    def for_factor(cls, f: int, **kwargs: Any) -> "AutoencoderConfig":
        """A configuration with down-sampling factor ``f`` (a power of two: 1, 2, 4, 8, 16, ...): channel
        multipliers (1, 2, 2, 4, 4, ...) up to log2(f) + 1 levels. Other fields from ``kwargs``.
        Lesson: 06_ldm_autoencoder."""
        if not isinstance(f, int) or f < 1 or f & (f - 1):
            raise ValueError(f"the down-sampling factor f must be a power of two (4, 8, 16, ...), got {f!r}")
        levels = int(math.log2(f)) + 1
        mult = tuple([1, 2, 2, 4, 4, 4, 4][:levels]) if levels <= 7 else None
        if mult is None:
            raise ValueError(f"f = {f} is larger than this course's autoencoders go (at most 64)")
        return cls(channel_mult=mult, **kwargs)

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        """The shape of one z: ``(c, h, w)`` with h = w = image_size / f (so compression = f^2 C / c)."""
        h = self.image_size // self.downsampling_factor
        return (self.latent_channels, h, h)


# ----------------------------------------------------------------------------------------------
# The two regularisers: a diagonal Gaussian posterior, and a vector quantiser
# ----------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """q_E(z|x) = N(mean, diag exp(logvar)) from the encoder's ``(B, 2c, h, w)`` output (mean first).
    Lesson: 06_ldm_autoencoder."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterisation of lesson 05). Lesson: 06_ldm_autoencoder."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely z, the mean. Lesson: 06_ldm_autoencoder."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over the latent elements: ``(B,)`` nats. Lesson: 06_ldm_autoencoder."""
        return kl_to_standard_normal(self.mean, self.logvar).flatten(1).sum(1)


class Quantized(NamedTuple):
    """The result of :class:`VectorQuantizer`: ``z_q`` (straight-through), ``indices`` ``(B, h, w)``,
    ``codebook_loss`` and ``commitment_loss`` (each ``(B,)``, summed over latent elements), and
    ``perplexity`` and ``usage`` (share of the K codes used) of this batch. Lesson: 06_ldm_autoencoder."""

    z_q: torch.Tensor
    indices: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """For each latent vector of ``z`` ``(B, c, h, w)``, the index of the nearest row of ``codebook``
    ``(K, c)`` in Euclidean distance: ``(B, h, w)`` long. Lesson: 06_ldm_autoencoder."""
    if z.ndim != 4 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code expects z (B, c, h, w) and a codebook (K, c) with the same c; got "
                         f"z {tuple(z.shape)} and codebook {tuple(codebook.shape)}")
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, c)
    # ||a - e||^2 = ||a||^2 - 2 a.e + ||e||^2, without the (N, K, c) difference tensor
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
    return d.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])


class VectorQuantizer(nn.Module):
    """Replace each latent vector by its nearest codebook entry e_k (K entries of c numbers).

    Forward: z ``(B, c, h, w)`` -> :class:`Quantized`. The gradient passes the non-differentiable lookup
    straight through: ``z_q = z + (e - z).detach()`` equals e in value and has d z_q / d z = I. The losses
    follow VQ-VAE (van den Oord et al., 2017):

        codebook   || sg[z] - e ||^2      moves the codes towards the encoder's outputs
        commitment || z - sg[e] ||^2      keeps the encoder close to its codes; ``beta`` (0.25) multiplies it

    (sg = stop-gradient; both summed over the latent elements, per image, like every loss in this module.
    Implementations such as VQGAN's average them over the elements instead, which weighs them differently
    against a summed reconstruction loss; ``codebook_weight`` in :mod:`diffusion_course.losses` sets the balance.)

    With ``data_init=True`` the codebook is set, at the first training batch, to randomly chosen encoder
    outputs of that batch. The usual small uniform initialisation leaves most codes far from every encoder
    output, so they are never chosen and never move ("dead codes"); starting on the data avoids most of
    that. The flag ``initialized`` is a buffer, so checkpoints keep it. Lesson: 06_ldm_autoencoder.
    """

    def __init__(self, n_embed: int, dim: int, beta: float = 0.25, data_init: bool = True) -> None:
        super().__init__()
        self.n_embed, self.dim, self.beta = n_embed, dim, beta
        self.codebook = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / n_embed, 1.0 / n_embed)
        self.register_buffer("initialized", torch.tensor(not data_init))

    @torch.no_grad()
    def init_from(self, z: torch.Tensor) -> None:
        """Set the codebook to K encoder outputs drawn at random from ``z`` ``(B, c, h, w)`` (with replacement
        when there are fewer than K). Lesson: 06_ldm_autoencoder."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        idx = torch.randint(len(flat), (self.n_embed,)) if len(flat) < self.n_embed else torch.randperm(len(flat))[: self.n_embed]
        self.codebook.weight.copy_(flat[idx.to(flat.device)])
        self.initialized.fill_(True)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` -> vectors ``(B, c, h, w)``. Lesson: 06_ldm_autoencoder."""
        return self.codebook(indices).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> Quantized:
        if self.training and not bool(self.initialized):
            self.init_from(z)
        indices = nearest_code(z, self.codebook.weight)
        e = self.lookup(indices)
        codebook_loss = (z.detach() - e).pow(2).flatten(1).sum(1)
        commitment_loss = (z - e.detach()).pow(2).flatten(1).sum(1)
        z_q = z + (e - z).detach()  # straight-through
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
        return Quantized(z_q, indices, codebook_loss, commitment_loss, perplexity, (counts > 0).float().mean())


# ----------------------------------------------------------------------------------------------
# Encoder, decoder, the whole autoencoder
# ----------------------------------------------------------------------------------------------


def _middle(ch: int, c: AutoencoderConfig) -> nn.Sequential:
    attn = AttentionBlock(ch, num_heads=1, norm_groups=c.norm_groups) if c.attention else nn.Identity()
    return nn.Sequential(ResidualBlock(ch, ch, norm_groups=c.norm_groups), attn,
                         ResidualBlock(ch, ch, norm_groups=c.norm_groups))


class AEEncoder(nn.Module):
    """E: ``(B, C, H, W) -> (B, 2c or c, h, w)`` (KL: mean and log-variance; VQ: z). Lesson: 06_ldm_autoencoder."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        c = self.config = config
        ch = c.channels * c.channel_mult[0]
        layers = [nn.Conv2d(c.in_channels, ch, 3, padding=1)]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers.append(ResidualBlock(ch, c.channels * mult, norm_groups=c.norm_groups))
                ch = c.channels * mult
            if level < len(c.channel_mult) - 1:
                layers.append(Downsample(ch))
        out = 2 * c.latent_channels if c.regularizer == "kl" else c.latent_channels
        layers += [_middle(ch, c), group_norm(ch, c.norm_groups), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1),
                   nn.Conv2d(out, out, 1)]  # the last one is LDM's "quant_conv"
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"the autoencoder expects images (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % c.downsampling_factor or x.shape[-2] % c.downsampling_factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the down-sampling factor "
                             f"f = {c.downsampling_factor}; crop or resize to a multiple of {c.downsampling_factor}")
        return self.net(x)


class AEDecoder(nn.Module):
    """D: ``(B, c, h, w) -> (B, C, H, W)``; for VQ it quantises z first (the quantiser is its first layer).
    Lesson: 06_ldm_autoencoder."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        c = self.config = config
        self.quantizer = VectorQuantizer(c.n_embed, c.latent_channels, c.beta) if c.regularizer == "vq" else None
        ch = c.channels * c.channel_mult[-1]
        layers = [nn.Conv2d(c.latent_channels, c.latent_channels, 1),  # LDM's "post_quant_conv"
                  nn.Conv2d(c.latent_channels, ch, 3, padding=1), _middle(ch, c)]
        for level in reversed(range(len(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                layers.append(ResidualBlock(ch, c.channels * c.channel_mult[level], norm_groups=c.norm_groups))
                ch = c.channels * c.channel_mult[level]
            if level > 0:
                layers.append(Upsample(ch))
        layers += [group_norm(ch, c.norm_groups), nn.SiLU(), nn.Conv2d(ch, c.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the final convolution, where the adaptive GAN weight is measured. Lesson: 06_ldm_autoencoder."""
        return self.net[-1].weight

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, Optional[Quantized]]:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"the decoder expects latents (B, {self.config.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        q = self.quantizer(z) if self.quantizer is not None else None
        return self.net(q.z_q if q is not None else z), q


class AEOutput(NamedTuple):
    """What :meth:`Autoencoder.forward` returns: the reconstruction ``x_rec``, the continuous latent ``z``,
    ``reg_loss`` ``(B,)`` (KL in nats, or codebook + beta * commitment) and ``quantized`` (VQ) or
    ``posterior`` (KL), the other None. Lesson: 06_ldm_autoencoder."""

    x_rec: torch.Tensor
    z: torch.Tensor
    reg_loss: torch.Tensor
    posterior: Optional[DiagonalGaussian]
    quantized: Optional[Quantized]


class Autoencoder(nn.Module):
    """The latent-diffusion autoencoder (KL- or VQ-regularised). ``encode`` gives the continuous latent z
    ``(B, c, H/f, W/f)``; ``decode`` turns any such z into an image. Lesson: 06_ldm_autoencoder."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = AEEncoder(config)
        self.decoder = AEDecoder(config)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters. Lesson: 06_ldm_autoencoder."""
        return next(self.parameters()).device

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q_E(z|x) of a KL-regularised autoencoder. Lesson: 06_ldm_autoencoder."""
        if self.config.regularizer != "kl":
            raise ValueError("a VQ-regularised autoencoder has no Gaussian posterior; use encode(x)")
        return DiagonalGaussian(self.encoder(x))

    def encode(self, x: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None
               ) -> torch.Tensor:
        """x ``(B, C, H, W)`` in [-1, 1] -> z ``(B, c, H/f, W/f)``, continuous (KL: the posterior mean, or a
        draw with ``sample=True``; VQ: the encoder output before quantisation). Lesson: 06_ldm_autoencoder."""
        if self.config.regularizer == "kl":
            post = self.posterior(x)
            return post.sample(generator) if sample else post.mode()
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z ``(B, c, h, w)`` -> image ``(B, C, f h, f w)`` (VQ: quantised first). Lesson: 06_ldm_autoencoder."""
        return self.decoder(z)[0]

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> AEOutput:
        if self.config.regularizer == "kl":
            post = self.posterior(x)
            z = post.sample(generator) if sample_posterior else post.mode()
            x_rec, _ = self.decoder(z)
            return AEOutput(x_rec, z, post.kl(), post, None)
        z = self.encoder(x)
        x_rec, q = self.decoder(z)
        return AEOutput(x_rec, z, q.codebook_loss + self.config.beta * q.commitment_loss, None, q)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """D(E(x)) in eval mode with the posterior mean, batch by batch, on the CPU. Lesson: 06_ldm_autoencoder."""
        return _in_batches(self, lambda b: self.decode(self.encode(b)), x, batch_size)


def _in_batches(model: nn.Module, fn: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` over ``x`` batch by batch on the model's device, in eval mode (restored after), results on the CPU."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
    model.train(was)
    return out


@torch.no_grad()
def latent_scale_factor(model: Autoencoder, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the latents z = E(x) over ``images``: multiplying z by it gives latents of unit variance,
    which a diffusion model's noise schedule (built for data of about unit scale) expects. LDM computes it
    the same way from a batch of training data. Lesson: 06_ldm_autoencoder."""
    return 1.0 / _in_batches(model, model.encode, images, batch_size).flatten().std().item()
