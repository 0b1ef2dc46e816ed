"""Synthetic degradations for super-resolution: how a sharp image becomes a realistic low-resolution one.

Taught in lesson 09_stablesr. A super-resolution model learns from pairs (low resolution, high resolution);
real low-resolution photographs are blurred, shrunk, noisy and JPEG-compressed, often more than once. We make
such pairs from sharp images with the second-order pipeline of Real-ESRGAN (Wang et al., 2021, "Real-ESRGAN:
Training Real-World Blind Super-Resolution with Pure Synthetic Data"), in a small form:

* stage 1: blur -> random resize -> Gaussian noise -> JPEG;
* stage 2 (for each sample with probability ``second_order``): blur -> resize to the final size -> noise -> JPEG.
  A sample that skips stage 2 is only resized to the final size.

Every random choice (kernel widths and angle, resize factor and mode, noise level, JPEG quality, whether to run
stage 2) is drawn per sample from a CPU ``torch.Generator``: a seed fixes the result bit for bit, and the global
random state is never touched. Images are float tensors ``(B, C, H, W)`` in [-1, 1], any ``C``.

Units: blur sigmas are in pixels of the image being blurred. The noise is independent per pixel and channel, its
standard deviation in the units of the [-1, 1] pixel values (0.05 is 2.5 % of the full range; one 8-bit grey
level is 2 / 255, about 0.008). JPEG quality is the usual 1 (worst) to 100 (best) scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import kornia
import torch
import torch.nn.functional as F

from .utils import ConfigDict


RESIZE_MODES = ("area", "bilinear", "bicubic")
STAGE_NAMES = ("high resolution", "blur 1", "resize 1", "noise 1", "JPEG 1",
               "blur 2", "resize 2", "noise 2", "JPEG 2", "low resolution")
JPEG_BLOCK = 16  # the codec works on 16 x 16 macro-blocks (8 x 8 blocks, chroma halved)


@dataclass
class DegradationConfig(ConfigDict):
    """The ranges the degradation pipeline draws its per-sample parameters from.

    ``scale``: the low-resolution image is ``(H / scale, W / scale)``. ``blur_kernel``: odd kernel size.
    ``blur_sigma``: range of each axis' Gaussian sigma, in pixels (the two axes are drawn apart and rotated by a
    random angle, so blurs are anisotropic). ``resize_range``: range of stage 1's rescale factor.
    ``noise_sigma``: range of the noise standard deviation, in [-1, 1] pixel units. ``jpeg_quality``: range of
    the JPEG quality, within [1, 100]. ``second_order``: probability that a sample goes through stage 2.
    Ranges are ``(low, high)`` pairs; lists are accepted and become tuples. Lesson: 09_stablesr.
    """

    _what = "degradation configuration"

    scale: int = 4
    blur_kernel: int = 7
    blur_sigma: Tuple[float, float] = (0.2, 1.5)
    resize_range: Tuple[float, float] = (0.5, 1.0)
    noise_sigma: Tuple[float, float] = (0.0, 0.05)
    jpeg_quality: Tuple[float, float] = (50.0, 95.0)
    second_order: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"DegradationConfig.scale must be an int >= 1, got {self.scale!r}; use e.g. 4")
        k = self.blur_kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"DegradationConfig.blur_kernel must be an odd int >= 1 (a kernel needs a centre "
                             f"pixel), got {k!r}; use e.g. 7")
        self.blur_sigma = _check_range("blur_sigma", self.blur_sigma, 0.0, strict=True,
                                       hint="use (0.01, 0.01) for no visible blur")
        self.resize_range = _check_range("resize_range", self.resize_range, 0.0, strict=True,
                                         hint="use (1.0, 1.0) for no resize in stage 1")
        self.noise_sigma = _check_range("noise_sigma", self.noise_sigma, 0.0, hint="use (0.0, 0.0) for no noise")
        self.jpeg_quality = _check_range("jpeg_quality", self.jpeg_quality, 1.0, 100.0,
                                         hint="JPEG quality runs from 1 (worst) to 100 (best)")
        p = self.second_order
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"DegradationConfig.second_order is a probability and must lie in [0, 1], got {p!r}")
        self.second_order = float(p)


def _check_range(name: str, value: Sequence[float], minimum: float, maximum: float = math.inf,
                 strict: bool = False, hint: str = "") -> Tuple[float, float]:
    """Validate a ``(low, high)`` field and return it as a tuple of floats."""
    where = f"DegradationConfig.{name}"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{where} must be a pair (low, high), got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ValueError(f"{where} has low > high: {value!r}; write it as ({hi:g}, {lo:g})")
    if not ((lo > minimum) if strict else (lo >= minimum)) or not (math.isfinite(hi) and hi <= maximum):
        limits = f"{'above' if strict else 'at least'} {minimum:g}" + (
            f" and at most {maximum:g}" if maximum < math.inf else " and finite")
        raise ValueError(f"{where} = {value!r}: both ends must be {limits}" + (f"; {hint}" if hint else ""))
    return lo, hi


def _uniform(n: int, value_range: Tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """``n`` float64 values drawn uniformly from ``value_range`` (one draw each, even when low == high)."""
    lo, hi = value_range
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def _draw_modes(n: int, generator: torch.Generator) -> List[str]:
    return [RESIZE_MODES[int(i)] for i in torch.randint(len(RESIZE_MODES), (n,), generator=generator)]


def blur_kernels(n: int, config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """``n`` random anisotropic Gaussian blur kernels, float32 ``(n, k, k)`` with ``k = config.blur_kernel``.

    Each kernel has sigmas ``sigma_x, sigma_y`` drawn from ``config.blur_sigma`` (pixels) along two axes turned
    by an angle drawn from [0, pi); it is ``exp(-(u^2 / sigma_x^2 + v^2 / sigma_y^2) / 2)`` in the turned
    coordinates ``(u, v)``, normalised to sum to 1. Drawn from the CPU ``generator``. Lesson: 09_stablesr.
    """
    sigma_x = _uniform(n, config.blur_sigma, generator)[:, None, None]
    sigma_y = _uniform(n, config.blur_sigma, generator)[:, None, None]
    angle = _uniform(n, (0.0, math.pi), generator)[:, None, None]
    radius = config.blur_kernel // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    u = torch.cos(angle) * x + torch.sin(angle) * y  # coordinates along the kernel's own axes
    v = -torch.sin(angle) * x + torch.cos(angle) * y
    kernels = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernels / kernels.sum(dim=(-2, -1), keepdim=True)).float()


def _blur(batch: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``batch`` (g, C, h, w) with its own kernel of ``kernels`` (g, k, k)."""
    reach = kernels.shape[-1] // 2
    border = "reflect" if min(batch.shape[-2:]) > reach else "replicate"  # reflect needs side > k // 2
    return kornia.filters.filter2d(batch, kernels.to(batch), border_type=border)


