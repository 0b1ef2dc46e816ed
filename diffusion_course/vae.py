"""The variational autoencoder (VAE) as a compression module, and the plain autoencoder beside it.

Taught in lesson 05_vae. The lecture's notation:

    encoder   E_phi(x) -> mu(x), log sigma^2(x)       the posterior q_phi(z|x) = N(mu(x), diag sigma^2(x))
    sampling  z = mu + sigma * eps,  eps ~ N(0, I)     (the reparameterisation)
    decoder   D_theta(z) -> x_hat = D(z)
    loss      reconstruction + kl_weight * KL(q_phi(z|x) || N(0, I))

Loss reductions, used everywhere in this module and the lesson:

* reconstruction = squared error **summed over every pixel and channel** of an image, then **averaged
  over the batch**;
* KL = the closed-form KL **summed over every latent dimension**, then **averaged over the batch** (nats
  per image).

Both are per-image totals, so ``kl_weight`` is an exchange rate between one nat of KL and one unit of
summed squared error, whatever the image or latent size. With ``kl_weight = 2 sigma_x^2`` the loss is
``2 sigma_x^2`` times the negative ELBO of a Gaussian decoder p(x|z) = N(x_hat, sigma_x^2 I), up to a
constant. The plain autoencoder is the same network with ``variational=False``: z = mu, no KL.

Layout (L = len(channel_mult) levels, each level but the last halves the resolution):

    encoder: conv_in -> per level num_res_blocks ResidualBlocks (+ Downsample) -> ResidualBlock
             -> GroupNorm -> SiLU -> head giving 2 x latent numbers, split into mu and log sigma^2
    decoder: the mirror image, ending in a convolution to in_channels (no squashing of the output)

The latent is a vector of ``latent_dim`` numbers (a linear head), or, with ``latent_dim=None``, a
spatial map of ``latent_channels`` channels at 1/f of the image size (a convolutional head, as in the
autoencoder of lesson 06).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import random_batches
from .nn.blocks import Downsample, ResidualBlock, Upsample, group_norm
from .utils import ConfigDict


LOGVAR_RANGE = (-30.0, 20.0)  # log sigma^2 is clamped here, so that exp() can neither overflow nor vanish


class LatentGeometry(ConfigDict):
    """What the VAE (lesson 05) and the LDM autoencoder (lesson 06) configurations share: levels set by
    ``channel_mult``, so f = 2 ** (levels - 1), and a ``latent_shape`` defined by each. Lesson: 05_vae."""

    @property
    def downsampling_factor(self) -> int:
        """f = image_size / latent resolution = 2 ** (levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def compression_ratio(self) -> float:
        """Numbers in an image x over numbers in its code z."""
        return self.in_channels * self.image_size ** 2 / math.prod(self.latent_shape)


@dataclass
class VAEConfig(LatentGeometry):
    """Every choice of the VAE. ``latent_dim`` set: a vector latent ``(latent_dim,)``; ``latent_dim=None``:
    a spatial latent ``(latent_channels, image_size / f, image_size / f)`` with f = 2 ** (levels - 1).
    ``variational=False`` makes the plain autoencoder (z = mu, no KL). Lesson: 05_vae.
    """

    in_channels: int = 1
    image_size: int = 16
    channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    latent_dim: Optional[int] = 16
    latent_channels: int = 4
    kl_weight: float = 0.1
    variational: bool = True
    norm_groups: int = 8

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if self.in_channels < 1 or self.channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"invalid VAE configuration: {self}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be at least 1 (the first block of a level sets its channel "
                             f"count), got {self.num_res_blocks}")
        if self.latent_dim is not None and self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int (or None for a spatial latent), got {self.latent_dim}")
        if self.latent_dim is None and self.latent_channels < 1:
            raise ValueError(f"latent_channels must be positive, got {self.latent_channels}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        f = self.downsampling_factor
        if self.image_size < f or self.image_size % f:
            raise ValueError(f"image_size {self.image_size} does not fit the encoder's down-sampling by {f} "
                             f"(2 ** (len(channel_mult) - 1)); use a multiple of {f} or fewer levels in channel_mult")

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        """The shape of one z: ``(latent_dim,)`` or ``(latent_channels, h, w)``."""
        if self.latent_dim is not None:
            return (self.latent_dim,)
        h = self.image_size // self.downsampling_factor
        return (self.latent_channels, h, h)


# ----------------------------------------------------------------------------------------------
# The three formulas: reparameterisation, KL to N(0, I), the loss
# ----------------------------------------------------------------------------------------------


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2) and eps ~ N(0, I) (drawn when not given).

    Every argument has the shape of ``mu``; gradients flow to ``mu`` and ``logvar``, not to ``eps``.
    A ``generator`` (on the CPU) makes the draw repeatable. Lesson: 05_vae.
    """
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
    if eps.shape != mu.shape or logvar.shape != mu.shape:
        raise ValueError(f"reparameterize: mu {tuple(mu.shape)}, logvar {tuple(logvar.shape)} and eps "
                         f"{tuple(eps.shape)} must have the same shape")
    return mu + torch.exp(0.5 * logvar) * eps


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mu, exp(logvar)) || N(0, 1) ) elementwise, in nats: 1/2 (mu^2 + sigma^2 - 1 - log sigma^2).

    For a diagonal posterior q_phi(z|x) the KL to N(0, I) is the sum of these terms over the latent
    dimensions. Same shape as ``mu``. Lesson: 05_vae.
    """
    return 0.5 * (mu ** 2 + torch.exp(logvar) - 1.0 - logvar)


