"""The losses of the latent-diffusion autoencoder: pixel, perceptual, PatchGAN adversarial, and L_AE.

Taught in lesson 06_ldm_autoencoder. The lecture's objective,

    L_AE = min_{E,D} max_psi [ L_rec(x, D(E(x))) - L_adv(D(E(x))) + log D_psi(x) + L_reg(x; E, D) ],

is trained as two alternating minimisations, with the hinge form of the GAN game:

    autoencoder:    L_rec + L_reg + lambda * disc_factor * L_G,      L_G = -mean D_psi(x_rec)
    discriminator:  disc_factor * 1/2 [ mean relu(1 - D_psi(x)) + mean relu(1 + D_psi(x_rec)) ]

where D_psi is a PatchGAN (one real/fake logit per image patch), ``disc_factor`` is 0 before the
discriminator's start step (the autoencoder first learns to reconstruct) and 1 after, and lambda is the
**adaptive weight** of VQGAN (Esser et al., 2021): the ratio of the gradient norms of L_rec and L_G at the
decoder's last layer, so that neither term drowns the other.

Reductions, as in :mod:`diffusion_course.autoencoder`: L_rec and L_reg are per-image totals (sums over pixels
or latent elements) averaged over the batch. L_rec = sum |x - x_rec| + perceptual_weight * (C H W) * d_perc,
i.e. the per-image perceptual distance counts once per pixel, like the L1 term (LDM adds it to every pixel
the same way); L_reg = kl_weight * KL (kl_weight about 1e-6, calibrated for exactly this summed L_rec) or
codebook + beta * commitment (VQ).
"""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path
from typing import Dict, Iterable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .autoencoder import AEOutput

# torchvision's VGG16 feature indices of the activations LPIPS compares (after each block's last ReLU)
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pixel_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """|x - x_rec| (``"l1"``) or (x - x_rec)^2 (``"l2"``) summed over every pixel and channel: ``(B,)``.
    Lesson: 06_ldm_autoencoder."""
    if x.shape != x_rec.shape:
        raise ValueError(f"x {tuple(x.shape)} and its reconstruction {tuple(x_rec.shape)} differ in shape")
    if kind not in ("l1", "l2"):
        raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
    d = (x - x_rec).abs() if kind == "l1" else (x - x_rec).pow(2)
    return d.flatten(1).sum(1)


def _vgg16_checkpoint() -> Path:
    """Where torchvision keeps its ImageNet VGG16 weights once downloaded (the torch hub cache)."""
    from torchvision.models import VGG16_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_Weights.IMAGENET1K_V1.url).name


