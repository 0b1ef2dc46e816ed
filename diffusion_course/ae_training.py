"""Training the latent-diffusion autoencoder with L_AE, its checkpoints, and its commands.

Taught in lesson 06_ldm_autoencoder.

    python -m diffusion_course train-autoencoder --dataset digits --image-size 32 --factor 4 --steps 3000 \\
        --out runs/ae_digits32
    python -m diffusion_course train-autoencoder --resume runs/ae_digits32 --steps 4000   # continue to 4000
    python -m diffusion_course export-autoencoder --checkpoint runs/ae_digits32 --name ae_digits32_f4

Each step first updates the autoencoder (E, D and, for VQ, the codebook) on L_rec + L_reg (+ the adaptive
GAN term once the discriminator has started), then the PatchGAN discriminator on its hinge loss. Both use
Adam with betas (0.5, 0.9), the GAN setting of VQGAN and LDM. Checkpoints are safetensors files written
atomically; a resumed run ends with the same weights as an uninterrupted one (on the CPU).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .autoencoder import REGULARIZERS, AEOutput, Autoencoder, AutoencoderConfig, latent_scale_factor
from .data import check_dataset_name, get_dataset, random_batches
from .losses import AutoencoderLoss, PerceptualLoss
from .pretrained import add_export_arguments, export_cli, load_autoencoder, write_asset

__all__ = ["AETrainConfig", "AETrainer", "export_autoencoder", "load_autoencoder", "register_cli"]
from .utils import ConfigDict, get_device


HISTORY_KEYS = ("loss", "rec", "reg", "g", "d", "d_weight", "perplexity", "usage")


@dataclass
class AETrainConfig(ConfigDict):
    """Every setting of an autoencoder run but the network's (that is :class:`AutoencoderConfig`).
    ``perceptual_weight = 0`` / ``disc_weight = 0`` leave those terms out; ``disc_start`` is the step at
    which the discriminator joins. ``out = None`` writes nothing. Lesson: 06_ldm_autoencoder."""

    _what = "autoencoder training"

    dataset: str = "digits"
    image_size: int = 32
    batch_size: int = 32
    lr: float = 2e-4
    steps: int = 2000
    seed: int = 0
    pixel: str = "l1"
    perceptual_weight: float = 0.0
    disc_weight: float = 0.5
    disc_start: int = 1000
    disc_loss: str = "hinge"
    disc_layers: int = 2
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    checkpoint_every: int = 0
    out: Optional[str] = None
    device: Optional[str] = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_dataset_name(self.dataset)
        for key in ("image_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.steps < 0 or self.checkpoint_every < 0 or self.disc_start < 0 or self.lr <= 0:
            raise ValueError("steps, checkpoint_every and disc_start must be >= 0 and lr > 0")


RESUMABLE = ("steps", "checkpoint_every", "out", "device", "progress")  # may change when a run resumes


AELossFn = Callable[[AutoencoderLoss, torch.Tensor, AEOutput, int, torch.Tensor, str],
                    Tuple[torch.Tensor, Dict[str, float]]]
LOG_KEYS = ("rec", "reg", "g", "d_weight")  # what an autoencoder loss function must log


class AETrainer:
    """Trains an :class:`Autoencoder` with :class:`AutoencoderLoss` on ``config.dataset`` (or on ``data``,
    images ``(N, C, S, S)`` in [-1, 1]). ``perceptual`` is the PerceptualLoss to use (default: built when
    ``perceptual_weight > 0``). ``autoencoder_loss_fn`` replaces the loss that E and D minimise: it is called
    like ``AutoencoderLoss.autoencoder_loss`` with the loss module first, ``fn(self.loss, x, out, step,
    last_layer, regularizer)``, and returns ``(loss, logs)`` with the logs ``rec``, ``reg``, ``g`` and
    ``d_weight`` (lesson 06 passes the learner's own function here). Lesson: 06_ldm_autoencoder."""

    def __init__(self, config: AETrainConfig, ae_config: AutoencoderConfig, data: Optional[torch.Tensor] = None,
                 perceptual: Optional[PerceptualLoss] = None,
                 autoencoder_loss_fn: Optional[AELossFn] = None) -> None:
        c = self.config = config
        if autoencoder_loss_fn is not None and not callable(autoencoder_loss_fn):
            raise TypeError(f"autoencoder_loss_fn must be a function like AutoencoderLoss.autoencoder_loss, "
                            f"got {type(autoencoder_loss_fn).__name__}")
        self.autoencoder_loss_fn: AELossFn = autoencoder_loss_fn or AutoencoderLoss.autoencoder_loss
        self.device = torch.device(c.device) if c.device else get_device()
        if data is None:
            data = get_dataset(c.dataset, c.image_size).images
        if data.ndim != 4 or data.shape[1] != ae_config.in_channels or data.shape[-1] != ae_config.image_size:
            raise ValueError(f"the autoencoder is built for ({ae_config.in_channels}, {ae_config.image_size}, "
                             f"{ae_config.image_size}) images, the data has {tuple(data.shape[1:])}")
        self.ae_config = ae_config
        torch.manual_seed(c.seed)
        self.model = Autoencoder(ae_config).to(self.device)
        self.loss = AutoencoderLoss(ae_config.in_channels, c.pixel, c.perceptual_weight, perceptual, c.disc_weight,
                                    c.disc_start, c.disc_loss, c.disc_layers, kl_weight=c.kl_weight,
                                    codebook_weight=c.codebook_weight).to(self.device)
        self.opt_ae = torch.optim.Adam(self.model.parameters(), lr=c.lr, betas=(0.5, 0.9))
        self.disc = self.loss.discriminator
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=c.lr, betas=(0.5, 0.9)) if self.disc else None
        self.data_generator = torch.Generator().manual_seed(c.seed)
        self.noise_generator = torch.Generator().manual_seed(c.seed + 1)  # posterior draws
        self.batches = random_batches(data, c.batch_size, generator=self.data_generator)
        self.step = 0
        self.history: Dict[str, List[float]] = {k: [] for k in HISTORY_KEYS}

    def train_step(self) -> Dict[str, float]:
        """One autoencoder update, then one discriminator update; returns the logged numbers.
        A NaN or infinite loss raises FloatingPointError before the weights change. Lesson: 06_ldm_autoencoder."""
        x = next(self.batches).to(self.device)
        self.model.train()
        out = self.model(x, generator=self.noise_generator)
        loss, logs = self.autoencoder_loss_fn(self.loss, x, out, self.step, self.model.decoder.last_layer,
                                              self.ae_config.regularizer)
        missing = [k for k in LOG_KEYS if k not in logs]
        if missing or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise TypeError(f"the autoencoder loss function must return (loss, logs): loss a tensor that keeps its "
                            f"graph, logs a dict with {', '.join(LOG_KEYS)}; got {type(loss).__name__} and logs "
                            f"missing {missing}")
        logs = {k: float(v) for k, v in logs.items()}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the autoencoder loss is {loss.item()} at step {self.step}; training stopped "
                                     f"before the weights changed. Lower the learning rate (now {self.config.lr})")
        self.opt_ae.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_ae.step()
        d_loss = torch.zeros(())
        if self.disc is not None and self.step >= self.config.disc_start:
            d_loss = self.loss.discriminator_loss(x, out.x_rec, self.step)
            if d_loss.requires_grad and d_loss.item() != 0.0:
                self.opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                self.opt_d.step()
        q = out.quantized
        logs.update(loss=loss.item(), d=d_loss.item(), perplexity=q.perplexity.item() if q else 0.0,
                    usage=q.usage.item() if q else 0.0)
        for k in HISTORY_KEYS:
            self.history[k].append(float(logs[k]))
        self.step += 1
        return logs

    def train(self, num_steps: Optional[int] = None) -> Dict[str, List[float]]:
        """Train ``num_steps`` more steps (default: until ``config.steps``), checkpointing into ``config.out``
        on schedule and at the end. Returns the history. Lesson: 06_ldm_autoencoder."""
        c = self.config
        start = self.step
        target = c.steps if num_steps is None else min(c.steps, self.step + num_steps)
        with tqdm(total=c.steps, initial=self.step, desc="autoencoder", disable=not c.progress) as bar:
            while self.step < target:
                logs = self.train_step()
                bar.update(1)
                bar.set_postfix(rec=f"{logs['rec']:.1f}", g=f"{logs['g']:.2f}", d=f"{logs['d']:.2f}")
                if c.out and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save()
        if c.out and self.step > start and not (c.checkpoint_every and self.step % c.checkpoint_every == 0):
            self.save()
        return self.history

    def configs(self) -> Dict[str, Dict[str, Any]]:
        """``{"train": ..., "autoencoder": ...}`` as stored in checkpoints. Lesson: 06_ldm_autoencoder."""
        return {"train": self.config.to_dict(), "autoencoder": self.ae_config.to_dict()}

    def save(self, folder: Optional[Union[str, Path]] = None) -> Path:
        """Write everything needed to resume into ``folder`` (default ``config.out``), atomically.
        Lesson: 06_ldm_autoencoder."""
        folder = Path(folder or self.config.out)
        groups = {"model": self.model.state_dict(),
                  "rng": {"data": self.data_generator.get_state(), "noise": self.noise_generator.get_state(),
                          "torch": torch.get_rng_state()},
                  "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()}}
        opt_meta = {}
        for name, opt in (("opt_ae", self.opt_ae), ("opt_d", self.opt_d)):
            if opt is not None:
                groups[name], opt_meta[name] = ckpt.flatten_optimizer_state(opt.state_dict())
        if self.disc is not None:
            groups["disc"] = self.disc.state_dict()
        meta = {"config": self.configs(), "optimizers": opt_meta, "trainer_state": {"step": self.step}}
        return ckpt.save_checkpoint(folder, groups, meta)

    def load(self, folder: Union[str, Path]) -> None:
        """Resume from ``folder``; a checkpoint of another configuration is refused with the keys that differ.
        Lesson: 06_ldm_autoencoder."""
        groups, meta = ckpt.read_checkpoint(folder)
        saved = ckpt.with_added_settings(meta["config"], self.configs(),
                                         {"train": AETrainConfig, "autoencoder": AutoencoderConfig})
        diffs = ckpt.config_differences(saved, self.configs(), ignore=[f"train.{k}" for k in RESUMABLE])
        if diffs:
            raise ValueError(f"the checkpoint in {str(folder)!r} comes from a different configuration:\n  "
                             + "\n  ".join(diffs))
        self.model.load_state_dict(groups["model"])
        if self.disc is not None:
            self.disc.load_state_dict(groups["disc"])
        for name, opt in (("opt_ae", self.opt_ae), ("opt_d", self.opt_d)):
            if opt is not None:
                opt.load_state_dict(ckpt.unflatten_optimizer_state(groups.get(name, {}), meta["optimizers"][name]))
        self.step = int(meta["trainer_state"]["step"])
        self.history = {k: groups["history"][k].tolist() for k in HISTORY_KEYS}
        self.data_generator.set_state(groups["rng"]["data"])
        self.noise_generator.set_state(groups["rng"]["noise"])
        torch.set_rng_state(groups["rng"]["torch"])


# ----------------------------------------------------------------------------------------------
# Shipping a trained autoencoder
# ----------------------------------------------------------------------------------------------


def export_autoencoder(run_dir: Union[str, Path], out_dir: Union[str, Path], command: str = "") -> Path:
    """Write a run's autoencoder weights (float32), its configuration, its latent scale factor (measured on
    the run's training data) and the commands that made it into ``out_dir``. Lesson: 06_ldm_autoencoder."""
    groups, meta = ckpt.read_checkpoint(run_dir)
    if "autoencoder" not in meta.get("config", {}):
        raise ValueError(f"{run_dir} is not an autoencoder run (no autoencoder configuration in its checkpoint)")
    model = Autoencoder(AutoencoderConfig.from_dict(meta["config"]["autoencoder"]))
    model.load_state_dict(groups["model"])
    train = meta["config"]["train"]
    images = get_dataset(train["dataset"], train["image_size"]).images
    config = {**meta["config"], "step": int(meta["trainer_state"]["step"]),
              "scale_factor": latent_scale_factor(model, images)}
    return write_asset(out_dir, groups["model"], config, command)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _train_cli(args: argparse.Namespace) -> int:
    if args.resume:
        saved = ckpt.read_config(args.resume)
        if "autoencoder" not in saved:
            raise SystemExit(f"{args.resume} is not an autoencoder run")
        train = {**saved["train"], "out": args.resume, "steps": args.steps, "progress": not args.no_progress}
        ae_config = AutoencoderConfig.from_dict(saved["autoencoder"])
        trainer = AETrainer(AETrainConfig.from_dict(train), ae_config)
        trainer.load(args.resume)
    else:
        if not args.out:
            raise SystemExit("--out is required for a new run (the folder for its checkpoint)")
        data = get_dataset(args.dataset, args.image_size)
        ae_config = AutoencoderConfig.for_factor(
            args.factor, in_channels=data.images.shape[1], image_size=args.image_size, channels=args.channels,
            num_res_blocks=args.num_res_blocks, latent_channels=args.latent_channels, regularizer=args.regularizer,
            n_embed=args.n_embed, attention=not args.no_attention, norm_groups=args.norm_groups)
        cfg = AETrainConfig(dataset=args.dataset, image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
                            steps=args.steps, seed=args.seed, perceptual_weight=args.perceptual_weight,
                            disc_weight=args.disc_weight, disc_start=args.disc_start, disc_layers=args.disc_layers,
                            kl_weight=args.kl_weight, checkpoint_every=args.checkpoint_every, out=args.out,
                            progress=not args.no_progress)
        trainer = AETrainer(cfg, ae_config, data=data.images)
    trainer.train()
    h = trainer.history
    print(f"step {trainer.step}: L_rec {np.mean(h['rec'][-50:]):.2f} (mean of the last 50 steps); checkpoint in "
          f"{trainer.config.out}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``train-autoencoder`` and ``export-autoencoder`` commands. Lesson: 06_ldm_autoencoder."""
    d = AETrainConfig()
    p = subparsers.add_parser("train-autoencoder", help="train the latent-diffusion autoencoder (lesson 06)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--resume", default=None, help="continue the run in this folder (its settings are kept)")
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--factor", type=int, default=4, help="down-sampling factor f = H / h (4, 8, 16)")
    p.add_argument("--regularizer", choices=REGULARIZERS, default="kl")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--num-res-blocks", type=int, default=1)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--n-embed", type=int, default=256, help="VQ codebook size")
    p.add_argument("--no-attention", action="store_true", help="no attention block in the middle")
    p.add_argument("--norm-groups", type=int, default=8)
    for name in ("batch_size", "steps", "seed", "disc_start", "disc_layers", "checkpoint_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "perceptual_weight", "disc_weight", "kl_weight"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--out", default=None, help="run folder for the checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train_cli)
    e = subparsers.add_parser("export-autoencoder", help="ship an autoencoder run's weights as a package asset")
    add_export_arguments(e, "train-autoencoder")
    e.set_defaults(func=lambda args: export_cli(args, export_autoencoder))
