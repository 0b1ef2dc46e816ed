"""The ``train`` and ``sample`` commands of ``python -m diffusion_course``.

Taught in lesson 04_unet.

    python -m diffusion_course train --dataset digits --image-size 16 --steps 2000 --out runs/digits
    python -m diffusion_course train --resume runs/digits --steps 4000     # continue the run up to step 4000
    python -m diffusion_course sample --checkpoint runs/digits --out grid.png --sampler ddim --steps 50 --n 64
    python -m diffusion_course train --dataset digits --image-size 16 --condition class --out runs/cond
    python -m diffusion_course sample --checkpoint runs/cond --out sevens.png --labels 7 --n 16 --guidance-scale 3
    python -m diffusion_course train --dataset shapes --condition caption --out runs/shapes
    python -m diffusion_course sample --checkpoint runs/shapes --out red.png --caption "a red circle above a blue square"
    python -m diffusion_course train --init-from shapes_caption32 --steps 2000 --out runs/more  # fine-tune it
    python -m diffusion_course train --init-from ldm_shapes32 --lr 1e-4 --steps 2000 --out runs/ldm_more
    torchrun --nproc_per_node=4 -m diffusion_course train ...              # one process per GPU (DDP)

A run started with ``--init-from`` begins from a shipped model's weights (a new run: step 0, a fresh optimizer),
with that model's network and, unless given, its data set, condition and schedule (a latent model: also its
autoencoder and spatial condition, so that the run trains on the same latents). A resumed run takes every setting
from its checkpoint; options given beside ``--resume`` override them,
and the trainer refuses those that would change what the model learns (e.g. ``--lr``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict

from . import checkpoint as ckpt
import torch

from .autoencoder import AutoencoderConfig
from .conditions import conditional_data, encode_captions
from .data import DatasetUnavailable, get_dataset
from .distributed import leave_process_group, main_process_first, setup_distributed
from .ldm import LATENT_FIXED, LatentDiffusion, latent_unet_config
from .nn import ConditionerConfig, UNetConfig
from .pretrained import read_asset
from .solvers import SPACINGS
from .training import (AMP_CHOICES, SAMPLERS, Trainer, TrainConfig, load_checkpoint, sample_images, save_grid,
                       select_amp)

TRAIN_HELP = {
    "dataset": "data set name: digits, faces, photo_patches, photos, shapes (offline) or mnist, fashion_mnist, cifar10",
    "image_size": "side S of the (square) training images, pixels (default: the data set's own size)",
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
    "schedule": "beta schedule: linear, cosine or scaled_linear (latent diffusion's)",
    "clip_x0": "clamp the predicted x_0 to [-1, 1] while sampling (unset: on in pixel space, off for latents)",
    "sample_every": "write a sample grid every this many steps (0: only at the end)",
    "checkpoint_every": "write a checkpoint every this many steps (0: only at the end)",
    "n_samples": "images in each sample grid",
    "sampler": "sampler of the grids: ddim, ddpm, dpmpp2m, dpmpp2m_sde, dpmpp3m or dpmpp3m_sde",
    "sample_steps": "DDIM steps of the grids",
    "out": "run folder for checkpoints and sample grids (with --resume: defaults to the resumed folder)",
    "amp": "mixed precision: auto (on CUDA the faster of bf16/fp16 autocast and float32, measured and printed; "
           "float32 elsewhere), bf16 (a GPU, or a CPU with bfloat16 kernels), fp16 (GPU) or off",
    "compile": "torch.compile the denoiser: off, default, reduce-overhead or max-autotune (code generation takes "
               "a minute or more at the start)",
    "device": "cpu, cuda, cuda:1, mps (default: the best available)",
    "progress": "show a progress bar",
    "condition": "none (unconditional), class, caption or layout (the last two: shapes only)",
    "p_uncond": "probability of training a condition as the null condition (classifier-free guidance)",
    "guidance_scale": "classifier-free guidance scale of the sample grids",
    "autoencoder": "latent diffusion: a shipped autoencoder (e.g. ae_digits32_f4) or an exported folder; the model "
                   "trains on its latents",
    "spatial": "latent diffusion's spatial condition concatenated to z_t: none, inpaint or semantic (shapes)",
    "p_hide_all": "inpainting runs: probability that a training mask hides the whole image (plain generation)",
    "init_from": "fine-tune a shipped model (name or exported folder): a new run starting from its weights, with "
                 "its network, data set, image size, condition and schedule (and a latent model's autoencoder and "
                 "spatial condition) unless given",
}
ENCODER_SETTINGS = ("depth", "num_heads", "max_length")  # a condition encoder's own sizes
INIT_FROM_TASK = ("dataset", "image_size", "condition", "p_uncond", "T", "schedule", "clip_x0", "sampler", "sample_steps",
                  "guidance_scale")  # what --init-from takes from the model unless given
LATENT_TASK = ("autoencoder", "spatial", "p_hide_all")  # and from a latent model
OPTIONAL_TYPES = {"image_size": int, "out": str, "device": str, "autoencoder": str, "init_from": str}
BOOLEANS = ("ema_warmup", "progress", "clip_x0")
UNET_ARGS = {
    "model_channels": (int, "U-Net base channels"),
    "channel_mult": (lambda s: tuple(int(v) for v in s.split(",")), "channel multiplier per level, e.g. 1,2,2"),
    "num_res_blocks": (int, "residual blocks per level"),
    "attention_resolutions": (lambda s: tuple(int(v) for v in s.split(",") if v),
                              "down-sampling rates with attention, e.g. 2 or 2,4 (empty: none)"),
    "dropout": (float, "dropout rate"),
    "num_heads": (int, "attention heads"),
    "norm_groups": (int, "GroupNorm groups"),
    "context_dim": (int, "width d_tau of the condition tokens and of the cross-attention context (conditional "
                         "models; default 64 there)"),
    "transformer_depth": (int, "transformer blocks per attention site of a conditional U-Net"),
    "num_head_channels": (int, "channels per attention head (-1: use --num-heads)"),
}
TEXT_ARGS = {  # the caption encoder's own sizes (ConditionerConfig fields), by option
    "text_depth": ("depth", "transformer layers of the caption encoder tau_theta"),
    "text_heads": ("num_heads", "attention heads of the caption encoder's layers"),
}


def _add_train_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a DDPM U-Net (or continue a run with --resume)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f"(default: {f.default})"
        if f.name in BOOLEANS:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{TRAIN_HELP[f.name]} {default}")
        else:
            kind = OPTIONAL_TYPES[f.name] if f.default is None else type(f.default)
            p.add_argument(flag, type=kind, default=None, help=f"{TRAIN_HELP[f.name]} {default}")
    for name, (kind, text) in UNET_ARGS.items():
        default = UNetConfig.__dataclass_fields__[name].default
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"{text} (default: {default})")
    for name, (field, text) in TEXT_ARGS.items():
        default = ConditionerConfig.__dataclass_fields__[field].default
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{text} (caption conditions; default: {default})")
    p.set_defaults(func=_train)


def _add_sample_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("sample", help="write a PNG grid of samples from a trained run")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="run folder written by `train`")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="ddim (few steps, default 50), ddpm (all T steps), dpmpp2m (DPM-Solver++ 2M, "
                                                                       "default 20), dpmpp2m_sde (its stochastic form, default 25), "
                                                                       "dpmpp3m or dpmpp3m_sde (third order, same defaults)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50); DDPM always takes T")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--eta", type=float, default=None, help="the noise knob of ddim (default 0: deterministic) and of "
                                                             "dpmpp2m_sde / dpmpp3m_sde (in [0, 1], default 1: the reverse "
                                                             "SDE)")
    p.add_argument("--spacing", choices=SPACINGS, default="linspace",
                   help="time-step grid of ddim and the DPM-Solver++ samplers: linspace (default), leading, trailing or "
                        "logsnr (even in the log-SNR)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: a square)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--labels", default="", help="class-conditional models: class labels, e.g. 7 or 0,1,2 (repeated "
                                                 "to fill --n)")
    p.add_argument("--caption", action="append", default=[], help="caption-conditional models: a caption (give "
                                                                  "several --caption; repeated to fill --n)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="off",
                   help="run the network under autocast: bf16 (on a GPU, or a CPU with bfloat16 kernels), fp16 (GPU), "
                        "auto (a GPU's choice; float32 on the CPU) or off (default: float32)")
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
    text_over = {field: getattr(args, k) for k, (field, _) in TEXT_ARGS.items() if getattr(args, k) is not None}
    created = False  # whether this command (rather than the trainer) joined a process group
    try:
        if args.resume:
            saved = ckpt.read_config(args.resume)
            train_over.setdefault("out", str(args.resume))
            config = TrainConfig.from_dict({**saved["train"], **train_over})
            cc = ConditionerConfig.from_dict(saved["conditioner"]) if saved.get("conditioner") else None
            if text_over and (cc is None or cc.kind != "text"):
                raise ValueError("--text-depth and --text-heads size a caption encoder; this run has none")
            cc = ConditionerConfig.from_dict({**cc.to_dict(), **text_over}) if text_over else cc
            trainer = Trainer(config, UNetConfig.from_dict({**saved["unet"], **unet_over}), conditioner_config=cc,
                              resume=args.resume)
        else:
            if "out" not in train_over:
                return _fail("--out is required: the run folder for checkpoints and sample grids")
            if (Path(train_over["out"]) / ckpt.CHECKPOINT_FILE).exists():
                return _fail(f"{train_over['out']} already holds a checkpoint; continue it with "
                             f"--resume {train_over['out']}, or choose another --out")
            asset = None
            if "init_from" in train_over:  # the model to fine-tune fixes the network and, unless given, the task
                _, asset = read_asset(train_over["init_from"], ("unet", "ldm"))
                for key in INIT_FROM_TASK + (LATENT_TASK if "ldm" in asset else ()):
                    if key in asset["train"]:
                        train_over.setdefault(key, asset["train"][key])
                fixed = LATENT_FIXED if "ldm" in asset else ()  # the latents fix these
                unet_over = {**{k: v for k, v in asset["unet"].items() if k not in fixed}, **unet_over}
            config = TrainConfig.from_dict(train_over)
            info, _, created = setup_distributed(config.device)
            with main_process_first(info):  # one download at a time
                dataset = get_dataset(config.dataset, config.image_size)
            data = dataset.images  # (N, C, S, S)
            if config.condition != "none":
                unet_over.setdefault("context_dim", 64)
            if text_over and config.condition != "caption":
                raise ValueError(f"--text-depth and --text-heads size a caption encoder; condition is "
                                 f"{config.condition!r}")
            encoder = {k: v for k, v in (asset or {}).get("conditioner", {}).items() if k in ENCODER_SETTINGS}
            encoder.update(text_over)
            cond, cc = conditional_data(dataset, config.condition, unet_over.get("context_dim") or 64, **encoder)
            if config.autoencoder is None:
                unet = UNetConfig.from_dict({"image_size": data.shape[-1], "in_channels": data.shape[1], **unet_over})
                trainer = Trainer(config, unet, data, cond, cc)
            else:  # a latent run: the U-Net's shape comes from the autoencoder (and the data set's maps)
                _, ae = read_asset(config.autoencoder, "autoencoder")
                classes = len(dataset.classes) + 1 if config.spatial == "semantic" else 0
                unet = latent_unet_config(AutoencoderConfig.from_dict(ae["autoencoder"]), config.spatial, classes,
                                          **unet_over)
                trainer = Trainer(config, unet, conditioner_config=cc)
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
        model, diffusion, configs = load_checkpoint(args.checkpoint, args.device)
        if args.n < 1:
            raise ValueError(f"--n must be positive, got {args.n}")
        cond = _conditions(args, configs["conditioner"])
        if isinstance(model, LatentDiffusion):  # a latent run: sample latents, decode them
            if model.spatial != "none":
                raise ValueError(f"this latent model needs its {model.spatial} condition, which the command line does "
                                 f"not take; use LatentDiffusion.sample(concat=...) or .inpaint(...) in Python")
            if args.sampler == "ddpm" and args.steps not in (None, diffusion.T):
                raise ValueError(f"DDPM sampling takes all T = {diffusion.T} steps; use ddim or dpmpp2m for {args.steps}")
            images = model.sample(args.n, cond, args.guidance_scale, sampler=args.sampler, steps=args.steps,
                                  eta=args.eta, seed=args.seed, spacing=args.spacing,
                                  autocast=select_amp(model.device, args.amp))
        else:
            images = sample_images(model, diffusion, args.n, args.sampler, args.steps, args.seed, args.eta,
                                   cond=cond, guidance_scale=args.guidance_scale, spacing=args.spacing, amp=args.amp)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        return _fail(str(e))
    path = save_grid(images, args.out, args.nrow)
    print(f"wrote {args.n} samples ({args.sampler}) to {path}")
    return 0


def _conditions(args: argparse.Namespace, config: Any) -> Any:
    """The ``(n, ...)`` conditions that ``--labels`` / ``--caption`` ask for, or None for an unconditional model."""
    if config is None:
        if args.labels or args.caption:
            raise ValueError("this model is unconditional; drop --labels and --caption")
        return None
    if config.kind == "class":
        if not args.labels:
            raise ValueError(f"this model is class-conditional: pass --labels, e.g. --labels 0,1,2 "
                             f"(classes 0..{config.num_classes - 1})")
        try:
            labels = torch.tensor([int(v) for v in args.labels.split(",") if v.strip()])
        except ValueError:
            raise ValueError(f"--labels takes whole numbers separated by commas, got {args.labels!r}") from None
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= config.num_classes:
            raise ValueError(f"--labels must lie in 0..{config.num_classes - 1}, got {args.labels!r}")
        return labels[torch.arange(args.n) % len(labels)]
    if config.kind == "text":
        if not args.caption:
            raise ValueError('this model is caption-conditional: pass --caption "a red circle above a blue square"')
        ids = encode_captions(args.caption, config)
        return ids[torch.arange(args.n) % len(ids)]
    raise ValueError(f"sampling a {config.kind}-conditional model from the command line is not offered; "
                     f"use diffusion_course.training.sample_images with cond=(n, K, 5) layouts")
