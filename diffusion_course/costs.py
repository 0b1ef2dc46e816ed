"""Pixel against latent: what one conditional U-Net family costs in pixel space and in latent space, and the
quality each reaches in the same wall-clock budget. Taught in lesson 08_latent_diffusion.

* time: the median seconds of ``repeats`` calls after ``warmup`` ones, CUDA synchronised (:func:`time_it`);
* memory: the bytes autograd saves for backward in a step, each storage once, parameters left out
  (:func:`activation_bytes`; deterministic, device-independent); on CUDA also ``torch.cuda.max_memory_allocated``;
* a training step: one L_simple forward + backward on a batch, no optimiser (its cost per parameter is the same in
  both spaces). The latent model trains on cached latents z_0 = s E(x), so its step never runs the encoder;
  encoding and decoding a batch are reported as one-off costs;
* a sampling call: one no-grad network call on a batch (a guided DDIM step is one call on 2B).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .autoencoder import Autoencoder, AutoencoderConfig
from .conditions import build_model
from .data import get_dataset
from .ddpm import GaussianDiffusion
from .ldm import LatentDiffusion, latent_unet_config
from .metrics import load_digit_classifier, sample_quality
from .nn import ConditionerConfig, UNetConfig
from .pretrained import load_autoencoder
from .training import Trainer, TrainConfig, sample_images, select_amp
from .utils import cuda_sync as _sync, time_it  # noqa: F401  (time_it is part of this module's interface)
from .utils import get_device

# the U-Net family of the comparison: three levels, so that it also fits the 4x4 latents of f = 8
UNET_SETTINGS: Dict[str, Any] = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                     attention_resolutions=(2,), norm_groups=8, context_dim=64)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """The bytes of the tensors autograd saves for backward while ``fn()`` runs (``saved_tensors_hooks``), each
    distinct storage once, those of ``exclude`` (e.g. the parameters, there anyway) not at all.
    Lesson: 08_latent_diffusion."""
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
    seen: Dict[Tuple[torch.device, int], int] = {}
    alive: List[Any] = []  # held until the end, so that no counted address is reused by another tensor

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in skip and key not in seen:
            seen[key] = storage.nbytes()
            alive.append(storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))




def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def training_step_cost(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor,
                       model_kwargs: Optional[Dict[str, Any]] = None, repeats: int = 3, warmup: int = 1,
                       amp_dtype: Optional[torch.dtype] = None, seed: int = 0) -> Dict[str, Any]:
    """One L_simple forward + backward of ``model`` on ``x0`` ``(B, C, H, W)`` (images or cached latents; the same
    t and eps each time; no optimiser, gradients cleared after): ``seconds`` (median), ``activation_bytes``,
    ``params``, ``cuda_peak_bytes`` (None off CUDA). Lesson: 08_latent_diffusion."""
    params = list(model.parameters())
    was = model.training
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(x0.device, amp_dtype):
            loss = diffusion.L_simple(model, x0, model_kwargs=model_kwargs,
                                      generator=torch.Generator().manual_seed(seed))
        loss.backward()

    seconds = time_it(step, repeats, warmup)
    saved = activation_bytes(step, exclude=params)
    peak = _cuda_peak(step, x0.device)
    model.zero_grad(set_to_none=True)
    model.train(was)
    return dict(seconds=seconds, activation_bytes=saved, params=sum(p.numel() for p in params),
                cuda_peak_bytes=peak)


@torch.no_grad()
def sampling_call_cost(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                       model_kwargs: Optional[Dict[str, Any]] = None, repeats: int = 3, warmup: int = 1,
                       amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """One no-grad call ``model(x, t, **model_kwargs)``, ``x`` ``(B, C, H, W)``, ``t`` ``(B,)``: ``seconds``
    (median), ``cuda_peak_bytes`` (None off CUDA). Lesson: 08_latent_diffusion."""
    was = model.training
    model.eval()

    def call() -> None:
        with _autocast(x.device, amp_dtype):
            model(x, t, **(model_kwargs or {}))

    out = dict(seconds=time_it(call, repeats, warmup), cuda_peak_bytes=_cuda_peak(call, x.device))
    model.train(was)
    return out


def autoencoder_cost(latent: LatentDiffusion, images: torch.Tensor, repeats: int = 3, warmup: int = 1
                     ) -> Dict[str, float]:
    """The one-off costs around a latent model's denoiser for a batch ``images`` ``(B, C, H, W)``: ``encode_seconds``
    (once per image, when the data is cached), ``decode_seconds`` (once per sample). Lesson: 08_latent_diffusion."""
    images = images.to(latent.device)
    z = latent.encode(images)
    return dict(encode_seconds=time_it(lambda: latent.encode(images), repeats, warmup),
                decode_seconds=time_it(lambda: latent.decode(z), repeats, warmup))


def pixel_and_latent_unets(autoencoder_config: AutoencoderConfig, image_channels: int, image_size: int,
                           **unet_settings: Any) -> Tuple[UNetConfig, UNetConfig]:
    """``(pixel, latent)`` UNetConfigs of one family (the same model_channels, channel_mult, num_res_blocks,
    context_dim, attention at the same rates, so the same relative levels) for ``(image_channels, image_size,
    image_size)`` images and the autoencoder's latents; defaults from ``UNET_SETTINGS``. Lesson: 08_latent_diffusion."""
    a = autoencoder_config
    if (a.in_channels, a.image_size) != (image_channels, image_size):
        raise ValueError(f"the autoencoder takes {a.in_channels}-channel images of size {a.image_size}, not "
                         f"{image_channels}-channel images of size {image_size}")
    settings = {**UNET_SETTINGS, **unet_settings}
    h, levels = a.latent_shape[1], len(settings["channel_mult"])
    if h % 2 ** (levels - 1):
        raise ValueError(f"channel_mult {tuple(settings['channel_mult'])} down-samples by {2 ** (levels - 1)}, but "
                         f"the latents of f = {a.downsampling_factor} are {h}x{h}: use at most "
                         f"{int(math.log2(h & -h)) + 1} levels so that the same family fits both")
    return (UNetConfig(image_size=image_size, in_channels=image_channels, **settings),
            latent_unet_config(a, **settings))


