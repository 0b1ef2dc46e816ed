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

A checkpoint that cannot be read back (cut short by an interrupted copy, overwritten by another file, its
JSON metadata missing or garbled) raises :class:`DamagedCheckpoint`, a ``ValueError`` whose message names
the file, says what is wrong with it and what to do; the command line prints it as a plain error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "diffusion_course.checkpoint/1"
CHECKPOINT_FILE = "checkpoint.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.json"
META_KEY = "diffusion_course"  # the safetensors metadata entry that holds the JSON header
REQUIRED_META = ("config", "trainer_state")  # what every trainer of the package writes (and its loaders read)
PathLike = Union[str, os.PathLike]


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() would give a new file (some writers create theirs private)
Groups = Dict[str, Dict[str, torch.Tensor]]


class DamagedCheckpoint(ValueError):
    """A checkpoint file that is there but cannot be read back: truncated, not a safetensors file, or
    without (or with garbled) JSON metadata. The message names the file, what is wrong and what to do.
    Lesson: 04_unet."""


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
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={META_KEY: json.dumps(header)}))
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


CHECKPOINT_ADVICE = (f"It cannot be resumed or loaded. If you keep an earlier copy of this run folder (or copied "
                     f"it from elsewhere), put that copy's {CHECKPOINT_FILE} in its place; otherwise start the run "
                     f"again (into a new --out folder, or delete this one first).")
WEIGHTS_ADVICE = ("Export it again from its run folder (`python -m diffusion_course export`), or reinstall "
                  "diffusion_course if it is one of the models the package ships.")


def _damaged(path: Path, problem: str, what: str = "checkpoint", advice: str = CHECKPOINT_ADVICE) -> DamagedCheckpoint:
    return DamagedCheckpoint(f"{path} is not a readable {what}: {problem}. {advice}")


def _diagnose(path: Path, error: Exception) -> str:
    """What is wrong with a safetensors file that did not open, in words: safetensors starts with an 8-byte
    header length n, then n bytes of JSON naming each tensor's byte range, then the tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if head.startswith(b"version http"):
            return "it is a Git LFS pointer, not the file itself (fetch the real file with `git lfs pull`)"
        if len(head) < 9:
            return f"it is {size} bytes long, too short for even a header, so it was cut short (truncated)"
        n = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{":
            return "it is not a safetensors file at all (its first bytes are not a safetensors header)"
        if 8 + n > size:
            return f"it ends inside its header ({size} bytes, the header alone needs {8 + n}): it was truncated"
        try:
            f.seek(8)
            header = json.loads(f.read(n))
            need = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                               default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header (the list of tensors) is garbled"
    if size < need:
        return f"it holds {size} of the {need} bytes its header lists, so it was truncated"
    return f"safetensors cannot read it ({type(error).__name__}: {error})"


def _read_meta(path: Path, f: Any) -> Dict[str, Any]:
    """The JSON header of an open checkpoint ``f``, checked: ours, and holding :data:`REQUIRED_META`."""
    text = (f.metadata() or {}).get(META_KEY)
    if text is None:
        raise _damaged(path, f"its JSON metadata (the run's configurations and trainer state, under "
                             f"{META_KEY!r}) is missing, so it was not written by diffusion_course or was stripped")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise _damaged(path, f"its JSON metadata is garbled ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise _damaged(path, f"its metadata is not of the format {FORMAT!r} (found {found!r}), so it was not "
                             f"written by this version of diffusion_course")
    missing = [k for k in REQUIRED_META if k not in header]
    if missing:
        raise _damaged(path, f"its JSON metadata lacks {', '.join(missing)}")
    return header


def read_tensors(path: PathLike, what: str = "weights file", advice: str = WEIGHTS_ADVICE) -> Dict[str, torch.Tensor]:
    """Every tensor of a plain safetensors file (such as a shipped model's ``model.safetensors``), on the CPU.
    A damaged file raises :class:`DamagedCheckpoint` naming it, what is wrong and ``advice``. Lesson: 04_unet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} {str(path)!r}")
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise _damaged(path, _diagnose(path, e), what, advice) from None


def read_checkpoint(folder: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[Groups, Dict[str, Any]]:
    """Read ``folder/checkpoint.safetensors``: returns ``(groups, meta)`` as given to
    :func:`save_checkpoint`, tensors on ``device``. A file that is there but damaged (truncated, not a
    safetensors file, its JSON metadata missing or garbled) raises :class:`DamagedCheckpoint`. Lesson: 04_unet."""
    path = checkpoint_path(folder)
    groups: Groups = {}
    try:
        f = safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:  # a truncated or foreign file
        raise _damaged(path, _diagnose(path, e)) from None
    with f:
        header = _read_meta(path, f)
        try:
            for key in f.keys():
                prefix, name = key.split("/", 1) if "/" in key else ("", key)
                groups.setdefault(prefix, {})[name] = f.get_tensor(key)
        except Exception as e:  # e.g. a tensor whose bytes went missing after the file was opened
            raise _damaged(path, f"a tensor cannot be read ({type(e).__name__}: {e})") from None
    header.pop("format")
    return groups, header


def read_config(folder: PathLike) -> Dict[str, Any]:
    """The configurations stored in a checkpoint (``{"train": {...}, "unet": {...}}``), without reading
    its tensors; :class:`DamagedCheckpoint` as for :func:`read_checkpoint`. Lesson: 04_unet."""
    path = checkpoint_path(folder)
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # a truncated or foreign file
        raise _damaged(path, _diagnose(path, e)) from None
    with f:
        return _read_meta(path, f)["config"]


def _plain(value: Any) -> Any:
    """A default as ``to_dict`` stores it (tuples as lists), for comparing with a stored config."""
    return json.loads(json.dumps(value))


def with_added_settings(saved: Dict[str, Any], current: Dict[str, Any], sections: Dict[str, type]) -> Dict[str, Any]:
    """``saved`` (a checkpoint's nested config) where a setting added to the package after the checkpoint was
    written counts as that setting's default: for every ``section`` named in ``sections`` (its config dataclass),
    a key of ``current[section]`` missing from ``saved[section]`` is filled with the current value if that value
    is the field's default. A non-default current value stays missing, so :func:`config_differences` reports it.
    Lesson: 04_unet."""
    out = dict(saved)
    for name, cls in sections.items():
        if not isinstance(saved.get(name), dict) or not isinstance(current.get(name), dict):
            continue
        defaults = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = _plain(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = _plain(f.default_factory())
        added = {k: v for k, v in current[name].items()
                 if k not in saved[name] and k in defaults and _plain(v) == defaults[k]}
        out[name] = {**added, **saved[name]}
    return out


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
