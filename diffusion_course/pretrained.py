"""Small pretrained models that ship inside the package, and the command that makes them.

Taught in lesson 04_unet. A learner on a CPU loads a trained model at once instead of training for an
hour; each shipped model was produced by the package's own ``train`` command, recorded in its
``COMMAND.txt`` beside the weights, and can be reproduced with it.

An asset folder ``diffusion_course/assets/<name>/`` holds

    model.safetensors   the EMA weights only (float16 to keep the package small; loaded as float32)
    config.json         {"train": ..., "unet": ..., "step": ...}, as in the run's checkpoint
    COMMAND.txt         the commands that trained and exported it, and what was measured on it

    python -m diffusion_course export --checkpoint runs/ddpm_digits16 --name ddpm_digits16 \
        --command "python -m diffusion_course train ..."
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import save_file

from . import checkpoint as ckpt
from .autoencoder import Autoencoder, AutoencoderConfig
from .conditions import build_model
from .ddpm import GaussianDiffusion
from .nn import ConditionerConfig, UNetConfig
from .utils import get_device

ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = "model.safetensors"


def _kind_of(config: Dict[str, Any]) -> str:
    """What an asset's config.json describes: ``sr`` (super-resolution, lesson 09: holds a U-Net and names
    its prior), ``ldm`` (holds a U-Net and an autoencoder too), ``unet``, ``autoencoder``, or another key
    (e.g. ``classifier``)."""
    for kind in ("sr", "ldm", "unet", "autoencoder"):
        if kind in config:
            return kind
    return next(iter(config), "")


def available(kind: str = "unet") -> List[str]:
    """Names of the shipped models of one kind: ``"unet"`` (DDPM models, lessons 04 and 07),
    ``"autoencoder"`` (lesson 06), ``"ldm"`` (latent diffusion, lesson 08) or ``"sr"`` (super-resolution,
    lesson 09). Lesson: 04_unet."""
    return sorted(p.name for p in ASSETS.glob("*") if (p / WEIGHTS_FILE).is_file() and (p / "config.json").is_file()
                  and _kind_of(json.loads((p / "config.json").read_text())) == kind)


def write_asset(out_dir: Union[str, os.PathLike], weights: Dict[str, torch.Tensor], config: Dict[str, Any],
                command: str = "") -> Path:
    """Write an asset folder: ``model.safetensors``, ``config.json`` and (when given) ``COMMAND.txt``, each
    file atomically. Returns the folder. Lesson: 04_unet."""
    out = Path(out_dir)
    weights = {k: v.contiguous() for k, v in weights.items()}
    ckpt.atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp))
    ckpt.write_json(out / "config.json", config)
    if command:
        ckpt.atomic_write(out / "COMMAND.txt", lambda tmp: Path(tmp).write_text(command.rstrip() + "\n"))
    return out


def read_asset(name: Union[str, os.PathLike], kind: Union[str, Tuple[str, ...]]
               ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The weights (floating point as float32) and the config dict (with ``command``) of a shipped model of
    ``kind`` (or of one of several kinds) by name, or of an exported folder by path; a clear error lists the
    shipped ones. Lesson: 04_unet."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    folder = Path(name) if Path(name).is_dir() else ASSETS / str(name)
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / "config.json").is_file():
        shipped = [n for k in kinds for n in available(k)]
        raise ValueError(f"no shipped {' or '.join(kinds)} model {str(name)!r}; available: "
                         f"{', '.join(shipped) or 'none'}")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ckpt.DamagedCheckpoint(f"{folder / 'config.json'} is not valid JSON ({e}); restore the folder "
                                     f"from the repository or export the model again") from None
    if _kind_of(config) not in kinds:
        hint = {"ldm": " (a latent diffusion model: load it with diffusion_course.ldm.load_latent_diffusion)",
                "sr": " (a super-resolution model: load it with diffusion_course.stablesr.load_sr)"
                }.get(_kind_of(config), "")
        raise ValueError(f"{folder} holds no {' or '.join(kinds)} model; its config has {sorted(config)}{hint}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.read_tensors(folder / WEIGHTS_FILE).items()}
    command = (folder / "COMMAND.txt").read_text() if (folder / "COMMAND.txt").is_file() else ""
    return state, {**config, "command": command}


def export(run_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], command: str = "",
           dtype: torch.dtype = torch.float16) -> Path:
    """Write the EMA weights of a training run (cast to ``dtype``), its configuration and the commands that
    made it into ``out_dir``, each file atomically. A latent diffusion run's asset names the shipped
    autoencoder it was trained on, with the SHA-256 of its weights, or else holds the autoencoder's weights
    (float32). Returns ``out_dir``. Lesson: 04_unet."""
    groups, meta = ckpt.read_checkpoint(run_dir)
    if "ema" not in groups:
        raise ValueError(f"{run_dir} holds no EMA weights; is it a run folder of `python -m diffusion_course train`?")
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in groups["ema"].items()}
    config = {**meta["config"], "step": int(meta["trainer_state"]["step"])}
    if "ldm" in config:  # latent diffusion: the denoiser, and its frozen autoencoder or a reference to it
        weights = {f"denoiser.{k}": v for k, v in weights.items()}
        name = config["train"].get("autoencoder")
        if name in available("autoencoder") and _same(read_asset(name, "autoencoder")[0], groups["autoencoder"]):
            config["ldm"] = {**config["ldm"], "autoencoder_asset": name, "autoencoder_sha256": asset_sha256(name)}
        else:  # not a shipped one: the asset carries it (float32)
            weights.update({f"autoencoder.{k}": v for k, v in groups["autoencoder"].items()})
    return write_asset(out_dir, weights, config, command)


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def asset_sha256(name: Union[str, os.PathLike]) -> str:
    """The SHA-256 of a shipped model's (or exported folder's) weights file: what a latent diffusion asset
    records of the shipped autoencoder it was trained on. Lesson: 08_latent_diffusion."""
    folder = Path(name) if Path(name).is_dir() else ASSETS / str(name)
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


def load_pretrained(name: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
                    ) -> Tuple[torch.nn.Module, GaussianDiffusion, Dict[str, Any]]:
    """A shipped model by name (or an exported folder by path): ``(U-Net in eval mode, its
    GaussianDiffusion, config dict)``. The config dict holds ``train`` and ``unet`` (dicts), ``step`` and
    ``command`` (how it was made). A conditional model (lesson 07) comes as a
    :class:`~diffusion_course.nn.ConditionalDenoiser` of condition encoder and U-Net, and its config dict also
    holds ``conditioner``. Lesson: 04_unet.
    """
    state, config = read_asset(name, "unet")
    cc = config.get("conditioner")
    model = build_model(UNetConfig.from_dict(config["unet"]), ConditionerConfig.from_dict(cc) if cc else None)
    model.load_state_dict(state)
    model = model.to(torch.device(device) if device is not None else get_device()).eval().requires_grad_(False)
    train = config["train"]
    diffusion = GaussianDiffusion(train["schedule"], train["T"], clip_x0=train.get("clip_x0", False))
    return model, diffusion, config


def load_autoencoder(name: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None
                     ) -> Tuple[Autoencoder, Dict[str, Any]]:
    """A shipped autoencoder by name (or an exported folder by path): ``(Autoencoder in eval mode, config
    dict)``; the dict holds ``train``, ``autoencoder``, ``step``, ``scale_factor`` and ``command``.
    Lesson: 06_ldm_autoencoder."""
    state, config = read_asset(name, "autoencoder")
    model = Autoencoder(AutoencoderConfig.from_dict(config["autoencoder"]))
    model.load_state_dict(state)
    model = model.to(torch.device(device) if device is not None else get_device()).eval().requires_grad_(False)
    return model, config


def add_export_arguments(p: Any, trained_by: str) -> None:
    """The options every export command takes (``--checkpoint``, ``--name`` or ``--out``, ``--command``,
    ``--command-file``). Lesson: 04_unet."""
    p.add_argument("--checkpoint", required=True, help=f"run folder written by `{trained_by}`")
    p.add_argument("--name", default="", help="asset name (writes diffusion_course/assets/NAME)")
    p.add_argument("--out", default="", help="folder to write instead of the package's assets")
    p.add_argument("--command", default="", help="the command(s) that trained the run, recorded in COMMAND.txt")
    p.add_argument("--command-file", default="", help="read the COMMAND.txt text from this file")


def export_cli(args: Any, export_fn: Any) -> int:
    """Run ``export_fn(checkpoint, out, command)`` for the parsed export options. Lesson: 04_unet."""
    if not (args.out or args.name):
        raise SystemExit("give --name (a package asset) or --out (a folder)")
    out = Path(args.out) if args.out else ASSETS / args.name
    command = Path(args.command_file).read_text() if args.command_file else args.command
    export_fn(args.checkpoint, out, command)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the ``export`` command. Lesson: 04_unet."""
    p = subparsers.add_parser("export", help="ship a run's EMA weights as a small pretrained model")
    add_export_arguments(p, "train")
    p.set_defaults(func=lambda args: export_cli(args, export))