class VAELoss(NamedTuple):
    """The loss and its parts, each a scalar averaged over the batch (``kl_per_dim``: one value per latent
    dimension, or per latent channel summed over positions). Lesson: 05_vae."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over every pixel and channel: ``(B, C, H, W) -> (B,)``. Lesson: 05_vae."""
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    return (x - x_hat).pow(2).flatten(1).sum(1)


def vae_loss(x: torch.Tensor, x_hat: torch.Tensor, mu: Optional[torch.Tensor], logvar: Optional[torch.Tensor],
             kl_weight: float) -> VAELoss:
    """recon + kl_weight * KL with the module's reductions (sums over pixels and over latent dimensions,
    means over the batch). ``mu = logvar = None`` means no KL (the plain autoencoder). Lesson: 05_vae."""
    recon = reconstruction_error(x, x_hat).mean()
    if mu is None:
        kl_per_dim = torch.zeros(1, device=x.device, dtype=x.dtype)
    else:
        kl_el = kl_to_standard_normal(mu, logvar)  # (B, *latent_shape)
        kl_per_dim = kl_el.flatten(2).sum(2).mean(0) if kl_el.ndim > 2 else kl_el.mean(0)
    kl = kl_per_dim.sum()
    return VAELoss(recon + kl_weight * kl, recon, kl, kl_per_dim)


# ----------------------------------------------------------------------------------------------
# The networks E_phi and D_theta
# ----------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """E_phi: ``(B, C, H, W) -> (mu, logvar)``, each ``(B, *latent_shape)``. Lesson: 05_vae."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c = self.config = config
        ch = c.channels * c.channel_mult[0]
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        layers: List[nn.Module] = []
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers.append(ResidualBlock(ch, c.channels * mult, norm_groups=c.norm_groups))
                ch = c.channels * mult
            if level < len(c.channel_mult) - 1:
                layers.append(Downsample(ch))
        layers += [ResidualBlock(ch, ch, norm_groups=c.norm_groups), group_norm(ch, c.norm_groups), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        side = c.image_size // c.downsampling_factor
        if c.latent_dim is not None:
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * side * side, 2 * c.latent_dim))
        else:
            self.head = nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"the encoder expects images (B, {c.in_channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}; check in_channels (1 for grey, 3 for colour)")
        if tuple(x.shape[-2:]) != (c.image_size, c.image_size):
            raise ValueError(f"the encoder was built for {c.image_size}x{c.image_size} images, got "
                             f"{tuple(x.shape[-2:])}; resize the data (get_dataset(..., image_size=...)) or "
                             f"change image_size")
        mu, logvar = self.head(self.body(self.conv_in(x))).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """D_theta: ``(B, *latent_shape) -> x_hat (B, C, H, W)``. Lesson: 05_vae."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c = self.config = config
        ch = c.channels * c.channel_mult[-1]
        self.side = c.image_size // c.downsampling_factor
        if c.latent_dim is not None:
            self.conv_in = nn.Linear(c.latent_dim, ch * self.side * self.side)
        else:
            self.conv_in = nn.Conv2d(c.latent_channels, ch, 3, padding=1)
        layers: List[nn.Module] = [ResidualBlock(ch, ch, norm_groups=c.norm_groups)]
        for level in reversed(range(len(c.channel_mult))):
            for _ in range(c.num_res_blocks):
                layers.append(ResidualBlock(ch, c.channels * c.channel_mult[level], norm_groups=c.norm_groups))
                ch = c.channels * c.channel_mult[level]
            if level > 0:
                layers.append(Upsample(ch))
        layers += [group_norm(ch, c.norm_groups), nn.SiLU(), nn.Conv2d(ch, c.in_channels, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config
        if tuple(z.shape[1:]) != c.latent_shape:
            raise ValueError(f"the decoder expects latents (B, {', '.join(map(str, c.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        h = self.conv_in(z)
        if c.latent_dim is not None:
            h = h.view(z.shape[0], -1, self.side, self.side)
        return self.body(h)


class VAEOutput(NamedTuple):
    """What :meth:`VAE.forward` returns: x_hat = D(z), the posterior's mu and logvar, and z. Lesson: 05_vae."""

    x_hat: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


