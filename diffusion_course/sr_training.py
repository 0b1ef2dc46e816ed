"""Training the super-resolution models of lesson 09: StableSR on a frozen prior, or the SR3-style baseline.

Taught in lesson 09_stablesr.

    python -m diffusion_course train-sr --prior ddpm_photos32 --kind stablesr --steps 3000 --out runs/sr_photos32
    python -m diffusion_course train-sr --resume runs/sr_photos32 --steps 4000       # continue to step 4000
    python -m diffusion_course export-sr --checkpoint runs/sr_photos32 --name sr_photos32

Every step draws high-resolution patches, degrades them afresh with the seeded pipeline of
:mod:`~diffusion_course.degradations` (new blur, noise and JPEG each time, as Real-ESRGAN trains), and takes
one optimizer step on the model's L_simple. Only the model's trainable parameters are in the optimizer (for
StableSR the time-aware encoder and the SFT layers: the prior's weights stay bit-identical). The engine
pieces are the U-Net trainer's (:mod:`~diffusion_course.training`): mixed-precision choice, EMA decay, seeded
random streams, atomic checkpoints; this loop is the part specific to super-resolution. One process
(no multi-GPU).
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .data import check_dataset_name, get_dataset
from .degradations import DegradationConfig, degrade, upsample
from .nn import TimeAwareEncoderConfig, UNetConfig
from .pretrained import add_export_arguments, export_cli, write_asset
from .stablesr import KINDS, SRDiffusion, build_sr, load_trainable, sr_config
from .training import AMP_CHOICES, ema_decay_at, save_grid, select_amp, stream_seed, train_loop, warmup_lr
from .utils import ConfigDict, get_device


RESUMABLE = ("steps", "checkpoint_every", "sample_every", "n_samples", "sample_steps", "out", "device", "progress",
             "amp")  # may change when a run resumes


@dataclass
class SRTrainConfig(ConfigDict):
    """Every choice of a super-resolution run. ``prior`` names a shipped unconditional model (pixel DDPM or
    latent diffusion); the high-resolution size is the prior's. ``encoder_mult`` empty means the prior
    U-Net's ``channel_mult``. ``degradation`` holds :class:`~diffusion_course.degradations.DegradationConfig`
    fields (its ``scale`` is ``scale``). The default learning rate suits StableSR's small trained parts, whose
    zero-initialised SFT heads must grow from nothing; the SR3-style baseline trains a whole U-Net from scratch
    and was shipped with 2e-4. Lesson: 09_stablesr."""

    _what = "super-resolution training configuration"

    kind: str = "stablesr"
    prior: str = "ddpm_photos32"
    dataset: str = "photos"
    scale: int = 4
    time_aware: bool = True
    fixed_t: int = 0
    encoder_channels: int = 32
    encoder_out: int = 64
    encoder_mult: Tuple[int, ...] = ()
    encoder_res_blocks: int = 1
    sft_hidden: int = 32
    degradation: Dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 0
    steps: int = 2000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 500
    n_samples: int = 8
    sample_steps: int = 50
    out: Optional[str] = None
    device: Optional[str] = None
    amp: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.encoder_mult = tuple(int(m) for m in self.encoder_mult)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        for name in ("batch_size", "steps", "scale", "encoder_channels", "encoder_out", "encoder_res_blocks",
                     "sft_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_dataset_name(self.dataset)
        self.degradation_config()  # a clear error now rather than at the first step

    def degradation_config(self) -> DegradationConfig:
        """The degradation pipeline of this run. Lesson: 09_stablesr."""
        return DegradationConfig.from_dict({**self.degradation, "scale": self.scale})


def hr_size(model: SRDiffusion) -> int:
    """The side of the high-resolution images a model works on. Lesson: 09_stablesr."""
    return model.autoencoder.config.image_size if model.autoencoder is not None else model.unet.config.image_size


class SRTrainer:
    """Trains a super-resolution model (:func:`~diffusion_course.stablesr.build_sr`) on high-resolution
    images ``data`` ``(N, C, H, H)`` in [-1, 1] (default: the training split of ``config.dataset``).
    Lesson: 09_stablesr."""

    def __init__(self, config: SRTrainConfig, data: Optional[torch.Tensor] = None,
                 test_data: Optional[torch.Tensor] = None) -> None:
        self.config = c = config
        self.device = get_device(c.device)
        encoder = {"model_channels": c.encoder_channels, "out_channels": c.encoder_out,
                   "num_res_blocks": c.encoder_res_blocks, "channel_mult": c.encoder_mult or None}
        with torch.random.fork_rng(devices=[]):  # the fresh weights come from the run's seed, not the global RNG
            torch.manual_seed(c.seed)
            self.model = build_sr(c.prior, c.kind, encoder, c.sft_hidden, c.scale, c.time_aware, c.fixed_t,
                                  self.device)
        self.size = hr_size(self.model)
        self.data = data if data is not None else get_dataset(c.dataset, self.size, "train").images
        self.test_data = test_data if test_data is not None else self._test_images()
        for name, x in (("data", self.data), ("test_data", self.test_data)):
            if x is not None and (x.ndim != 4 or tuple(x.shape[-2:]) != (self.size, self.size)):
                raise ValueError(f"{name} must be high-resolution images (N, C, {self.size}, {self.size}) for this "
                                 f"prior, got {tuple(x.shape)}")
        self.degradation = c.degradation_config()
        self.params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.model.parameter_groups(), lr=c.lr, weight_decay=0.0)
        self.ema = {k: v.detach().clone() for k, v in self.model.trainable_state_dict().items()}
        self.amp_dtype = select_amp(self.device, c.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.generators = {name: torch.Generator().manual_seed(stream_seed(c.seed, 0, stream))
                           for stream, name in enumerate(("data", "noise", "degradation"))}
        self.step, self.loss_history = 0, []

    def _test_images(self) -> Optional[torch.Tensor]:
        try:
            return get_dataset(self.config.dataset, self.size, "test").images[: self.config.n_samples]
        except ValueError:
            return None

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then constant (:func:`~diffusion_course.training.warmup_lr`).
        Lesson: 09_stablesr."""
        return warmup_lr(self.config.lr, self.config.warmup_steps, step)

    def train_step(self) -> float:
        """One optimizer step on freshly degraded patches; returns the loss. A NaN or infinite loss raises
        FloatingPointError before the weights change. Lesson: 09_stablesr."""
        c, g = self.config, self.generators
        self.model.train()
        idx = torch.randint(len(self.data), (c.batch_size,), generator=g["data"])
        hr = self.data[idx]
        lr = degrade(hr, self.degradation, generator=g["degradation"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = self.model.loss(hr.to(self.device), lr.to(self.device), generator=g["noise"])
        value = float(loss.detach())
        if not np.isfinite(value):
            where = f"; the last checkpoint in {c.out} is intact" if c.out else ""
            raise FloatingPointError(f"the loss is {value} at step {self.step}; training stopped before the weights "
                                     f"changed{where}. Lower the learning rate (now {c.lr}) and check the data.")
        self.scaler.scale(loss).backward()
        if c.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        decay = ema_decay_at(self.step, c.ema_decay, c.ema_warmup)
        with torch.no_grad():
            for name, p in self.model.trainable_state_dict().items():
                self.ema[name].mul_(decay).add_(p, alpha=1.0 - decay)
        self.step += 1
        self.loss_history.append(value)
        return value

    def train(self, num_steps: Optional[int] = None) -> List[float]:
        """Train ``num_steps`` more steps (default: until ``config.steps``), writing checkpoints and sample
        grids into ``config.out`` on schedule and at the end. Returns the loss history. Lesson: 09_stablesr."""
        return train_loop(self, num_steps, "training SR", self.config.progress)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[SRDiffusion]:
        """The model with its EMA weights inside the ``with`` block, its own weights again after it.
        Lesson: 09_stablesr."""
        own = {k: v.clone() for k, v in self.model.trainable_state_dict().items()}
        load_trainable(self.model, self.ema)
        try:
            yield self.model
        finally:
            load_trainable(self.model, own)

    def save_samples(self) -> Optional[Path]:
        """A grid of the test patches: bicubic | super-resolved (EMA, DDIM) | high resolution, one row each.
        Lesson: 09_stablesr."""
        c = self.config
        if self.test_data is None or not c.out:
            return None
        hr = self.test_data[: c.n_samples]
        lr = degrade(hr, self.degradation, seed=0)
        with self.ema_weights() as model:
            sr = model.sample(lr, c.sample_steps, generator=torch.Generator().manual_seed(0)).cpu()
        rows = torch.cat([upsample(lr, c.scale), sr, hr])
        return save_grid(rows, Path(c.out) / "samples" / f"step_{self.step:06d}.png", nrow=len(hr))

    def configs(self) -> Dict[str, Any]:
        """``{"train": ..., "sr": ..., "unet": ..., "encoder": ...}`` as stored in checkpoints. Lesson: 09_stablesr."""
        return {"train": self.config.to_dict(), **sr_config(self.model, self.config.prior)}

    def save(self, folder: Optional[Union[str, Path]] = None) -> Path:
        """Write a checkpoint (trained weights, EMA, optimizer, step, losses, random streams) atomically.
        Lesson: 09_stablesr."""
        folder = folder or self.config.out
        if folder is None:
            raise ValueError("no folder to save into: pass one, or set SRTrainConfig.out")
        opt_tensors, opt_rest = ckpt.flatten_optimizer_state(self.optimizer.state_dict())
        groups = {"model": dict(self.model.trainable_state_dict()), "ema": self.ema, "optimizer": opt_tensors,
                  "state": {"loss_history": torch.tensor(self.loss_history, dtype=torch.float64)},
                  "rng": {name: g.get_state() for name, g in self.generators.items()}}
        meta = {"config": self.configs(), "optimizer": opt_rest,
                "trainer_state": {"step": self.step,
                                  "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}}
        return ckpt.save_checkpoint(folder, groups, meta)

    def load(self, folder: Union[str, Path]) -> None:
        """Resume from the checkpoint in ``folder``; one of another configuration is refused with the
        settings that differ. Lesson: 09_stablesr."""
        groups, meta = ckpt.read_checkpoint(folder)
        saved = ckpt.with_added_settings(meta["config"], self.configs(), {"train": SRTrainConfig, "unet": UNetConfig,
                                                                          "encoder": TimeAwareEncoderConfig})
        diffs = ckpt.config_differences(saved, self.configs(), ignore=[f"train.{k}" for k in RESUMABLE])
        if diffs:
            raise ValueError(f"the checkpoint in {str(folder)!r} comes from a different configuration:\n  "
                             + "\n  ".join(diffs) + "\nresume with the checkpoint's settings or train into a new folder")
        load_trainable(self.model, groups["model"])
        self.ema = {k: v.to(self.device).clone() for k, v in groups["ema"].items()}
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer_state(groups.get("optimizer", {}), meta["optimizer"]))
        state = meta["trainer_state"]
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.loss_history = groups["state"]["loss_history"].tolist()
        for name, g in self.generators.items():
            g.set_state(groups["rng"][name])


def export_sr(run_dir: Union[str, Path], out_dir: Union[str, Path], command: str = "",
              dtype: torch.dtype = torch.float16) -> Path:
    """Ship a run's EMA weights (the trained parts only, cast to ``dtype``) with its configuration; the asset
    names its prior with the SHA-256 of the prior's weights. Lesson: 09_stablesr."""
    groups, meta = ckpt.read_checkpoint(run_dir)
    if "ema" not in groups or "sr" not in meta.get("config", {}):
        raise ValueError(f"{run_dir} is not a run folder of `python -m diffusion_course train-sr`")
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in groups["ema"].items()}
    return write_asset(out_dir, weights, {**meta["config"], "step": int(meta["trainer_state"]["step"])}, command)


# -- command line -----------------------------------------------------------------------------------------
HELP = {
    "kind": "stablesr (frozen prior + time-aware encoder + SFT) or concat (SR3-style baseline, whole U-Net trained)",
    "prior": "shipped unconditional prior (pixel DDPM or latent diffusion) or an exported folder",
    "dataset": "high-resolution images: photos (offline), folder:PATH (a folder of your own images) or another name",
    "time_aware": "the encoder sees the step t (off: it always sees fixed_t)",
}


def _parse_ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _train_cli(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(SRTrainConfig)
             if f.name != "degradation" and getattr(args, f.name, None) is not None}
    degradation = {k: getattr(args, k) for k in ("second_order",) if getattr(args, k) is not None}
    if args.resume:
        _, meta = ckpt.read_checkpoint(args.resume)
        saved = meta["config"]["train"]
        config = SRTrainConfig.from_dict({**saved, **{k: v for k, v in given.items() if k in RESUMABLE},
                                          "out": given.get("out", args.resume)})
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != saved.get(k))
        if changed or degradation:
            raise SystemExit(f"--resume keeps the run's settings; these cannot change: {changed or ['degradation']}")
        trainer = SRTrainer(config)
        trainer.load(args.resume)
    else:
        if "encoder_mult" in given:
            given["encoder_mult"] = _parse_ints(given["encoder_mult"])
        trainer = SRTrainer(SRTrainConfig(**given, degradation=degradation))
    trainer.train()
    print(f"step {trainer.step}, loss {np.mean(trainer.loss_history[-100:]):.4f}; checkpoint in {trainer.config.out}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``train-sr`` and ``export-sr`` commands. Lesson: 09_stablesr."""
    p = subparsers.add_parser("train-sr", help="train a super-resolution model on a frozen prior (lesson 09)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", default="", help="continue the run whose checkpoint is in this folder")
    for f in fields(SRTrainConfig):
        if f.name == "degradation":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(f.name, ""))
        elif f.name == "encoder_mult":
            p.add_argument(flag, default=None, help="encoder channel multipliers, e.g. 1,2,2 (default: the prior's)")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, help=f"{HELP.get(f.name, '')} (default: {f.default!r})")
    p.add_argument("--second-order", type=float, default=None,
                   help="probability that a patch goes through the second degradation stage")
    p.set_defaults(func=_train_cli)
    e = subparsers.add_parser("export-sr", help="ship a super-resolution run's EMA weights as a small model")
    add_export_arguments(e, "train-sr")
    e.set_defaults(func=lambda args: export_cli(args, export_sr))
