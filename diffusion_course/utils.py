"""Device choice, seeding, the run-mode switch and the environment report.

Taught in lesson 00_setup. Every lesson's first cell calls :func:`env_report`, and its configuration
cell calls :func:`by_mode` so that one switch (the environment variable ``DIFFUSION_COURSE_MODE``)
chooses the size of everything a lesson trains.
"""
from __future__ import annotations

import os
import platform
import random
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, fields
from typing import Any, Callable, Dict, Iterator, Optional, Type, TypeVar

import numpy as np
import torch

MODE_ENV = "DIFFUSION_COURSE_MODE"
MODES = ("quick", "default", "gpu")


def get_device(prefer: Optional[str] = None) -> torch.device:
    """Pick the best available device: CUDA, then Apple MPS, then the CPU.

    ``prefer`` (e.g. ``"cpu"``) overrides the choice; so does the environment variable
    ``DIFFUSION_COURSE_DEVICE``. Lesson: 00_setup.
    """
    choice = prefer or os.environ.get("DIFFUSION_COURSE_DEVICE")
    if choice:
        dev = torch.device(choice)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {choice!r} was asked for, but CUDA is not available here; "
                               "unset DIFFUSION_COURSE_DEVICE or pass prefer='cpu'.")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); return a CPU ``torch.Generator`` with that seed.

    Lesson: 00_setup.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _accelerator_present() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or (mps is not None and mps.is_available())


def run_mode() -> str:
    """The run mode: ``"quick"``, ``"default"`` or ``"gpu"``.

    * ``DIFFUSION_COURSE_MODE`` set to one of these wins;
    * otherwise ``quick`` when ``CI`` is set (continuous integration, and the test suite, which sets
      the variable before it runs the notebooks);
    * otherwise ``gpu`` when CUDA or MPS is available, else ``default``.

    Lesson: 00_setup.
    """
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode:
        if mode not in MODES:
            raise ValueError(f"{MODE_ENV}={mode!r} is not a run mode; use one of {', '.join(MODES)}")
        return mode
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return "quick"
    return "gpu" if _accelerator_present() else "default"


def by_mode(quick: Dict[str, Any], default: Dict[str, Any], gpu: Optional[Dict[str, Any]] = None,
            mode: Optional[str] = None) -> Dict[str, Any]:
    """Return the configuration for the current run mode.

    ``default`` holds every key; ``quick`` and ``gpu`` override some of them, so a size is written once
    per mode and never twice in a notebook. Lesson: 00_setup.
    """
    mode = mode or run_mode()
    if mode not in MODES:
        raise ValueError(f"unknown run mode {mode!r}; use one of {', '.join(MODES)}")
    for name, over in (("quick", quick), ("gpu", gpu or {})):
        extra = set(over) - set(default)
        if extra:
            raise KeyError(f"the {name} configuration sets {sorted(extra)}, which the default one lacks")
    cfg = dict(default)
    if mode == "quick":
        cfg.update(quick)
    elif mode == "gpu":
        cfg.update(gpu or {})
    cfg["mode"] = mode
    return cfg


