"""The checkpoint format of a training run: safetensors and JSON, written atomically, never pickle.

Taught in lesson 04_unet (where the U-Net is first trained for real); used by every later lesson that
trains. A run folder holds:

    checkpoint.safetensors   every tensor of the run (model, EMA model, optimizer state, RNG states,
                             loss history) and, in its metadata, the configurations and trainer state
                             as JSON. It is the one file a resume or a loader reads, and it is replaced in
                             a single ``os.replace``: a crash while writing leaves the previous one intact.
    config.json              the same configurations, pretty-printed, for people
    trainer_state.json       step and loss history, for people and plotting tools
    samples/step_NNNNNN.png  the sample grids written during training

Tensors are grouped by a prefix: ``model/<name>``, ``ema/<name>``, ``optimizer/state/<i>/<name>``,
``rng/<rank>/<stream>`` and ``state/<name>``. This module knows nothing about models; it turns named
groups of tensors plus JSON into files and back (:mod:`diffusion_course.training` decides what goes in).
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "diffusion_course.checkpoint/1"
CHECKPOINT_FILE = "checkpoint.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.json"
PathLike = Union[str, os.PathLike]


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() would give a new file (some writers create theirs private)
Groups = Dict[str, Dict[str, torch.Tensor]]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` all at once: ``write(tmp)`` fills a temporary file in the same folder, which is then
    flushed to disk and renamed over ``path`` with ``os.replace``. If ``write`` fails, the temporary file is
    removed and ``path`` keeps its old content. Lesson: 04_unet.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX; some file systems refuse, which costs only durability)
        dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`atomic_write`). Lesson: 04_unet."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# Optimizer state as plain tensors + JSON
# ----------------------------------------------------------------------------------------------

def flatten_optimizer_state(state_dict: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors named ``state/<param index>/<name>`` and a JSON-friendly
    rest (param groups, and any non-tensor per-parameter values). Lesson: 04_unet."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], rest: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of :func:`flatten_optimizer_state`: a dict for ``optimizer.load_state_dict``. Lesson: 04_unet."""
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entry in rest.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------
# The checkpoint file
# ----------------------------------------------------------------------------------------------

def save_checkpoint(folder: PathLike, groups: Groups, meta: Dict[str, Any]) -> Path:
    """Write ``groups`` (prefix -> name -> tensor) and the JSON-friendly ``meta`` into
    ``folder/checkpoint.safetensors`` atomically; then ``config.json`` (``meta["config"]``) and
    ``trainer_state.json`` (``meta["trainer_state"]`` plus the loss history, when present) beside it.
    Returns the checkpoint path. Lesson: 04_unet.
    """
    folder = Path(folder)
    flat = {f"{prefix}/{name}": t.detach().to("cpu").contiguous()
            for prefix, group in groups.items() for name, t in group.items()}
    header = {"format": FORMAT, **meta}
    path = folder / CHECKPOINT_FILE
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"diffusion_course": json.dumps(header)}))
    # the JSON copies come after the checkpoint, which alone is read back
    if "config" in meta:
        write_json(folder / CONFIG_FILE, meta["config"])
    state = dict(meta.get("trainer_state", {}))
    if "state" in groups and "loss_history" in groups["state"]:
        state["loss_history"] = groups["state"]["loss_history"].tolist()
    write_json(folder / STATE_FILE, state)
    return path


def checkpoint_path(folder: PathLike) -> Path:
    """``folder/checkpoint.safetensors``, with a clear error when it is missing. Lesson: 04_unet."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no checkpoint folder {str(folder)!r}; pass the run folder that training "
                                f"wrote (the --out of `python -m diffusion_course train`)")
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} is a file; pass the run folder that holds {CHECKPOINT_FILE}")
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no {CHECKPOINT_FILE}: training has not written a "
                                f"checkpoint there yet (or this is not a run folder)")
    return path


def read_checkpoint(folder: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[Groups, Dict[str, Any]]:
    """Read ``folder/checkpoint.safetensors``: returns ``(groups, meta)`` as given to
    :func:`save_checkpoint`, tensors on ``device``. Lesson: 04_unet."""
    path = checkpoint_path(folder)
    groups: Groups = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = json.loads((f.metadata() or {}).get("diffusion_course", "{}"))
            for key in f.keys():
                prefix, name = key.split("/", 1)
                groups.setdefault(prefix, {})[name] = f.get_tensor(key)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if header.pop("format", None) != FORMAT:
        raise ValueError(f"{path} was not written by diffusion_course (expected format {FORMAT!r})")
    return groups, header


def read_config(folder: PathLike) -> Dict[str, Any]:
    """The configurations stored in a checkpoint (``{"train": {...}, "unet": {...}}``), without reading
    its tensors. Lesson: 04_unet."""
    path = checkpoint_path(folder)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("diffusion_course", "{}"))
    if header.get("format") != FORMAT or "config" not in header:
        raise ValueError(f"{path} was not written by diffusion_course (expected format {FORMAT!r})")
    return header["config"]


def config_differences(saved: Dict[str, Any], current: Dict[str, Any], ignore: Iterable[str] = (),
                       prefix: str = "") -> List[str]:
    """The keys whose values differ between two nested config dicts, as lines
    ``"train.lr: checkpoint 0.0002, here 0.001"``; keys in ``ignore`` (dotted) are skipped. Lesson: 04_unet."""
    ignore = set(ignore)
    out: List[str] = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in ignore:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, ignore, f"{name}.")
        elif a != b:
            out.append(f"{name}: checkpoint {a!r}, here {b!r}")
    return out