class VAE(nn.Module):
    """The VAE (or, with ``config.variational=False``, the plain autoencoder): encoder E_phi, decoder
    D_theta. ``forward(x, eps=None, generator=None)`` returns a :class:`VAEOutput` with z drawn from
    q_phi(z|x) (z = mu for the plain autoencoder). Lesson: 05_vae.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters. Lesson: 05_vae."""
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """mu(x), log sigma^2(x), each ``(B, *latent_shape)``. Lesson: 05_vae."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = D(z), ``(B, *latent_shape) -> (B, C, H, W)``. Lesson: 05_vae."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, eps, generator) if self.config.variational else mu
        return VAEOutput(self.decode(z), mu, logvar, z)

    def loss(self, x: torch.Tensor, kl_weight: Optional[float] = None, eps: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> VAELoss:
        """recon + kl_weight * KL for a batch (``kl_weight`` defaults to the config's; the plain autoencoder
        has KL = 0). Reductions as in the module docstring. Lesson: 05_vae."""
        out = self(x, eps, generator)
        w = self.config.kl_weight if kl_weight is None else kl_weight
        if self.config.variational:
            return vae_loss(x, out.x_hat, out.mu, out.logvar, w)
        return vae_loss(x, out.x_hat, None, None, w)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """D(mu(x)): the deterministic reconstruction (the mean of q_phi(z|x)). Lesson: 05_vae."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None, temperature: float = 1.0) -> torch.Tensor:
        """Decode ``n`` draws z ~ N(0, temperature^2 I) from the prior: ``(n, C, H, W)``. Lesson: 05_vae."""
        z = torch.randn((n,) + self.config.latent_shape, generator=generator) * temperature
        return self.decode(z.to(self.device))

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decode the straight line from mu(x_a) to mu(x_b) at ``steps`` points: single images
        ``(C, H, W)`` in, ``(steps, C, H, W)`` out. Lesson: 05_vae."""
        mu = self.encode(torch.stack([x_a, x_b]).to(self.device))[0]
        t = torch.linspace(0, 1, steps, device=mu.device).view(-1, *[1] * (mu.ndim - 1))
        return self.decode((1 - t) * mu[:1] + t * mu[1:])


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def train_vae(model: VAE, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3,
              kl_weight: Optional[float] = None, device: Optional[torch.device] = None,
              generator: Optional[torch.Generator] = None, progress: bool = True,
              desc: str = "training") -> Dict[str, Any]:
    """Train with Adam on random mini-batches of ``images`` ``(N, C, H, W)`` for ``steps`` steps.

    ``kl_weight`` defaults to ``model.config.kl_weight``. Returns the history: per step ``loss``, ``recon``,
    ``kl`` (lists of floats, batch means as in :func:`vae_loss`) and ``kl_per_dim`` ``(steps, D)``. A NaN or
    inf loss raises ``FloatingPointError``. Lesson: 05_vae.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    device = torch.device(device) if device is not None else model.device
    model.to(device).train()
    images = images.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = random_batches(images, batch_size, generator=generator)
    hist: Dict[str, Any] = {"loss": [], "recon": [], "kl": [], "kl_per_dim": []}
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        out = model.loss(next(batches), kl_weight, generator=generator)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"the loss became {out.loss.item()} at step {step} (recon {out.recon.item():.4g}, "
                                     f"KL {out.kl.item():.4g}); lower the learning rate (now {lr}) or check the "
                                     f"data for NaNs and its range ([-1, 1] expected)")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        hist["loss"].append(out.loss.item())
        hist["recon"].append(out.recon.item())
        hist["kl"].append(out.kl.item())
        hist["kl_per_dim"].append(out.kl_per_dim.detach().cpu())
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3g}", kl=f"{out.kl.item():.3g}")
    hist["kl_per_dim"] = torch.stack(hist["kl_per_dim"])
    model.eval()
    return hist