class PerceptualLoss(nn.Module):
    """An LPIPS-style distance (Zhang et al., 2018) between images: VGG16 activations at ``layers``,
    each unit-normalised over channels, squared differences summed over channels, averaged over positions,
    summed over layers. LPIPS then weights the channels with a learned linear layer; those weights are not
    part of torchvision, so here every channel weighs 1. ``forward(x, y) -> (B,)``, images in [-1, 1]
    (grey images are repeated to 3 channels). The network is frozen.

    Weights (``source`` says which were used):
    * ``weights_path``: a file with torchvision's VGG16 state dict (safetensors, or ``torch.save``);
    * else ImageNet weights from the torch hub cache if they are there, or downloaded when ``download=True``
      (a failed download falls back to the next line, with a warning);
    * else (offline) a VGG16 with **random** weights from a fixed seed, and a warning. Random convolutions
      still respond to edges and texture at several scales, but this is not LPIPS: its numbers are not
      comparable with published ones (lesson 06 measures how it ranks blur against noise).
    Lesson: 06_ldm_autoencoder.
    """

    def __init__(self, layers: Iterable[str] = tuple(VGG16_LAYERS), weights_path: Optional[Union[str, Path]] = None,
                 download: bool = False, seed: int = 0) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.layers = tuple(layers)
        unknown = set(self.layers) - set(VGG16_LAYERS)
        if not self.layers or unknown:
            raise ValueError(f"unknown VGG16 layers {sorted(unknown)}; choose from {', '.join(VGG16_LAYERS)}")
        features = copy.deepcopy(_random_vgg16_features(seed))  # this instance's own copy
        state, self.source = None, f"random weights (seed {seed}): ImageNet VGG16 weights not found offline"
        cached = _vgg16_checkpoint()
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(f"no VGG16 weights file {str(path)!r}")
            state, self.source = _read_state_dict(path), f"VGG16 weights from {path}"
        elif cached.is_file():
            state, self.source = _read_state_dict(cached), "ImageNet VGG16 (torchvision, from the local cache)"
        elif download:
            from torchvision.models import VGG16_Weights

            try:
                features = vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features
                self.source = "ImageNet VGG16 (torchvision, downloaded)"
            except Exception as e:  # offline, or the download broke off: say so and go on without
                self.source = (f"random weights (seed {seed}): downloading the ImageNet VGG16 weights failed "
                               f"({type(e).__name__}: {e})")
        if state is not None:  # a whole VGG16's state dict: its feature part is what is used
            unknown = [k for k in state if not k.startswith(("features.", "classifier."))]
            if unknown:
                raise ValueError(f"{self.source} is not a torchvision VGG16 state dict: unexpected keys {unknown[:5]}")
            features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
        if self.source.startswith("random"):
            warnings.warn("PerceptualLoss: no ImageNet VGG16 weights on this machine, so the perceptual distance "
                          "uses a VGG16 with random weights (see PerceptualLoss.source). Pass download=True "
                          "with a network, or weights_path=...", stacklevel=2)
        self.features = features[: max(VGG16_LAYERS[n] for n in self.layers) + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Stays in eval mode whatever ``mode`` says: the feature network is frozen. Lesson: 06_ldm_autoencoder."""
        return super().train(False)

    def _activations(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ValueError(f"PerceptualLoss takes 1- or 3-channel images, got {x.shape[1]} channels")
        h, out, wanted = ((x + 1) / 2 - self.mean) / self.std, {}, {VGG16_LAYERS[n]: n for n in self.layers}
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in wanted:
                out[wanted[i]] = h
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"the two image batches differ in shape: {tuple(x.shape)} and {tuple(y.shape)}")
        fx, fy = self._activations(x), self._activations(y)
        unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
        return sum((unit(fx[n]) - unit(fy[n])).pow(2).sum(1).mean((1, 2)) for n in self.layers)


@functools.lru_cache(maxsize=2)
def _random_vgg16_features(seed: int) -> nn.Sequential:
    """The feature part of torchvision's VGG16 built with random weights from ``seed`` (the CPU generator only),
    once per process: building the whole network, its 120-million-parameter classifier too, takes seconds, and
    the classifier's draws come before the features' own initialisation, so the features cannot be built alone.
    Callers copy it. Lesson: 06_ldm_autoencoder."""
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):  # seeds the CPU generator only (torch.manual_seed would reseed CUDA's)
        torch.default_generator.manual_seed(seed)
        return vgg16(weights=None).features.requires_grad_(False).eval()


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator D_psi of pix2pix (Isola et al., 2017), as VQGAN and LDM use it: 4x4
    convolutions, ``n_layers`` of them with stride 2, BatchNorm and LeakyReLU(0.2), then two with stride 1.
    ``(B, C, H, W) -> (B, 1, H / 2**n_layers - 2, W / 2**n_layers - 2)``: one real/fake logit per patch
    (70x70 pixels each for n_layers = 3). Lesson: 06_ldm_autoencoder."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1 or channels < 1 or in_channels < 1:
            raise ValueError(f"need n_layers, channels and in_channels >= 1, got {n_layers}, {channels}, {in_channels}")
        self.in_channels, self.n_layers = in_channels, n_layers
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the DCGAN initialisation pix2pix uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def output_size(self, size: int) -> int:
        """The side of the logit map for images of side ``size``. Lesson: 06_ldm_autoencoder."""
        for _ in range(self.n_layers):  # each 4x4 stride-2 convolution with padding 1 halves (rounding down)
            size = (size + 2 - 4) // 2 + 1
        return size - 2  # the two stride-1 4x4 convolutions take one pixel each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the discriminator expects images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.output_size(min(x.shape[-2:])) < 1:  # the last convolutions need a 3x3 map after the halvings
            raise ValueError(f"images of {tuple(x.shape[-2:])} are too small for a {self.n_layers}-layer PatchGAN "
                             f"(at least {3 * 2 ** self.n_layers} pixels a side); use fewer layers")
        return self.net(x)


class PatchGeometry(NamedTuple):
    """Where the logits of a PatchGAN sit on its input image, in pixels: ``grid`` logits a side, each seeing a
    ``receptive_field`` x ``receptive_field`` window; neighbouring logits' windows are ``jump`` pixels apart, and
    the window of logit ``(i, j)`` starts at pixel ``(first + i * jump, first + j * jump)`` (``first`` < 0: the
    window reaches into the zero padding). Lesson: 06_ldm_autoencoder."""

    grid: int
    receptive_field: int
    jump: int
    first: int


def patchgan_geometry(image_size: int, n_layers: int) -> PatchGeometry:
    """The logit grid and receptive field of :class:`PatchDiscriminator` (``n_layers`` 4x4 convolutions of
    stride 2, then two of stride 1, all with padding 1) on ``image_size`` x ``image_size`` images. Each
    convolution (kernel k, stride s, padding p) maps a side n to (n + 2p - k) // s + 1, widens the window by
    (k - 1) times the current jump, moves its start by -p times the jump, and multiplies the jump by s.
    Lesson: 06_ldm_autoencoder."""
    if n_layers < 1 or image_size < 1:
        raise ValueError(f"need n_layers >= 1 and image_size >= 1, got {n_layers} and {image_size}")
    size, field, jump, first = image_size, 1, 1, 0
    for k, s, p in [(4, 2, 1)] * n_layers + [(4, 1, 1)] * 2:
        size = (size + 2 * p - k) // s + 1
        field, first, jump = field + (k - 1) * jump, first - p * jump, jump * s
    return PatchGeometry(size, field, jump, first)


def logit_input_gradient(disc: PatchDiscriminator, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """|d D_psi(x)[0, 0, i, j] / d x| summed over channels, ``(H, W)``, with ``disc`` in eval mode (BatchNorm
    with its running statistics, so that a logit depends on its own window only; the mode is restored after).
    Its nonzero pixels are the receptive field of logit ``(i, j)``, clipped to the image.
    Lesson: 06_ldm_autoencoder."""
    was = disc.training
    disc.eval()
    try:
        x = x[:1].detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(disc(x)[0, 0, i, j], x)
    finally:
        disc.train(was)
    return grad[0].abs().sum(0)


def measure_patchgan_geometry(image_size: int, n_layers: int) -> PatchGeometry:
    """:func:`patchgan_geometry` measured on a real :class:`PatchDiscriminator` instead of computed: ``grid`` from
    its output on an ``image_size`` image, the window from the gradients of two neighbouring logits (all
    weights set to 1, so that no gradient cancels by chance) on a canvas large enough for their windows to lie
    inside it. Lesson: 06_ldm_autoencoder."""
    with torch.random.fork_rng(devices=[]):  # the initialisation draws; the caller's random state stays as it was
        disc = PatchDiscriminator(1, 1, n_layers).double().eval()
    with torch.no_grad():
        for m in disc.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.weight.fill_(1.0)
    with torch.no_grad():
        grid = disc(torch.zeros(1, 1, image_size, image_size, dtype=torch.float64)).shape[-1]
    canvas = 8 * 2 ** n_layers
    while True:
        x = torch.zeros(1, 1, canvas, canvas, dtype=torch.float64)
        mid = disc.output_size(canvas) // 2
        rows = [logit_input_gradient(disc, x, i, mid).sum(1).nonzero().flatten() for i in (mid, mid + 1)]
        if rows[0][0] > 0 and rows[1][-1] < canvas - 1:  # both windows inside the canvas: nothing clipped
            break
        canvas *= 2
    jump = int(rows[1][0] - rows[0][0])
    return PatchGeometry(grid, int(rows[0][-1] - rows[0][0]) + 1, jump, int(rows[0][0]) - mid * jump)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss 1/2 [mean relu(1 - D(x)) + mean relu(1 + D(x_rec))] (means over
    every patch logit). Lesson: 06_ldm_autoencoder."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN loss of the discriminator, 1/2 [mean softplus(-D(x)) + mean softplus(D(x_rec))]
    = binary cross-entropy with real = 1, fake = 0. Lesson: 06_ldm_autoencoder."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    delta: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_{w} L_rec|| / (||grad_{w} L_G|| + delta) at the decoder's last-layer weight ``w``,
    clamped to [0, max_weight] and detached (a number, not part of the graph). Both losses must still
    have their graphs. Lesson: 06_ldm_autoencoder."""
    if not last_layer.requires_grad:
        raise ValueError("the last layer's weight must require gradients to measure the adaptive weight")
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + delta)).clamp(0.0, max_weight).detach()