def cuda_sync() -> None:
    """Wait for the GPU's queued work when CUDA is in use (nothing otherwise). Lesson: 08_latent_diffusion."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_it(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """The median wall-clock seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones, with CUDA
    synchronised before and after each call when it is in use. Lesson: 08_latent_diffusion."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        cuda_sync()
        t0 = time.perf_counter()
        fn()
        cuda_sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cpu_bf16_supported() -> bool:
    """True when this CPU has oneDNN's bfloat16 kernels (AVX-512 with BF16, or AMX), the condition under which bf16
    autocast runs on the CPU faster than float32 rather than through a slow emulation (``benchmarks/README.md``
    measures both). Lesson: 04_unet."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without the query
        return False


class Autocast(torch.nn.Module):
    """``model`` run under ``torch.autocast`` in ``dtype`` (bfloat16 by default), its output cast back to the dtype
    of its input: an eps-model that every sampler takes as it is, so that the network computes in low precision
    while the sampler's own updates stay in float32. Keyword arguments (a condition, ...) pass through, and
    ``config`` is the wrapped model's, so the samplers read the image shape from it. Lesson: 04_unet.
    """

    def __init__(self, model: Callable[..., torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast computes in torch.bfloat16 or torch.float16, got {dtype}")
        self.model, self.dtype = model, dtype

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.model(x, t, **kwargs)
        return out.to(x.dtype)


THREADS_ENV = "DIFFUSION_COURSE_THREADS"


def cpu_threads() -> int:
    """The number of CPU threads for torch: ``DIFFUSION_COURSE_THREADS`` when it is set (a positive integer), else
    torch's own choice (one per physical core it may use). One job alone runs fastest with every core; two jobs on
    one machine should split the cores between them (``DIFFUSION_COURSE_THREADS=1`` for each of two jobs on two
    cores): when both ask for every core, each one's threads wait at every parallel step for threads the other has
    pushed off the cores. ``benchmarks/bench_threads.py`` measures both cases. Lesson: 00_setup.
    """
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return torch.get_num_threads()
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {text!r}")
    return n


def set_cpu_threads(n: Optional[int] = None) -> int:
    """Give torch ``n`` CPU threads (default :func:`cpu_threads`) and return that number. Every command of
    ``python -m diffusion_course`` and :func:`env_report` call it, so ``DIFFUSION_COURSE_THREADS`` reaches the
    lessons and the command line alike. Lesson: 00_setup."""
    n = cpu_threads() if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of CPU threads must be a positive integer, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def in_colab() -> bool:
    """True inside a Google Colab runtime. Lesson: 00_setup."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def env_report(print_report: bool = True) -> Dict[str, str]:
    """Versions, device and run mode (and on a CPU, whether it has bfloat16 kernels), for the first cell of every
    lesson.

    Warns loudly when a Colab runtime has no GPU (Runtime > Change runtime type > GPU). Lesson: 00_setup.
    """
    import diffusion_course

    device = get_device()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusion_course": diffusion_course.__version__,
        "device": str(device),
        "run mode": run_mode(),
        "cpu threads": str(set_cpu_threads()),
        "colab": str(in_colab()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    elif device.type == "cpu":  # whether amp="bf16" pays on this CPU (lesson 04, section 8)
        info["cpu bfloat16 kernels"] = "yes (amp='bf16' is offered)" if cpu_bf16_supported() else "no"
    if print_report:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:>{width}} : {v}")
    if in_colab() and device.type != "cuda":
        msg = ("THIS COLAB RUNTIME HAS NO GPU. Training will be slow. "
               "Choose Runtime > Change runtime type > T4 GPU, then run the notebook again.")
        print("!" * 80 + "\n" + msg + "\n" + "!" * 80)
        warnings.warn(msg, stacklevel=2)
    return info


def count_parameters(module: torch.nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a module. Lesson: 03_training_and_sampling."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


T = TypeVar("T")


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Run the block with ``model`` in eval mode (dropout off, BatchNorm on its running statistics) if it is an
    ``nn.Module``, and give it back its training mode afterwards, also when the block raises; a plain function
    as model is left alone. The samplers use it. Lesson: 03_training_and_sampling."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def dataclass_from_dict(cls: Type[T], d: Dict[str, Any], what: str) -> T:
    """Build the configuration dataclass ``cls`` from a dict (e.g. read from a checkpoint); keys that ``cls``
    lacks are an error naming ``what`` ("U-Net configuration", ...). Lesson: 04_unet."""
    extra = set(d) - {f.name for f in fields(cls)}
    if extra:
        raise ValueError(f"unknown {what} keys: {sorted(extra)}")
    return cls(**d)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class ConfigDict:
    """What every configuration dataclass of the course shares: ``to_dict``, a JSON-friendly dict of every
    field (tuples as lists, as they come back from a checkpoint's JSON), and its inverse ``from_dict``, where a
    key the class lacks is an error naming ``_what``. Lesson: 04_unet."""

    _what = "configuration"

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-friendly dict of every field (tuples as lists). Lesson: 04_unet."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls: Type[T], d: Dict[str, Any]) -> T:
        """The inverse of :meth:`to_dict`; unknown keys are an error. Lesson: 04_unet."""
        return dataclass_from_dict(cls, d, cls._what)