def _resize(image: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """Resize one image (C, h, w) to ``size``; bilinear and bicubic are anti-aliased, area averages anyway."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if mode == "area":
        return F.interpolate(image[None], size=size, mode="area")[0]
    return F.interpolate(image[None], size=size, mode=mode, align_corners=False, antialias=True)[0]


def _jpeg(batch: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG-compress and decode ``batch`` (g, C, h, w) in [-1, 1] with per-image ``quality`` (g,).

    Three channels are coded as one RGB image; any other channel count is coded channel by channel, each as a
    grey image (repeated to RGB, coded, averaged back). The image is padded (replicate) to a multiple of 16 on
    the bottom and right and cropped back, as a JPEG encoder does.
    """
    g, c, h, w = batch.shape
    x = ((batch + 1) / 2).clamp(0, 1)
    x = F.pad(x, (0, -w % JPEG_BLOCK, 0, -h % JPEG_BLOCK), mode="replicate")
    if c != 3:
        x = x.reshape(g * c, 1, *x.shape[-2:]).repeat(1, 3, 1, 1)
        quality = quality.repeat_interleave(c)
    coded = kornia.enhance.jpeg_codec_differentiable(x, quality.to(x))
    if c != 3:
        coded = coded.mean(dim=1).reshape(g, c, *coded.shape[-2:])
    return coded[..., :h, :w] * 2 - 1


def _by_size(images: List[torch.Tensor], members: Sequence[int],
             operation: Callable[[torch.Tensor, List[int]], torch.Tensor]) -> List[torch.Tensor]:
    """Apply ``operation(batch, indices)`` to the images at ``members``, stacking the images of each size into
    one batch (stage 1's resize leaves samples of different sizes). The other images are returned unchanged."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i in members:
        groups.setdefault(tuple(images[i].shape), []).append(i)
    result = list(images)
    for indices in groups.values():
        out = operation(torch.stack([images[i] for i in indices]), indices)
        for j, i in enumerate(indices):
            result[i] = out[j]
    return result


def _add_noise(images: List[torch.Tensor], members: Sequence[int], sigmas: torch.Tensor,
               generator: torch.Generator) -> List[torch.Tensor]:
    """Add Gaussian noise of std ``sigmas[i]`` to image ``i`` for each ``i`` in ``members``, in index order."""
    result = list(images)
    for i in members:
        noise = torch.randn(images[i].shape, generator=generator) * float(sigmas[i])
        result[i] = images[i] + noise.to(images[i])
    return result


def _check_images(hr: torch.Tensor, scale: int) -> None:
    if not isinstance(hr, torch.Tensor) or hr.dim() != 4:
        shape = tuple(hr.shape) if isinstance(hr, torch.Tensor) else type(hr).__name__
        raise ValueError(f"expected images (B, C, H, W), got {shape}; add a batch axis with x[None] if needed")
    if not hr.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got dtype {hr.dtype}")
    if hr.shape[0] == 0:
        raise ValueError("the batch is empty; give at least one image")
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by scale {scale}; crop or pad the images to a "
                         f"multiple of {scale}, e.g. {h - h % scale}x{w - w % scale}")


def _make_generator(generator: Optional[torch.Generator], seed: Optional[int]) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("give either generator or seed, not both")
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError(f"the generator must be a CPU torch.Generator, got one on {generator.device}")
        return generator
    seed = 0 if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _run(hr: torch.Tensor, config: DegradationConfig, generator: torch.Generator,
         stages: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """The pipeline; when ``stages`` is a dict, every stage's images are stored in it."""
    _check_images(hr, config.scale)
    n, _, height, width = hr.shape
    final_size = (height // config.scale, width // config.scale)
    work_dtype = hr.dtype if hr.dtype in (torch.float32, torch.float64) else torch.float32
    everyone = list(range(n))

    def record(name: str, images: List[torch.Tensor], enlarge: bool = False) -> None:
        if stages is not None:  # enlarge: stage-1 sizes differ between samples, so show them at the HR size
            if enlarge:
                images = [F.interpolate(im[None], size=(height, width), mode="nearest-exact")[0] for im in images]
            stages[name] = torch.stack(images).to(hr.dtype)

    x = hr.to(work_dtype)
    record("high resolution", list(x))
    # stage 1: the whole batch has one size until the resize
    x = _blur(x, blur_kernels(n, config, generator))
    record("blur 1", list(x))
    factors = _uniform(n, config.resize_range, generator)
    modes = _draw_modes(n, generator)
    images = [_resize(x[i], (max(1, round(height * float(f))), max(1, round(width * float(f)))), mode)
              for i, (f, mode) in enumerate(zip(factors, modes))]
    record("resize 1", images, enlarge=True)
    images = _add_noise(images, everyone, _uniform(n, config.noise_sigma, generator), generator)
    record("noise 1", images, enlarge=True)
    quality = _uniform(n, config.jpeg_quality, generator)
    images = _by_size(images, everyone, lambda batch, idx: _jpeg(batch, quality[idx]))
    record("JPEG 1", images, enlarge=True)
    # stage 2, for the chosen samples; every sample is resized to the final size
    chosen = [i for i, u in enumerate(torch.rand(n, generator=generator)) if float(u) < config.second_order]
    kernels = blur_kernels(n, config, generator)
    images = _by_size(images, chosen, lambda batch, idx: _blur(batch, kernels[idx]))
    record("blur 2", images, enlarge=True)
    modes = _draw_modes(n, generator)
    images = [_resize(image, final_size, mode) for image, mode in zip(images, modes)]
    record("resize 2", images)
    images = _add_noise(images, chosen, _uniform(n, config.noise_sigma, generator), generator)
    record("noise 2", images)
    quality = _uniform(n, config.jpeg_quality, generator)
    images = _by_size(images, chosen, lambda batch, idx: _jpeg(batch, quality[idx]))
    record("JPEG 2", images)
    low_resolution = torch.stack(images).clamp(-1, 1)
    record("low resolution", list(low_resolution))
    return low_resolution.to(hr.dtype)


def degrade(hr: torch.Tensor, config: Optional[DegradationConfig] = None,
            generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> torch.Tensor:
    """Degrade high-resolution images ``hr`` (B, C, H, W) in [-1, 1] into low-resolution ones.

    Returns ``(B, C, H / scale, W / scale)`` in [-1, 1], on ``hr``'s device and dtype. ``config`` defaults to
    ``DegradationConfig()``. Randomness comes from ``generator`` (a CPU ``torch.Generator``, which advances) or
    from a fresh generator seeded with ``seed``; with neither, ``seed = 0``. The global random state is left
    alone. H and W must be divisible by ``config.scale``. Lesson: 09_stablesr.
    """
    config = DegradationConfig() if config is None else config
    return _run(hr, config, _make_generator(generator, seed))


def degradation_stages(hr: torch.Tensor, config: Optional[DegradationConfig] = None,
                       seed: int = 0) -> Dict[str, torch.Tensor]:
    """Every intermediate image of the pipeline, for pictures: a dict in pipeline order (see ``STAGE_NAMES``).

    ``hr`` is (B, C, H, W) in [-1, 1]; stage 2 is forced on for every sample, so the ``"low resolution"``
    entry equals ``degrade(hr, replace(config, second_order=1.0), seed=seed)``. ``"high resolution"`` and
    ``"blur 1"`` are (B, C, H, W); ``"resize 1"``, ``"noise 1"``, ``"JPEG 1"`` and ``"blur 2"`` have a random
    size per sample, so they are shown enlarged to (B, C, H, W) by nearest neighbour (pixels stay visible);
    ``"resize 2"`` to ``"low resolution"`` are (B, C, H / scale, W / scale). Values outside [-1, 1] (noise
    before JPEG) are kept. Lesson: 09_stablesr.
    """
    config = replace(DegradationConfig() if config is None else config, second_order=1.0)
    stages: Dict[str, torch.Tensor] = {}
    _run(hr, config, _make_generator(None, seed), stages)
    return stages


def upsample(lr: torch.Tensor, scale: int = 4, mode: str = "bicubic") -> torch.Tensor:
    """Enlarge low-resolution images ``lr`` (B, C, h, w) to (B, C, h * scale, w * scale), clamped to [-1, 1].

    The plain-interpolation baseline every super-resolution model must beat; ``mode`` is ``"bicubic"``,
    ``"bilinear"`` or ``"nearest"``. Lesson: 09_stablesr.
    """
    if not isinstance(lr, torch.Tensor) or lr.dim() != 4:
        raise ValueError(f"expected images (B, C, h, w), got {getattr(lr, 'shape', type(lr).__name__)}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    size = (lr.shape[-2] * scale, lr.shape[-1] * scale)
    if mode == "nearest":
        out = F.interpolate(lr, size=size, mode="nearest-exact")
    elif mode in ("bilinear", "bicubic"):
        out = F.interpolate(lr, size=size, mode=mode, align_corners=False)
    else:
        raise ValueError(f"mode must be 'bicubic', 'bilinear' or 'nearest', got {mode!r}")
    return out.clamp(-1, 1)