def disc_factor(step: int, start: int) -> float:
    """1 once the discriminator has started (``step >= start``), else 0. Lesson: 06_ldm_autoencoder."""
    return 1.0 if step >= start else 0.0


class AutoencoderLoss(nn.Module):
    """L_AE of the lecture, as two losses: :meth:`autoencoder_loss` (for E and D) and
    :meth:`discriminator_loss` (for D_psi). ``perceptual_weight = 0`` and ``disc_weight = 0`` turn those
    terms off (the plain "L1 + regulariser" autoencoder). ``kl_weight`` is used for KL-regularised models,
    ``codebook_weight`` for VQ ones. Lesson: 06_ldm_autoencoder."""

    def __init__(self, in_channels: int = 3, pixel: str = "l1", perceptual_weight: float = 1.0,
                 perceptual: Optional[PerceptualLoss] = None, disc_weight: float = 0.5, disc_start: int = 0,
                 disc_loss: str = "hinge", disc_layers: int = 3, disc_channels: int = 64, kl_weight: float = 1e-6,
                 codebook_weight: float = 1.0) -> None:
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if min(perceptual_weight, disc_weight, kl_weight, codebook_weight) < 0 or disc_start < 0:
            raise ValueError("loss weights and disc_start must be >= 0")
        self.pixel, self.perceptual_weight, self.disc_weight, self.disc_start = pixel, perceptual_weight, disc_weight, disc_start
        self.kl_weight, self.codebook_weight = kl_weight, codebook_weight
        self.perceptual = (perceptual or PerceptualLoss()) if perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers) if disc_weight > 0 else None
        self.d_loss_fn = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss

    def reconstruction_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """L_rec per image ``(B,)``: summed pixel loss + perceptual_weight * (C H W) * d_perc. Lesson: 06_ldm_autoencoder."""
        rec = pixel_loss(x, x_rec, self.pixel)
        if self.perceptual is not None:
            rec = rec + self.perceptual_weight * x[0].numel() * self.perceptual(x, x_rec)
        return rec

    def autoencoder_loss(self, x: torch.Tensor, out: AEOutput, step: int, last_layer: torch.Tensor,
                         regularizer: str) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The loss that E and D minimise at ``step``, and its parts for logging. Lesson: 06_ldm_autoencoder."""
        rec = self.reconstruction_loss(x, out.x_rec).mean()
        reg = out.reg_loss.mean() * (self.kl_weight if regularizer == "kl" else self.codebook_weight)
        loss = rec + reg
        logs = {"rec": rec.item(), "reg": out.reg_loss.mean().item(), "g": 0.0, "d_weight": 0.0}
        factor = disc_factor(step, self.disc_start)
        if self.discriminator is not None and factor > 0:
            g_loss = -self.discriminator(out.x_rec).mean()
            if torch.is_grad_enabled():
                weight = adaptive_weight(rec, g_loss, last_layer) * self.disc_weight
            else:  # evaluating without gradients: lambda cannot be measured, so the GAN term counts with lambda = 1
                weight = torch.tensor(self.disc_weight)
            loss = loss + weight * factor * g_loss
            logs.update(g=g_loss.item(), d_weight=weight.item())
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int) -> torch.Tensor:
        """The loss that D_psi minimises (zero before ``disc_start``). Lesson: 06_ldm_autoencoder."""
        if self.discriminator is None:
            raise ValueError("this loss has no discriminator (disc_weight = 0)")
        return disc_factor(step, self.disc_start) * self.d_loss_fn(self.discriminator(x), self.discriminator(x_rec.detach()))