def _autoencoder_for(f: int, base: Autoencoder, scale_factor: float, seed: int) -> Tuple[Autoencoder, float, bool]:
    """The shipped autoencoder when it has factor ``f``; else one of the same family, randomly initialised."""
    if f == base.config.downsampling_factor:
        return base, scale_factor, True
    settings = {k: v for k, v in base.config.to_dict().items() if k != "channel_mult"}
    torch.manual_seed(seed)
    return Autoencoder(AutoencoderConfig.for_factor(f, **settings)).to(base.device).eval(), 1.0, False


def compare_costs(batch_size: int = 64, factors: Sequence[int] = (4, 8), autoencoder: str = "ae_digits32_f4",
                  device: Optional[str] = None, repeats: int = 3, warmup: int = 1, amp: str = "off", seed: int = 0,
                  unet_settings: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Rows for pixel, then latent at each f in ``factors``: ``params``, ``step_seconds``, ``call_seconds``,
    ``activation_bytes``, ``cuda_peak_bytes``, each with its ``*_ratio`` (pixel / row: times cheaper), and for
    latents ``encode_seconds``, ``decode_seconds``. Class-conditional U-Nets of :func:`pixel_and_latent_unets`
    on random batches of ``batch_size`` (costs do not depend on the values). The shipped ``autoencoder`` serves
    its own f; for another f (none ships) one of the same family (``AutoencoderConfig.for_factor``) is **randomly
    initialised**, as costs do not depend on the weights (``trained_autoencoder``). Lesson: 08_latent_diffusion."""
    dev = torch.device(device) if device is not None else get_device()
    amp_dtype = select_amp(dev, amp)
    base, info = load_autoencoder(autoencoder, device=dev)
    a = base.config
    settings = {**UNET_SETTINGS, **(unet_settings or {})}
    cc = ConditionerConfig(kind="class", context_dim=settings["context_dim"], num_classes=10)
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand((batch_size, a.in_channels, a.image_size, a.image_size), generator=g) * 2 - 1).to(dev)
    kwargs = {"cond": torch.randint(0, 10, (batch_size,), generator=g).to(dev)}
    t = torch.full((batch_size,), 500, device=dev)
    rows: List[Dict[str, Any]] = []
    for f in (1,) + tuple(factors):
        ae, scale, trained = _autoencoder_for(f, base, info["scale_factor"], seed) if f > 1 else (None, 1.0, None)
        unet = pixel_and_latent_unets(ae.config if ae else a, a.in_channels, a.image_size, **settings)[int(f > 1)]
        torch.manual_seed(seed)
        model = build_model(unet, cc).to(dev)
        diffusion = GaussianDiffusion("linear" if f == 1 else "scaled_linear", clip_x0=f == 1)
        x = images if f == 1 else torch.randn((batch_size, unet.in_channels, unet.image_size, unet.image_size),
                                              generator=g).to(dev)
        step = training_step_cost(model, diffusion, x, kwargs, repeats, warmup, amp_dtype, seed)
        call = sampling_call_cost(model, x, t, kwargs, repeats, warmup, amp_dtype)
        peak = max(step["cuda_peak_bytes"], call["cuda_peak_bytes"]) if dev.type == "cuda" else None
        row = dict(name="pixel" if f == 1 else f"latent f={f}", f=f, input_shape=list(x.shape[1:]),
                   params=step["params"], step_seconds=step["seconds"], call_seconds=call["seconds"],
                   activation_bytes=step["activation_bytes"], cuda_peak_bytes=peak)
        if ae is not None:
            row.update(trained_autoencoder=trained,
                       **autoencoder_cost(LatentDiffusion(ae, model, diffusion, scale), images, repeats, warmup))
        rows.append(row)
    for row in rows:
        for key in ("step_seconds", "call_seconds", "activation_bytes", "cuda_peak_bytes"):
            row[key.replace("_seconds", "").replace("_bytes", "") + "_ratio"] = (
                rows[0][key] / row[key] if row[key] and rows[0][key] else None)
    return rows


def train_for_budget(budget_s: float, batch_size: int = 64, autoencoder: str = "ae_digits32_f4",
                     n_train: Optional[int] = None, device: Optional[str] = None,
                     unet_settings: Optional[Dict[str, Any]] = None, **train: Any) -> Dict[str, Dict[str, Any]]:
    """Train a pixel and a latent class-conditional model of one family (:func:`pixel_and_latent_unets`) on the
    first ``n_train`` training digits (default all), ``budget_s`` seconds of :meth:`Trainer.train_step` each (a
    step under way at the end is finished); same batch, lr (5e-4 unless ``train`` says) and condition encoder;
    schedules ``linear`` (pixel), ``scaled_linear`` (latent, cached before the clock starts: ``setup_seconds``).
    Returns ``{"pixel": ..., "latent f=F": ...}`` with ``steps``, ``seconds``, ``setup_seconds``, ``loss`` (last
    20 steps), and ``model`` (EMA denoiser, or LatentDiffusion), ``diffusion``, ``trainer``.
    Lesson: 08_latent_diffusion."""
    a = load_autoencoder(autoencoder, device="cpu")[0].config
    data = get_dataset("digits", a.image_size)
    n = n_train or len(data.images)
    settings = {**UNET_SETTINGS, **(unet_settings or {})}
    units = pixel_and_latent_unets(a, data.images.shape[1], a.image_size, **settings)
    cc = ConditionerConfig(kind="class", context_dim=settings["context_dim"], num_classes=10)
    common = dict(dataset="digits", image_size=a.image_size, condition="class", batch_size=batch_size, lr=5e-4,
                  sample_every=0, checkpoint_every=0, out=None, progress=False, device=device)
    runs = (("pixel", units[0], dict(schedule="linear")),
            (f"latent f={a.downsampling_factor}", units[1], dict(schedule="scaled_linear", autoencoder=autoencoder)))
    out: Dict[str, Dict[str, Any]] = {}
    for name, unet, space in runs:
        t0 = time.perf_counter()
        trainer = Trainer(TrainConfig(**{**common, **space, **train}), unet, data.images[:n], data.labels[:n], cc)
        setup = time.perf_counter() - t0
        _sync()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < budget_s:
            trainer.train_step()  # returns the loss as a float, so the GPU has finished the step
        seconds = time.perf_counter() - t0
        recent = trainer.loss_history[-20:]
        out[name] = dict(steps=trainer.step, seconds=seconds, setup_seconds=setup,
                         loss=sum(recent) / len(recent) if recent else float("nan"),
                         model=trainer.latent if trainer.latent is not None else trainer.ema,
                         diffusion=trainer.diffusion, trainer=trainer)
    return out


def score_digits(images: torch.Tensor, want: torch.Tensor, classifier: Optional[nn.Module] = None,
                 reference: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Digits ``(N, 1, S, S)`` in [-1, 1] meant to be ``want`` ``(N,)``, by the digit classifier: ``adherence`` (share
    read as the asked-for digit), ``fd`` to ``reference`` (default: the test split) and ``confident_share`` (from
    :func:`~diffusion_course.metrics.sample_quality`), ``n``, ``n_reference``. Lesson: 08_latent_diffusion."""
    size = images.shape[-1]
    classifier = classifier if classifier is not None else load_digit_classifier(size)
    if reference is None:
        reference = get_dataset("digits", size, split="test").images
    q = sample_quality(images, reference, classifier, reference_name="digits test split")
    adherence = (classifier.predict_proba(images).argmax(1) == want.cpu()).float().mean().item()
    return dict(adherence=adherence, fd=q["fd"], confident_share=q["confident_share"], n=len(images),
                n_reference=q["n_reference"])


def score_class_model(model: nn.Module, diffusion: Optional[GaussianDiffusion] = None, n: int = 100,
                      steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
                      classifier: Optional[nn.Module] = None, reference: Optional[torch.Tensor] = None,
                      batch_size: int = 250) -> Dict[str, Any]:
    """:func:`score_digits` of ``n`` samples of a class-conditional model (labels 0..9 in turn; DDIM, ``steps``
    steps, guidance ``guidance_scale``): a pixel denoiser with its ``diffusion``, or a LatentDiffusion (decoded).
    Adds ``sample_seconds`` (decoding included), ``ddim_steps``, ``guidance_scale``. Lesson: 08_latent_diffusion."""
    want = torch.arange(n) % 10
    if not isinstance(model, LatentDiffusion) and diffusion is None:
        raise ValueError("a pixel-space model needs its diffusion process: pass diffusion=...")
    chunks = []
    _sync()
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        c = want[i:i + batch_size]
        if isinstance(model, LatentDiffusion):
            chunks.append(model.sample(len(c), cond=c, guidance_scale=guidance_scale, steps=steps, seed=seed + i))
        else:
            chunks.append(sample_images(model, diffusion, len(c), "ddim", steps, seed=seed + i, progress=False,
                                        cond=c, guidance_scale=guidance_scale))
    seconds = time.perf_counter() - t0
    return dict(score_digits(torch.cat(chunks), want, classifier, reference), sample_seconds=seconds,
                ddim_steps=steps, guidance_scale=guidance_scale)
