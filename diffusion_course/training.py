"""The training engine: one loop for the notebooks and for ``python -m diffusion_course train``.

Taught in lesson 04_unet. It is Algorithm 1 of the lecture (``GaussianDiffusion.L_simple``) with the
engineering a real run needs:

* the device is picked for you (CUDA, then Apple MPS, then the CPU); mixed precision on CUDA
  (bf16 where the GPU supports it, else fp16 with a gradient scaler; off elsewhere), see :func:`select_amp`;
* an exponential moving average (EMA) of the weights, which is what sampling uses (:func:`ema_update`);
* gradient clipping, a learning-rate warm-up, a progress bar with the running loss, the loss history;
* sample grids (PNG) and checkpoints (safetensors, see :mod:`diffusion_course.checkpoint`) in the run
  folder ``TrainConfig.out``; a resumed run continues exactly where it stopped, because every random
  number comes from generators whose states the checkpoint keeps. One seed gives the same run on every
  CPU; on a GPU the loss's t and noise are drawn on the GPU (no copy from the host at each step), so a GPU
  run repeats itself on that kind of GPU, up to its floating-point non-determinism, but differs from a CPU run;
* several GPUs through ``torchrun`` (DistributedDataParallel, one process per GPU; see
  :mod:`diffusion_course.distributed`).

    trainer = Trainer(TrainConfig(dataset="digits", image_size=16, steps=2000, out="runs/digits"), unet_config)
    trainer.train()                      # (B, C, S, S) batches, one optimizer step each
    images = trainer.sample(16)          # (16, C, S, S) in [-1, 1], from the EMA weights

Conditional models (lesson 07_cross_attention): batches are ``(x0, cond)``; the condition goes through the
condition encoder tau_theta to the U-Net's cross-attention (``model_kwargs``), encoder and U-Net are
optimised together, and each condition is replaced by the learned null condition with probability
``p_uncond``, which is what classifier-free guidance needs:

    trainer = Trainer(TrainConfig(dataset="digits", image_size=16, condition="class", p_uncond=0.1))
    images = trainer.sample(10, cond=torch.arange(10), guidance_scale=3.0)

Latent diffusion (lesson 08_latent_diffusion): with ``autoencoder`` (a shipped autoencoder's name or an exported
folder) the same loop trains the denoiser on the latents z_0 = s E(x) of the data, encoded once by the frozen
autoencoder, with L_cond; ``spatial`` adds a spatial condition concatenated to z_t (``inpaint``: the known
latent and a random keep mask drawn each step; ``semantic``: the shapes' semantic maps); samples are decoded:

    trainer = Trainer(TrainConfig(dataset="digits", image_size=32, condition="class", autoencoder="ae_digits32_f4",
                                  schedule="scaled_linear"))
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .autoencoder import latent_scale_factor
from .conditions import CONDITIONS, ENCODER_KIND, build_model, condition_tensor, conditional_data
from .data import check_dataset_name, get_dataset, random_batches
from .distributed import (barrier, gather_objects, leave_process_group, main_process_first, mean_over_processes,
                          setup_distributed)
from .ddpm import GaussianDiffusion
from .guidance import ClassifierFreeGuidance, condition_dropout
from .ldm import (SPATIAL, LatentDiffusion, box_keep_masks, encode_images, inpaint_condition, latent_diffusion_from,
                  latent_unet_config, random_keep_masks, semantic_condition, spatial_channels)
from .nn import ConditionalDenoiser, ConditionerConfig, UNet, UNetConfig
from .pretrained import load_autoencoder, read_asset
from .schedules import SCHEDULES
from .solvers import SAMPLERS, sample_with
from .utils import Autocast, ConfigDict, cpu_bf16_supported, get_device, time_it
from .viz import make_grid


AMP_CHOICES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
COMPILE_BACKEND = "inductor"  # torch.compile's code generator; "eager" only traces (the tests use it: it is quick)
# settings a resumed run may change, because they do not change what the model learns
RESUMABLE = ("steps", "sample_every", "checkpoint_every", "n_samples", "sampler", "sample_steps", "out", "amp",
             "compile", "device", "progress", "guidance_scale")


@dataclass
class TrainConfig(ConfigDict):
    """Every setting of a training run but the network's (that is :class:`~diffusion_course.nn.UNetConfig`).

    ``batch_size`` is the global batch, split evenly over the processes of a multi-GPU run.
    ``grad_clip = 0`` turns clipping off; ``sample_every = 0`` / ``checkpoint_every = 0`` write sample grids /
    checkpoints only when :meth:`Trainer.train` returns; ``out = None`` writes nothing. ``amp`` is one of
    ``auto``, ``bf16``, ``fp16``, ``off``: ``auto`` on a CUDA GPU times a few training steps of this network in
    bf16 (or fp16) autocast and in float32 and keeps the faster (:func:`measure_amp`; small networks are
    launch-bound and often faster in float32), and is float32 elsewhere; ``bf16`` also runs on a CPU with bfloat16
    kernels (:func:`select_amp`). ``compile`` runs the denoiser through
    ``torch.compile`` in one of its modes (``default``, ``reduce-overhead``, ``max-autotune``; ``off`` by default:
    the first steps then wait for code generation, about a minute for the digits U-Net on a 2-core CPU, which pays
    only in long runs). ``device = None`` picks the best one. ``image_size = None`` takes
    the data's own size. ``condition`` is ``none`` (unconditional), ``class``, ``caption`` or ``layout``
    (lesson 07); ``p_uncond`` is the probability of training a condition as the null condition, and
    ``guidance_scale`` the classifier-free guidance scale of the sample grids. ``autoencoder`` (a shipped
    autoencoder's name or an exported folder) makes it a latent diffusion run (lesson 08) and ``spatial``
    (``none``, ``inpaint``, ``semantic``) its spatial condition; an inpainting run hides a random rectangle of
    each training latent, or with probability ``p_hide_all`` all of it, so that one model both inpaints and
    generates. ``clip_x0 = None`` means True in pixel space and False in latent space (clipping latents to
    [-1, 1] is an error). ``init_from`` (a shipped model's name or an exported folder) starts the
    weights, and their EMA, from that model's instead of from random ones: a new run (step 0, a fresh optimizer
    and warm-up) that fine-tunes it; its network and condition encoder must be configured as the model's were,
    and a latent model is fine-tuned by a latent run on the same autoencoder, scale factor and spatial condition.
    With ``ema_warmup=False`` the EMA keeps its long memory from the first step, which suits a fine-tune (the
    warm-up's short memory would forget the starting weights within a few hundred steps).
    Lesson: 04_unet.
    """

    _what = "training configuration"

    dataset: str = "digits"
    image_size: Optional[int] = None
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    steps: int = 2000
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    T: int = 1000
    schedule: str = "linear"
    clip_x0: Optional[bool] = None
    sample_every: int = 500
    checkpoint_every: int = 500
    n_samples: int = 16
    sampler: str = "ddim"
    sample_steps: int = 50
    out: Optional[str] = None
    amp: str = "auto"
    compile: str = "off"
    device: Optional[str] = None
    progress: bool = True
    condition: str = "none"
    p_uncond: float = 0.1
    guidance_scale: float = 3.0
    autoencoder: Optional[str] = None
    spatial: str = "none"
    p_hide_all: float = 0.5
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        if self.clip_x0 is None:
            self.clip_x0 = self.autoencoder is None
        if self.autoencoder is not None and self.clip_x0:
            raise ValueError("a latent diffusion run (autoencoder=...) must not clip x_0 to [-1, 1]: latents are not "
                             "in [-1, 1]; leave clip_x0 unset or set it False")
        if self.spatial not in SPATIAL:
            raise ValueError(f"unknown spatial condition {self.spatial!r}; valid: {', '.join(SPATIAL)}")
        if not 0.0 <= self.p_hide_all <= 1.0:
            raise ValueError(f"p_hide_all must lie in [0, 1], got {self.p_hide_all}")
        if self.spatial != "none" and self.autoencoder is None:
            raise ValueError(f"spatial={self.spatial!r} is a latent diffusion condition: give an autoencoder too")
        check_dataset_name(self.dataset)
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image_size must be a positive int or None (the data's size), got {self.image_size!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"unknown condition {self.condition!r}; valid: {', '.join(CONDITIONS)}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1) (typically 0.1), got {self.p_uncond}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        for key in ("batch_size", "T", "n_samples", "sample_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive int, got {getattr(self, key)!r}")
        for key in ("steps", "seed", "warmup_steps", "sample_every", "checkpoint_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"{key} must be an int >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) (typically 0.999), got {self.ema_decay}")
        if self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0, grad_clip and weight_decay >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(sorted(SCHEDULES))}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.sample_steps > self.T:
            raise ValueError(f"sample_steps {self.sample_steps} exceeds T = {self.T}")


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------


def select_amp(device: Union[str, torch.device], amp: str = "auto",
               bf16_supported: Optional[bool] = None) -> Optional[torch.dtype]:
    """The autocast dtype for ``device``: ``torch.bfloat16``, ``torch.float16`` (needs a gradient scaler)
    or ``None`` (full float32). ``auto`` takes bf16 on a CUDA GPU that supports it, else fp16, and None off
    CUDA. On the CPU ``bf16`` is allowed where the CPU has bfloat16 kernels
    (:func:`~diffusion_course.utils.cpu_bf16_supported`); ``auto`` stays float32 there, so that the lessons compute in
    float32 wherever they run and bf16 is the learner's choice (``benchmarks/README.md`` and lesson 04 measure what it
    gains). ``bf16_supported`` overrides the query of the GPU or the CPU (for tests). Lesson: 04_unet.
    """
    device = torch.device(device)
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "off":
        return None
    if device.type == "cpu" and amp == "bf16":
        if not (cpu_bf16_supported() if bf16_supported is None else bf16_supported):
            raise ValueError("this CPU has no bfloat16 kernels (AVX-512 with BF16, or AMX), where bf16 autocast would "
                             "be slower than float32; use amp='off'")
        return torch.bfloat16
    if device.type != "cuda":
        if amp == "auto":
            return None
        raise ValueError(f"mixed precision ({amp}) is used on CUDA GPUs and, as bf16, on CPUs with bfloat16 kernels, "
                         f"not as {amp} on {device.type}; use amp='off'")
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if amp == "bf16" and not bf16_supported:
        raise ValueError("this GPU does not support bf16; use amp='fp16' (or 'auto')")
    if amp == "fp16" or (amp == "auto" and not bf16_supported):
        return torch.float16
    return torch.bfloat16


def measure_amp(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor,
                model_kwargs: Optional[Dict[str, Any]] = None,
                candidates: Sequence[Optional[torch.dtype]] = (torch.bfloat16, None), warmup: int = 2,
                iters: int = 5, dist_info: Any = None) -> Tuple[Optional[torch.dtype], Dict[str, float]]:
    """Time a training step's forward and backward pass (L_simple on ``x0``, ``(B, C, S, S)`` on the model's
    device) under each autocast dtype of ``candidates`` (``None``: float32) and return the fastest with the median
    seconds of each, keyed by name (``bfloat16``, ``float16``, ``float32``). It works on a copy of ``model`` with
    its own random numbers, so the model, its gradients and every generator of the caller are left as they were.
    Under a multi-process run every process gets the mean of all processes' times, so all of them pick the same.
    The trainer calls it for ``amp="auto"`` on a CUDA GPU. Lesson: 04_unet.
    """
    if not candidates or warmup < 0 or iters < 1:
        raise ValueError("measure_amp needs at least one candidate, warmup >= 0 and iters >= 1")
    device = x0.device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout draws from the global generators: give them back
        medians = _time_precisions(copy.deepcopy(model).train(), diffusion, x0, model_kwargs, candidates, warmup,
                                   iters)
    if dist_info is not None:
        medians = [mean_over_processes(torch.tensor(m, device=device), dist_info) for m in medians]
    fastest = min(range(len(candidates)), key=medians.__getitem__)
    return candidates[fastest], {dtype_name(d): m for d, m in zip(candidates, medians)}


def _time_precisions(probe: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor,
                     model_kwargs: Optional[Dict[str, Any]], candidates: Sequence[Optional[torch.dtype]],
                     warmup: int, iters: int) -> List[float]:
    generator = torch.Generator(x0.device).manual_seed(0)
    medians: List[float] = []
    for dtype in candidates:
        def step() -> None:
            with (torch.autocast(x0.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()):
                loss = diffusion.L_simple(probe, x0, model_kwargs=model_kwargs, generator=generator)
            loss.backward()
            probe.zero_grad(set_to_none=True)

        medians.append(time_it(step, repeats=iters, warmup=warmup))
    return medians


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``bfloat16``, ``float16``, ... for an autocast dtype; ``float32`` for None (no autocast). Lesson: 04_unet."""
    return str(dtype or torch.float32).replace("torch.", "")


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of step ``step`` (0-based) of the course's trainers: ``lr`` scaled by (step + 1) /
    ``warmup_steps`` during a linear warm-up, then constant (no warm-up when ``warmup_steps`` is 0). Lesson: 04_unet."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def ema_decay_at(updates: int, decay: float, warmup: bool = True) -> float:
    """The EMA decay for the update after ``updates`` earlier ones: ``decay``, or with ``warmup``
    min(decay, (1 + n) / (10 + n)), so that early averages are not dominated by the random initial weights.
    Lesson: 04_unet."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta for every parameter; buffers are copied.
    Lesson: 04_unet."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def stream_seed(seed: int, rank: int, stream: int, *more: int) -> int:
    """A 32-bit seed for random stream ``stream`` (0: data, 1: noise, 2: dropout) of process ``rank``, well mixed from
    its inputs (numpy's SeedSequence), so that every process draws different batches and noise. Lesson: 04_unet."""
    return int(np.random.SeedSequence([seed, rank, stream, *more]).generate_state(1)[0])


def save_grid(images: torch.Tensor, path: Union[str, os.PathLike], nrow: Optional[int] = None) -> Path:
    """Write images ``(N, C, H, W)`` in [-1, 1] as one PNG grid (atomically). Returns the path. Lesson: 04_unet."""
    import matplotlib.image

    grid = make_grid(images, nrow)  # (rows, cols, C) in [0, 1]
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    ckpt.atomic_write(path, lambda tmp: matplotlib.image.imsave(tmp, grid, cmap="gray", vmin=0.0, vmax=1.0,
                                                                  format="png"))
    return Path(path)


def train_loop(trainer: Any, num_steps: Optional[int], desc: str, progress: bool) -> List[float]:
    """The loop every trainer of the package runs: ``trainer.train_step()`` until ``num_steps`` more steps are
    done (default: until ``trainer.config.steps``), with a progress bar showing the loss of the last 100 steps,
    ``trainer.save_samples()`` and ``trainer.save()`` every ``config.sample_every`` / ``config.checkpoint_every``
    steps into ``config.out``, and once more at the end unless the last step just did. Returns
    ``trainer.loss_history``. Lesson: 04_unet."""
    c, start = trainer.config, trainer.step
    target = c.steps if num_steps is None else min(c.steps, trainer.step + num_steps)
    with tqdm(total=c.steps, initial=trainer.step, desc=desc, disable=not progress) as bar:
        while trainer.step < target:
            trainer.train_step()
            recent = trainer.loss_history[-100:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            if c.out and c.sample_every and trainer.step % c.sample_every == 0:
                trainer.save_samples()
            if c.out and c.checkpoint_every and trainer.step % c.checkpoint_every == 0:
                trainer.save()
    if c.out and trainer.step > start:
        if not (c.sample_every and trainer.step % c.sample_every == 0):
            trainer.save_samples()
        if not (c.checkpoint_every and trainer.step % c.checkpoint_every == 0):
            trainer.save()
    return trainer.loss_history


@torch.no_grad()
def sample_images(model: nn.Module, diffusion: GaussianDiffusion, n: int, sampler: str = "ddim",
                  steps: Optional[int] = None, seed: int = 0, eta: Optional[float] = None, progress: bool = True,
                  cond: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
                  x_T: Optional[torch.Tensor] = None, spacing: str = "linspace", amp: str = "off") -> torch.Tensor:
    """``n`` images ``(n, C, S, S)`` in [-1, 1] on the CPU from a U-Net, by DDIM (``steps`` network calls,
    default 50), DDPM's Algorithm 2 (all T steps), DPM-Solver++ 2M (``"dpmpp2m"``, default 20) or its stochastic
    form (``"dpmpp2m_sde"``, default 25), or their third-order forms (``"dpmpp3m"``, ``"dpmpp3m_sde"``), with the
    noise drawn from a generator seeded by ``seed`` (or starting from ``x_T``), on the time-step grid ``spacing``
    (:func:`~diffusion_course.ddpm.timesteps`).

    A conditional model (:class:`~diffusion_course.nn.ConditionalDenoiser`) takes ``cond``, one condition per
    image, and samples with classifier-free guidance of scale ``guidance_scale`` (1: the plain conditional
    model, 0: the unconditional one). ``amp`` (``off``, ``bf16``, ``fp16``, ``auto``, as for training:
    :func:`select_amp`) runs the network under autocast while the sampler's updates stay in float32; on a CPU with
    bfloat16 kernels ``bf16`` samples about twice as fast as float32 (``benchmarks/README.md``). Lesson: 04_unet.
    """
    c = model.config
    shape = (n, c.in_channels, c.image_size, c.image_size)
    device = next(model.parameters()).device
    amp_dtype = select_amp(device, amp)
    g = torch.Generator().manual_seed(seed)
    kwargs = None
    if cond is None and getattr(model, "conditioner", None) is not None:
        raise ValueError("this model is conditional: pass cond=... (one condition per image)")
    if amp_dtype is not None:  # the network in low precision; guidance's combination and the sampler in float32
        model = Autocast(model, amp_dtype)
    if cond is not None:
        if len(cond) != n:
            raise ValueError(f"{len(cond)} conditions for {n} images; give one condition per image")
        model, kwargs = ClassifierFreeGuidance(model, guidance_scale), {"cond": cond.to(device)}
    x = sample_with(diffusion, model, shape, sampler, steps, eta, generator=g, device=device, progress=progress,
                    model_kwargs=kwargs, x_T=x_T, spacing=spacing)
    return x.clamp(-1.0, 1.0).float().cpu()


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


class Trainer:
    """Trains a U-Net eps_theta with L_simple (Algorithm 1) on ``config.dataset`` (or on ``data``, images
    ``(N, C, S, S)`` in [-1, 1]). ``unet_config`` defaults to the package's U-Net for the data's size and
    channels. Under ``torchrun`` it joins the process group and wraps the model in DistributedDataParallel;
    only rank 0 shows progress and writes files. Lesson: 04_unet.

    With ``config.condition`` other than ``none`` it trains a conditional model (lesson 07): the conditions
    come from the data set (see :mod:`diffusion_course.conditions`), or from ``cond`` (one row per image of
    ``data``) with ``conditioner_config``; ``unet_config`` then needs the conditioner's ``context_dim``.

    ``unet_class`` builds the U-Net from ``unet_config`` (default: the package's :class:`UNet`); lesson 04 passes
    the learner's own U-Net class, which has the same parameter names, so checkpoints load into either.
    ``resume`` (a run folder) continues that run, as :meth:`load` does, and a fine-tune (``init_from``) resumed
    this way no longer needs the model it started from.
    """

    def __init__(self, config: TrainConfig, unet_config: Optional[UNetConfig] = None,
                 data: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                 conditioner_config: Optional[ConditionerConfig] = None,
                 unet_class: Optional[Callable[[UNetConfig], nn.Module]] = None,
                 resume: Optional[Union[str, os.PathLike]] = None) -> None:
        self.config = c = config
        self.dist, self.device, self._owns_group = setup_distributed(c.device)
        dataset = None
        if data is None:
            if cond is not None:
                raise ValueError("cond was given without data: pass the images it belongs to as data=")
            with main_process_first(self.dist):  # one download at a time
                dataset = get_dataset(c.dataset, c.image_size)
            data = dataset.images
            if c.condition != "none":
                context_dim = (unet_config.context_dim if unet_config is not None and unet_config.context_dim
                               else conditioner_config.context_dim if conditioner_config is not None else 64)
                if conditioner_config is None:
                    cond, conditioner_config = conditional_data(dataset, c.condition, context_dim)
                else:  # the given encoder's own tokenizer, lengths and classes
                    cond = condition_tensor(dataset, conditioner_config)
        size = c.image_size or (data.shape[-1] if data.ndim == 4 else None)
        if data.ndim != 4 or data.shape[-1] != size or data.shape[-2] != size:
            raise ValueError(f"training images must be square, of shape (N, C, S, S) with S = {size}, "
                             f"got {tuple(data.shape)}")
        # latent diffusion (lesson 08): the frozen autoencoder encodes the data once; the loop sees latents
        self.latent: Optional[LatentDiffusion] = None
        self.pixels: Optional[torch.Tensor] = None
        semantic, extra, num_classes = None, 0, 0
        if c.autoencoder is not None:
            autoencoder, info = load_autoencoder(c.autoencoder, device=self.device)
            a = autoencoder.config
            if (a.in_channels, a.image_size) != (data.shape[1], size):
                raise ValueError(f"the autoencoder {c.autoencoder!r} takes {a.in_channels}-channel images of size "
                                 f"{a.image_size}; the data has {data.shape[1]} channels and size {size}")
            scale_factor = info.get("scale_factor") or latent_scale_factor(autoencoder, data)
            if c.spatial == "semantic":
                if dataset is None or getattr(dataset, "masks", None) is None:
                    raise ValueError("spatial='semantic' needs a data set with semantic maps (the shapes)")
                num_classes = len(dataset.classes) + 1  # the background is class 0
                semantic = semantic_condition(dataset.masks, num_classes, a.image_size // a.latent_shape[1])
            extra = spatial_channels(c.spatial, a.latent_shape[0], num_classes)
            self.pixels = data
            data = encode_images(autoencoder, data, scale_factor, progress=c.progress and self.dist.is_main)
            size = data.shape[-1]
        if (c.condition == "none") != (cond is None) or (cond is None) != (conditioner_config is None):
            raise ValueError(f"condition={c.condition!r} needs conditions and a conditioner config exactly when it "
                             f"is not 'none' (got cond={'None' if cond is None else 'a tensor'}, conditioner_config="
                             f"{'None' if conditioner_config is None else conditioner_config.kind})")
        if conditioner_config is not None and ENCODER_KIND.get(c.condition) != conditioner_config.kind:
            raise ValueError(f"condition={c.condition!r} needs a {ENCODER_KIND.get(c.condition)!r} condition encoder, "
                             f"but the conditioner config is of kind {conditioner_config.kind!r}")
        if cond is not None and len(cond) != len(data):
            raise ValueError(f"{len(cond)} conditions for {len(data)} images; give one condition per image")
        context_dim = conditioner_config.context_dim if conditioner_config is not None else None
        if unet_config is None:
            unet_config = (UNetConfig(image_size=size, in_channels=data.shape[1], context_dim=context_dim)
                           if c.autoencoder is None else
                           latent_unet_config(autoencoder.config, c.spatial, num_classes, context_dim=context_dim))
        if (unet_config.image_size, unet_config.in_channels, unet_config.out_channels) != (
                size, data.shape[1] + extra, data.shape[1]):
            what = "images" if c.autoencoder is None else "latents"
            plus = f" (+ {extra} channels of the {c.spatial} condition)" if extra else ""
            raise ValueError(f"the U-Net is built for size {unet_config.image_size}, in_channels "
                             f"{unet_config.in_channels}, out_channels {unet_config.out_channels}; the {what} have "
                             f"size {size} and {data.shape[1]} channels{plus}: make UNetConfig's image_size, "
                             f"in_channels and out_channels match")
        self.unet_config, self.conditioner_config, self.image_size = unet_config, conditioner_config, size
        world = self.dist.world_size
        if c.batch_size % world:
            raise ValueError(f"batch_size {c.batch_size} must be divisible by the number of processes {world}")

        torch.manual_seed(c.seed)  # the same initial weights on every process and in every run
        self.model = build_model(unet_config, conditioner_config, unet_class or UNet)
        if c.autoencoder is not None and not isinstance(self.model, ConditionalDenoiser):
            self.model = ConditionalDenoiser(self.model)  # the home of the concatenated spatial condition
        self.model = self.model.to(self.device)
        if c.init_from is not None and resume is None:  # a resumed run's weights come from its checkpoint
            latent = None if c.autoencoder is None else dict(
                autoencoder=autoencoder, scale_factor=scale_factor, spatial=c.spatial, num_classes=num_classes)
            self._init_from(c.init_from, latent)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        torch.manual_seed(stream_seed(c.seed, self.dist.rank, 2))  # the global generator drives dropout
        self.net: nn.Module = self.model  # what the loss calls: the model, or its DDP wrapper
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.diffusion = GaussianDiffusion(c.schedule, c.T, clip_x0=c.clip_x0)
        if c.autoencoder is not None:  # what samples: the autoencoder and the EMA denoiser
            self.latent = LatentDiffusion(autoencoder, self.ema, self.diffusion, scale_factor, c.spatial, num_classes)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        # every random number of the loop comes from these generators (one set per process): on the CPU, two;
        # on a GPU the loss's t and eps are drawn there by a third, so that no step copies noise from the host
        self.data_generator = torch.Generator().manual_seed(stream_seed(c.seed, self.dist.rank, 0))
        self.noise_generator = torch.Generator().manual_seed(stream_seed(c.seed, self.dist.rank, 1))
        self.loss_generator = self.noise_generator
        if self.device.type != "cpu":
            self.loss_generator = torch.Generator(self.device).manual_seed(stream_seed(c.seed, self.dist.rank, 3))
        extras = tuple(x for x in (cond, semantic) if x is not None)
        self.batches = random_batches(data, c.batch_size // world, *extras, generator=self.data_generator)
        self.amp_dtype = select_amp(self.device, c.amp)
        self.amp_seconds: Dict[str, float] = {}  # what amp="auto" measured on a GPU, by dtype
        self._probe_batch = [x[: c.batch_size // world] for x in (data, *extras)]  # what measure_amp times
        if c.amp == "auto" and self.device.type == "cuda":  # the faster of autocast and float32 for this network
            self.amp_dtype, self.amp_seconds = self.choose_amp((self.amp_dtype, None))
        self.scaler = torch.amp.GradScaler("cuda" if self.device.type == "cuda" else "cpu",
                                           enabled=self.amp_dtype == torch.float16)
        if c.compile != "off":  # the loss calls the compiled network; weights, EMA and checkpoints stay the module's
            self.net = torch.compile(self.net, mode=None if c.compile == "default" else c.compile,
                                     backend=COMPILE_BACKEND)
        # the conditions of the sample grids: every class in turn, or the first conditions of the data
        self.sample_cond: Optional[torch.Tensor] = None
        if cond is not None:
            n = c.n_samples
            self.sample_cond = (torch.arange(n) % conditioner_config.num_classes if conditioner_config.kind == "class"
                                else cond[torch.arange(n) % len(cond)])
        # the spatial conditions of the sample grids: the first images' semantic maps, or their inpainting
        rows = torch.arange(c.n_samples) % len(data)
        self.sample_semantic = semantic[rows] if semantic is not None else None
        self.sample_keep: Optional[torch.Tensor] = None  # an inpainting run's grids: a centred square hole
        if c.spatial == "inpaint":
            S = self.pixels.shape[-1]
            self.sample_keep = box_keep_masks(torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(c.n_samples, 4), S)
        self.step = 0
        self.loss_history: List[float] = []
        if resume is not None:
            self.load(resume)

    # -- one step of Algorithm 1 -------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (:func:`warmup_lr`). Lesson: 04_unet."""
        return warmup_lr(self.config.lr, self.config.warmup_steps, step)

    def choose_amp(self, candidates: Sequence[Optional[torch.dtype]]
                   ) -> Tuple[Optional[torch.dtype], Dict[str, float]]:
        """The fastest autocast dtype of ``candidates`` (None: float32) for one training step of this network on
        the first batch of the data (:func:`measure_amp`), with the seconds of each, printed on the main process.
        The trainer's model, generators and data stream are left as they were. Lesson: 04_unet."""
        x0, *rest = [x.to(self.device) for x in self._probe_batch]
        kwargs = self._model_kwargs(x0, rest, torch.Generator().manual_seed(0))
        dtype, seconds = measure_amp(self.model, self.diffusion, x0, kwargs or None, candidates, dist_info=self.dist)
        if self.dist.is_main:
            timings = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items())
            print(f"mixed precision (amp='auto'): one step's forward and backward took {timings}; training in "
                  f"{dtype_name(dtype)}")
        return dtype, seconds

    def _model_kwargs(self, x0: torch.Tensor, rest: List[torch.Tensor], generator: torch.Generator
                      ) -> Dict[str, Any]:
        """The denoiser's keyword arguments for a batch ``x0`` with the rest of its batch (the conditions, the
        semantic maps), drawing condition dropout and inpainting holes from ``generator``."""
        c = self.config
        kwargs: Dict[str, Any] = {}
        if self.conditioner_config is not None:  # the condition, dropped to the null one with probability p_uncond
            kwargs = {"cond": rest.pop(0).to(self.device, non_blocking=True),
                      "drop": condition_dropout(x0.shape[0], c.p_uncond, generator, self.device)}
        if c.spatial == "semantic":  # (B, K, h, w), stacked onto z_t
            kwargs["concat"] = rest.pop(0).to(self.device, non_blocking=True)
        elif c.spatial == "inpaint":  # a fresh random hole in each latent; the rest is known
            keep = random_keep_masks(x0.shape[0], x0.shape[-1], generator, p_hide_all=c.p_hide_all).to(self.device)
            kwargs["concat"] = inpaint_condition(x0, keep)
        return kwargs

    def train_step(self) -> float:
        """One optimizer step on a fresh batch ``(B, C, S, S)``; returns the loss (averaged over processes).
        A NaN or infinite loss raises FloatingPointError before the weights change. Lesson: 04_unet."""
        c = self.config
        self.net.train()
        batch = next(self.batches)
        batch = list(batch) if isinstance(batch, tuple) else [batch]
        x0 = batch.pop(0).to(self.device, non_blocking=True)  # (B / world, C, S, S): images, or latents z_0
        kwargs = self._model_kwargs(x0, batch, self.noise_generator)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = self.diffusion.L_simple(self.net, x0, model_kwargs=kwargs or None, generator=self.loss_generator)
        self.scaler.scale(loss).backward()  # under DDP this averages the gradients over processes
        value = mean_over_processes(loss, self.dist)
        if not np.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            where = f"; the last checkpoint in {c.out} is intact" if c.out else ""
            raise FloatingPointError(
                f"the loss is {value} at step {self.step}; training stopped before the weights changed{where}. "
                f"Lower the learning rate (now {c.lr}), keep grad_clip on, and check that the data is finite "
                f"and scaled to [-1, 1].")
        if c.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, ema_decay_at(self.step, c.ema_decay, c.ema_warmup))
        self.step += 1
        self.loss_history.append(value)
        return value

    def train(self, num_steps: Optional[int] = None) -> List[float]:
        """Train ``num_steps`` more steps (default: until ``config.steps``), writing sample grids and checkpoints
        into ``config.out`` on schedule and once more at the end. Returns the loss history. Lesson: 04_unet."""
        return train_loop(self, num_steps, "training", self.config.progress and self.dist.is_main)

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, n: Optional[int] = None, sampler: Optional[str] = None, steps: Optional[int] = None,
               seed: Optional[int] = None, cond: Optional[torch.Tensor] = None,
               guidance_scale: Optional[float] = None) -> torch.Tensor:
        """``n`` images ``(n, C, S, S)`` in [-1, 1] from the EMA weights (defaults from the config). A
        conditional model takes ``cond`` (default: the sample grid's conditions) and ``guidance_scale``.
        Lesson: 04_unet."""
        c = self.config
        if cond is not None:
            n = n or len(cond)
        else:
            n = n or c.n_samples
            if self.sample_cond is not None:  # the grid's conditions, repeated to fill n
                cond = self.sample_cond[torch.arange(n) % len(self.sample_cond)]
        guidance_scale = c.guidance_scale if guidance_scale is None else guidance_scale
        seed = c.seed if seed is None else seed
        if self.latent is not None:
            return self._sample_latent(n, sampler or c.sampler, steps or c.sample_steps, seed, cond, guidance_scale)
        return sample_images(self.ema, self.diffusion, n, sampler or c.sampler,
                             steps or (c.sample_steps if (sampler or c.sampler) == "ddim" else None),
                             seed, progress=False, cond=cond, guidance_scale=guidance_scale)

    def _sample_latent(self, n: int, sampler: str, steps: int, seed: int, cond: Optional[torch.Tensor],
                       guidance_scale: float) -> torch.Tensor:
        """Decoded samples of a latent run; an inpainting run fills the grid images' centres, a semantic run
        follows the grid images' maps."""
        rows = torch.arange(n) % len(self.pixels)
        if self.config.spatial == "inpaint":
            keep = self.sample_keep[torch.arange(n) % len(self.sample_keep)]
            return self.latent.inpaint(self.pixels[rows], keep, cond, guidance_scale, steps, seed)
        concat = self.sample_semantic[torch.arange(n) % len(self.sample_semantic)] \
            if self.sample_semantic is not None else None
        return self.latent.sample(n, cond, guidance_scale, concat, sampler, steps, seed=seed)

    def save_samples(self) -> Optional[Path]:
        """Write a sample grid to ``out/samples/step_NNNNNN.png`` (rank 0 only). Lesson: 04_unet."""
        if not (self.config.out and self.dist.is_main):
            return None
        return save_grid(self.sample(), Path(self.config.out) / "samples" / f"step_{self.step:06d}.png")

    def _init_from(self, name: str, latent: Optional[Dict[str, Any]] = None) -> None:
        """Load the weights of the shipped model (or exported folder) ``name`` into the fresh model, after checking
        that it was built with this run's U-Net and condition-encoder configuration. A latent run (``latent``:
        this run's ``autoencoder``, ``scale_factor``, ``spatial`` and ``num_classes``) starts from a latent
        diffusion model's denoiser, trained on the same autoencoder, scale factor and spatial condition."""
        kind = "unet" if latent is None else "ldm"
        try:
            state, config = read_asset(name, kind)
        except ValueError as e:
            run = "a pixel-space run (no autoencoder)" if latent is None else "a latent run (autoencoder=...)"
            raise ValueError(f"init_from: {e}; {run} starts from a {'pixel-space' if latent is None else 'latent'} "
                             f"model") from None
        if latent is not None:
            theirs = latent_diffusion_from(state, config, device="cpu")  # resolves a shipped autoencoder it names
            problems = [f"{key} {getattr(theirs, key)!r} (this run: {latent[key]!r})"
                        for key in ("spatial", "num_classes") if getattr(theirs, key) != latent[key]]
            if not math.isclose(theirs.scale_factor, latent["scale_factor"], rel_tol=1e-4):
                problems.append(f"latent scale factor {theirs.scale_factor:.6g} "
                                f"(this run: {latent['scale_factor']:.6g})")
            run_ae = {k: v.cpu() for k, v in latent["autoencoder"].state_dict().items()}
            model_ae = theirs.autoencoder.state_dict()
            if run_ae.keys() != model_ae.keys() or not all(torch.equal(v, model_ae[k]) for k, v in run_ae.items()):
                problems.append("another autoencoder's latents")
            if problems:
                raise ValueError(f"init_from={name!r} is a latent model of other latents than this run's: "
                                 + "; ".join(problems) + "; train on its autoencoder, with its spatial condition")
            state = {k[len("denoiser."):]: v for k, v in state.items() if k.startswith("denoiser.")}
        saved = {"unet": config["unet"], "conditioner": config.get("conditioner")}
        mine = {"unet": self.unet_config.to_dict(),
                "conditioner": self.conditioner_config.to_dict() if self.conditioner_config is not None else None}
        if (saved["conditioner"] is None) != (mine["conditioner"] is None):
            raise ValueError(f"init_from={name!r} is {'an un' if saved['conditioner'] is None else 'a '}conditional "
                             f"model, this run is {'un' if mine['conditioner'] is None else ''}conditional")
        saved = ckpt.with_added_settings(saved, mine, {"unet": UNetConfig, "conditioner": ConditionerConfig})
        diffs = ckpt.config_differences(saved, mine)
        if diffs:
            raise ValueError(f"init_from={name!r} was built differently from this run's network:\n  "
                             + "\n  ".join(diffs) + "\nconfigure the U-Net and the condition encoder as it was")
        self.model.load_state_dict(state)

    # -- checkpoints -----------------------------------------------------------------------------
    def configs(self) -> Dict[str, Dict[str, Any]]:
        """``{"train": TrainConfig dict, "unet": UNetConfig dict}`` (and ``"conditioner"`` for a conditional
        model), as stored in checkpoints. Lesson: 04_unet."""
        out = {"train": self.config.to_dict(), "unet": self.unet_config.to_dict()}
        if self.conditioner_config is not None:
            out["conditioner"] = self.conditioner_config.to_dict()
        if self.latent is not None:  # "ldm" (scale factor, spatial condition) and "autoencoder"
            out.update(self.latent.asset_config())
        return out

    def _rng_states(self) -> Dict[str, torch.Tensor]:
        states = {"data": self.data_generator.get_state(), "noise": self.noise_generator.get_state(),
                  "torch": torch.get_rng_state()}  # the global generator drives dropout
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.loss_generator is not self.noise_generator:
            states["loss"] = self.loss_generator.get_state()
        return states

    def save(self, folder: Optional[Union[str, os.PathLike]] = None) -> Optional[Path]:
        """Write a checkpoint into ``folder`` (default ``config.out``); under DDP every process must call it
        (their RNG states are gathered) and rank 0 writes. Returns the path on rank 0. Lesson: 04_unet."""
        folder = folder or self.config.out
        if folder is None:
            raise ValueError("no folder to save into: pass one, or set TrainConfig.out")
        rngs = gather_objects(self._rng_states(), self.dist)  # every process's, in rank order
        path = None
        if self.dist.is_main:
            opt_tensors, opt_rest = ckpt.flatten_optimizer_state(self.optimizer.state_dict())
            groups = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": opt_tensors,
                      "state": {"loss_history": torch.tensor(self.loss_history, dtype=torch.float64)},
                      "rng": {f"{r}/{name}": t for r, states in enumerate(rngs) for name, t in states.items()}}
            if self.latent is not None:  # the frozen autoencoder travels with the run
                groups["autoencoder"] = self.latent.autoencoder.state_dict()
            meta = {"config": self.configs(), "optimizer": opt_rest,
                    "trainer_state": {"step": self.step, "world_size": self.dist.world_size,
                                      "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}}
            path = ckpt.save_checkpoint(folder, groups, meta)
        barrier(self.dist)
        return path

    def load(self, folder: Union[str, os.PathLike]) -> None:
        """Resume from the checkpoint in ``folder``: weights, EMA, optimizer, step, loss history and random
        states. A checkpoint of another configuration is refused with the keys that differ. Lesson: 04_unet."""
        groups, meta = ckpt.read_checkpoint(folder)
        saved = ckpt.with_added_settings(meta["config"], self.configs(), {"train": TrainConfig, "unet": UNetConfig,
                                                                          "conditioner": ConditionerConfig})
        diffs = ckpt.config_differences(saved, self.configs(), ignore=[f"train.{k}" for k in RESUMABLE])
        if diffs:
            raise ValueError(f"the checkpoint in {str(folder)!r} comes from a different configuration:\n  "
                             + "\n  ".join(diffs) + "\nresume with the checkpoint's settings (the command line's "
                             "--resume reads them for you) or train into a new folder")
        self.model.load_state_dict(groups["model"])
        self.ema.load_state_dict(groups["ema"])
        if self.latent is not None:
            self.latent.autoencoder.load_state_dict(groups["autoencoder"])
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer_state(groups.get("optimizer", {}), meta["optimizer"]))
        state = meta["trainer_state"]
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.loss_history = groups["state"]["loss_history"].tolist()
        rank, rngs = self.dist.rank, groups["rng"]
        if state["world_size"] == self.dist.world_size:
            self.data_generator.set_state(rngs[f"{rank}/data"])
            self.noise_generator.set_state(rngs[f"{rank}/noise"])
            torch.set_rng_state(rngs[f"{rank}/torch"])
            if self.device.type == "cuda" and f"{rank}/cuda" in rngs:
                torch.cuda.set_rng_state(rngs[f"{rank}/cuda"], self.device)
            if self.loss_generator is not self.noise_generator and f"{rank}/loss" in rngs:
                self.loss_generator.set_state(rngs[f"{rank}/loss"])
        else:  # another number of processes: fresh streams, the run goes on but not bit for bit
            warnings.warn(f"the checkpoint was written by {state['world_size']} processes, this run has "
                          f"{self.dist.world_size}; resuming with fresh random streams (not bit-exact)")
            self.data_generator.manual_seed(stream_seed(self.config.seed, rank, 0, self.step))
            self.noise_generator.manual_seed(stream_seed(self.config.seed, rank, 1, self.step))
            if self.loss_generator is not self.noise_generator:
                self.loss_generator.manual_seed(stream_seed(self.config.seed, rank, 3, self.step))

    def close(self) -> None:
        """Leave the process group if this trainer created it. Lesson: 04_unet."""
        if self._owns_group:
            leave_process_group()
            self._owns_group = False


def load_checkpoint(path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
                    ) -> Tuple[nn.Module, GaussianDiffusion, Dict[str, Any]]:
    """A trained model from its run folder: ``(model, diffusion, configs)`` with the U-Net (or the
    conditional denoiser) holding the EMA weights (eval mode, on ``device`` or the best one), its
    :class:`GaussianDiffusion`, and ``{"train": TrainConfig, "unet": UNetConfig, "conditioner":
    ConditionerConfig or None, "step": int}``. The run of a latent diffusion model gives its
    :class:`~diffusion_course.ldm.LatentDiffusion` as the model (lesson 08). Lesson: 04_unet."""
    groups, meta = ckpt.read_checkpoint(path)
    train = TrainConfig.from_dict(meta["config"]["train"])
    if "ldm" in meta["config"]:  # a latent diffusion run: the LatentDiffusion model, autoencoder included
        state = {**{f"denoiser.{k}": v for k, v in groups["ema"].items()},
                 **{f"autoencoder.{k}": v for k, v in groups["autoencoder"].items()}}
        model = latent_diffusion_from(state, meta["config"], device)
        cc = meta["config"].get("conditioner")
        return model, model.diffusion, {"train": train, "unet": UNetConfig.from_dict(meta["config"]["unet"]),
                                        "conditioner": ConditionerConfig.from_dict(cc) if cc else None,
                                        "step": int(meta["trainer_state"]["step"])}
    unet_config = UNetConfig.from_dict(meta["config"]["unet"])
    cc = meta["config"].get("conditioner")
    conditioner_config = ConditionerConfig.from_dict(cc) if cc else None
    model = build_model(unet_config, conditioner_config)
    model.load_state_dict(groups["ema"])
    model = model.to(torch.device(device) if device is not None else get_device()).eval().requires_grad_(False)
    diffusion = GaussianDiffusion(train.schedule, train.T, clip_x0=train.clip_x0)
    return model, diffusion, {"train": train, "unet": unet_config, "conditioner": conditioner_config,
                              "step": int(meta["trainer_state"]["step"])}