@torch.no_grad()
def encode_all(model: VAE, images: torch.Tensor, batch_size: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
    """mu and logvar of every image, on the CPU: ``(N, *latent_shape)`` each. Lesson: 05_vae."""
    model.eval()
    parts = [model.encode(images[i:i + batch_size].to(model.device)) for i in range(0, len(images), batch_size)]
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


def reconstruction_quality(x: torch.Tensor, x_hat: torch.Tensor) -> Dict[str, float]:
    """Mean PSNR (dB) and SSIM over a batch of images in [-1, 1] (``x_hat`` is clipped to that range),
    computed by ``skimage.metrics`` with ``data_range=2``. Lesson: 05_vae."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = x.detach().float().cpu().clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    b = x_hat.detach().float().cpu().clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    side = min(a.shape[1:3])
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {a.shape[1]}x{a.shape[2]}")
    win = min(7, side if side % 2 else side - 1)  # skimage's 7x7 window, or the largest odd one that fits
    with np.errstate(divide="ignore"):  # identical images have an infinite PSNR
        psnr = [peak_signal_noise_ratio(p, q, data_range=2.0) for p, q in zip(a, b)]
    ssim = [structural_similarity(p, q, data_range=2.0, channel_axis=-1, win_size=win) for p, q in zip(a, b)]
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}


@torch.no_grad()
def evaluate_vae(model: VAE, images: torch.Tensor, batch_size: int = 512) -> Dict[str, Any]:
    """Rate, distortion and quality on held-out ``images``: ``rate`` (mean KL in nats per image),
    ``distortion`` (mean summed squared error of D(mu)), ``psnr``, ``ssim`` (of D(mu)), ``kl_per_dim``
    (mean KL of each latent dimension, a tensor) and ``active_dims`` (those above 0.01 nats).
    Lesson: 05_vae."""
    mu, logvar = encode_all(model, images, batch_size)
    x_hat = torch.cat([model.decode(mu[i:i + batch_size].to(model.device)).cpu()
                       for i in range(0, len(mu), batch_size)])
    kl_el = kl_to_standard_normal(mu, logvar) if model.config.variational else torch.zeros_like(mu)
    kl_per_dim = kl_el.flatten(2).sum(2).mean(0) if kl_el.ndim > 2 else kl_el.mean(0)
    return {"rate": kl_per_dim.sum().item(), "distortion": reconstruction_error(images, x_hat).mean().item(),
            **reconstruction_quality(images, x_hat), "kl_per_dim": kl_per_dim,
            "active_dims": int((kl_per_dim > 0.01).sum())}


def rate_distortion(mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
                    active_threshold: float = 0.01) -> Dict[str, Any]:
    """The bookkeeping of a rate-distortion point from held-out images: the encoder's ``mu`` and ``logvar``
    ``(N, D)``, the images ``x`` and their reconstructions ``x_hat = D(mu(x))`` ``(N, C, H, W)``. Returns

    * ``kl_per_dim`` ``(D,)``: the KL of each code dimension, averaged over the images (nats);
    * ``rate_nats``: R, their sum, the mean KL per image; ``rate_bits``: R / ln 2;
    * ``bits_per_value``: rate_bits / (C H W), the bits the code spends per pixel value;
    * ``active_dims``: how many dimensions have a KL above ``active_threshold`` nats (an int);
    * ``distortion``: Dist, the squared error summed over each image, averaged over the images;
    * ``distortion_per_value``: Dist / (C H W), the mean squared error per pixel value.

    Lesson: 05_vae."""
    if mu.ndim != 2 or mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must both be (N, D), got {tuple(mu.shape)} and {tuple(logvar.shape)}")
    if x.shape != x_hat.shape or len(x) != len(mu):
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must match, with one code per image "
                         f"({len(mu)} codes)")
    kl_per_dim = kl_to_standard_normal(mu, logvar).mean(0)
    rate = kl_per_dim.sum()
    n_values = x[0].numel()
    distortion = reconstruction_error(x, x_hat).mean()
    return {"kl_per_dim": kl_per_dim, "rate_nats": rate.item(), "rate_bits": rate.item() / math.log(2),
            "bits_per_value": rate.item() / math.log(2) / n_values,
            "active_dims": int((kl_per_dim > active_threshold).sum()),
            "distortion": distortion.item(), "distortion_per_value": distortion.item() / n_values}
