"""The ``train`` and ``sample`` commands of ``python -m diffusion_course``.

Taught in lesson 04_unet.

    python -m diffusion_course train --dataset digits --image-size 16 --steps 2000 --out runs/digits
    python -m diffusion_course train --resume runs/digits --steps 4000     # continue the run up to step 4000
    python -m diffusion_course sample --checkpoint runs/digits --out grid.png --sampler ddim --steps 50 --n 64
    torchrun --nproc_per_node=4 -m diffusion_course train ...              # one process per GPU (DDP)

A resumed run takes every setting from its checkpoint; options given beside ``--resume`` override them,
and the trainer refuses those that would change what the model learns (e.g. ``--lr``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict

from . import checkpoint as ckpt
from .data import DatasetUnavailable, get_dataset
from .distributed import leave_process_group, main_process_first, setup_distributed
from .nn import UNetConfig
from .training import SAMPLERS, Trainer, TrainConfig, load_checkpoint, sample_images, save_grid

TRAIN_HELP = {
    "dataset": "data set name: digits, faces, photo_patches (offline) or mnist, fashion_mnist, cifar10",
    "image_size": "side S of the (square) training images, pixels",
    "batch_size": "global batch size (split over the processes of a multi-GPU run)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear learning-rate warm-up, steps",
    "steps": "train until this step (with --resume: the new end of the run)",
    "ema_decay": "decay of the exponential moving average of the weights (sampling uses the EMA)",
    "ema_warmup": "smaller EMA decay early in training: min(decay, (1 + n) / (10 + n))",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "seed": "seed of the initial weights and of every random stream",
    "T": "number of diffusion steps",
    "schedule": "beta schedule: linear or cosine",
    "clip_x0": "clamp the predicted x_0 to [-1, 1] while sampling",
    "sample_every": "write a sample grid every this many steps (0: only at the end)",
    "checkpoint_every": "write a checkpoint every this many steps (0: only at the end)",
    "n_samples": "images in each sample grid",
    "sampler": "sampler of the grids: ddim or ddpm",
    "sample_steps": "DDIM steps of the grids",
    "out": "run folder for checkpoints and sample grids (with --resume: defaults to the resumed folder)",
    "amp": "mixed precision: auto (bf16/fp16 on CUDA, off elsewhere), bf16, fp16 or off",
    "device": "cpu, cuda, cuda:1, mps (default: the best available)",
    "progress": "show a progress bar",
}
UNET_ARGS = {
    "model_channels": (int, "U-Net base channels"),
    "channel_mult": (lambda s: tuple(int(v) for v in s.split(",")), "channel multiplier per level, e.g. 1,2,2"),
    "num_res_blocks": (int, "residual blocks per level"),
    "attention_resolutions": (lambda s: tuple(int(v) for v in s.split(",") if v),
                              "down-sampling rates with attention, e.g. 2 or 2,4 (empty: none)"),
    "dropout": (float, "dropout rate"),
    "num_heads": (int, "attention heads"),
    "norm_groups": (int, "GroupNorm groups"),
}


def _add_train_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a DDPM U-Net (or continue a run with --resume)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f"(default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{TRAIN_HELP[f.name]} {default}")
        else:
            kind = str if f.default is None else type(f.default)
            p.add_argument(flag, type=kind, default=None, help=f"{TRAIN_HELP[f.name]} {default}")
    for name, (kind, text) in UNET_ARGS.items():
        default = UNetConfig.__dataclass_fields__[name].default
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"{text} (default: {default})")
    p.set_defaults(func=_train)


def _add_sample_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sample", help="write a PNG grid of samples from a trained run")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run folder written by `train`")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="ddim (few steps) or ddpm (all T steps)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50); DDPM always takes T")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: a square)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.set_defaults(func=_sample)


def register_cli(subparsers: Any) -> None:
    """Add ``train`` and ``sample`` to the command line of ``python -m diffusion_course``. Lesson: 04_unet."""
    _add_train_parser(subparsers)
    _add_sample_parser(subparsers)


def _fail(message: str, status: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def _train(args: argparse.Namespace) -> int:
    train_over: Dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                                  if getattr(args, f.name) is not None}
    unet_over = {k: getattr(args, k) for k in UNET_ARGS if getattr(args, k) is not None}
    created = False  # whether this command (rather than the trainer) joined a process group
    try:
        if args.resume:
            saved = ckpt.read_config(args.resume)
            train_over.setdefault("out", str(args.resume))
            config = TrainConfig.from_dict({**saved["train"], **train_over})
            trainer = Trainer(config, UNetConfig.from_dict({**saved["unet"], **unet_over}))
            trainer.load(args.resume)
        else:
            if "out" not in train_over:
                return _fail("--out is required: the run folder for checkpoints and sample grids")
            if (Path(train_over["out"]) / ckpt.CHECKPOINT_FILE).exists():
                return _fail(f"{train_over['out']} already holds a checkpoint; continue it with "
                             f"--resume {train_over['out']}, or choose another --out")
            config = TrainConfig.from_dict(train_over)
            info, _, created = setup_distributed(config.device)
            with main_process_first(info):  # one download at a time
                data = get_dataset(config.dataset, config.image_size).images  # (N, C, S, S)
            unet = UNetConfig(**{"image_size": config.image_size, "in_channels": data.shape[1], **unet_over})
            trainer = Trainer(config, unet, data)
    except (ValueError, FileNotFoundError, NotADirectoryError, DatasetUnavailable) as e:
        if created:
            leave_process_group()
        return _fail(str(e))
    try:
        if trainer.step >= config.steps and trainer.dist.is_main:
            print(f"the run is already at step {trainer.step} >= --steps {config.steps}; pass a larger --steps")
        trainer.train()
    except FloatingPointError as e:
        return _fail(str(e), 1)
    finally:
        trainer.close()
        if created:
            leave_process_group()
    if trainer.dist.is_main and trainer.loss_history:
        print(f"step {trainer.step}, loss {trainer.loss_history[-1]:.4f}; checkpoint and samples in {config.out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    try:
        model, diffusion, _ = load_checkpoint(args.checkpoint, args.device)
        if args.n < 1:
            raise ValueError(f"--n must be positive, got {args.n}")
        images = sample_images(model, diffusion, args.n, args.sampler, args.steps, args.seed, args.eta)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        return _fail(str(e))
    path = save_grid(images, args.out, args.nrow)
    print(f"wrote {args.n} samples ({args.sampler}) to {path}")
    return 0

