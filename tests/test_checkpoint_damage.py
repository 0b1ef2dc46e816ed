"""A damaged checkpoint (cut short, overwritten by another file, its JSON metadata gone) is refused with a
message that names the file, says what is wrong and what to do, through every way of reading it: the
checkpoint module, the loaders, the trainer's resume and the command line (with no traceback)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_course import checkpoint as ckpt
from diffusion_course.__main__ import main
from diffusion_course.nn import UNetConfig
from diffusion_course.pretrained import WEIGHTS_FILE, write_asset
from diffusion_course.training import TrainConfig, Trainer, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_heads=2, norm_groups=4)

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


def tiny_trainer(out):
    config = TrainConfig(dataset="digits", image_size=8, batch_size=4, steps=2, T=20, sample_every=0,
                         checkpoint_every=0, n_samples=4, sample_steps=2, out=str(out), device="cpu", progress=False)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (N, C, S, S)
    return Trainer(config, UNetConfig(**TINY_UNET), images)


@pytest.fixture(scope="module")
def intact_run(tmp_path_factory):
    """A run folder written by the package: two training steps, then its checkpoint."""
    run = tmp_path_factory.mktemp("intact") / "run"
    trainer = tiny_trainer(run)
    trainer.train()
    trainer.close()
    assert (run / ckpt.CHECKPOINT_FILE).is_file()
    return run


@pytest.fixture
def run(intact_run, tmp_path):
    """A fresh copy of the intact run, to be damaged by the test."""
    copy = tmp_path / "run"
    shutil.copytree(intact_run, copy)
    return copy


# ----------------------------------------------------------------------------------------------
# Ways to damage a checkpoint
# ----------------------------------------------------------------------------------------------

def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    assert keep < len(data)
    path.write_bytes(data[:keep])


def cut_in_half(path: Path) -> None:
    truncate(path, path.stat().st_size // 2)


def cut_one_byte(path: Path) -> None:
    truncate(path, path.stat().st_size - 1)


def cut_inside_header(path: Path) -> None:
    truncate(path, 200)


def cut_to_nothing(path: Path) -> None:
    truncate(path, 5)


def html_error_page(path: Path) -> None:  # what a failed download often leaves behind
    path.write_bytes(b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>\n" * 20)


def git_lfs_pointer(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")


def strip_metadata(path: Path) -> None:
    save_file(load_file(path), str(path))  # the same tensors, no JSON metadata


def garble_metadata(path: Path) -> None:
    save_file(load_file(path), str(path), metadata={ckpt.META_KEY: '{"format": "diffusion_course.checkpoint/1", "con'})


def drop_config_from_metadata(path: Path) -> None:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(n))["__metadata__"][ckpt.META_KEY])
    del meta["config"]
    save_file(load_file(path), str(path), metadata={ckpt.META_KEY: json.dumps(meta)})


DAMAGE = {  # how the file is damaged -> what the message says about it
    cut_in_half: r"holds \d+ of the \d+ bytes its header lists, so it was truncated",
    cut_one_byte: r"holds \d+ of the \d+ bytes its header lists, so it was truncated",
    cut_inside_header: r"ends inside its header \(200 bytes, .*\): it was truncated",
    cut_to_nothing: r"5 bytes long, too short for even a header",
    html_error_page: r"not a safetensors file at all",
    git_lfs_pointer: r"Git LFS pointer, not the file itself .*git lfs pull",
    strip_metadata: r"JSON metadata .* is missing",
    garble_metadata: r"JSON metadata is garbled",
    drop_config_from_metadata: r"JSON metadata lacks config",
}
CASES = pytest.mark.parametrize("damage", list(DAMAGE), ids=[f.__name__ for f in DAMAGE])


def assert_clear(error: BaseException, path: Path, damage) -> None:
    """The message names the file, says what is wrong with it and what to do; the library's own error is
    not chained on (it would print as a second traceback)."""
    text = str(error)
    assert isinstance(error, ckpt.DamagedCheckpoint) and isinstance(error, ValueError)
    assert text.startswith(f"{path} is not a readable checkpoint: "), text
    assert re.search(DAMAGE[damage], text), text
    assert "earlier copy" in text and "start the run again" in text, text
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


# ----------------------------------------------------------------------------------------------
# The package's readers
# ----------------------------------------------------------------------------------------------

def test_the_intact_checkpoint_reads_back(intact_run):
    """The control: what the damaged copies are copies of is fine."""
    groups, meta = ckpt.read_checkpoint(intact_run)
    assert {"model", "ema", "optimizer", "state", "rng"} <= set(groups) and meta["trainer_state"]["step"] == 2
    assert ckpt.read_config(intact_run)["unet"]["model_channels"] == 8
    assert load_checkpoint(intact_run, "cpu")[2]["step"] == 2


@CASES
def test_read_checkpoint_and_read_config_name_the_damage(intact_run, run, damage):
    path = run / ckpt.CHECKPOINT_FILE
    damage(path)
    assert path.read_bytes() != (intact_run / ckpt.CHECKPOINT_FILE).read_bytes()  # the damage took
    for read in (ckpt.read_checkpoint, ckpt.read_config):
        with pytest.raises(ckpt.DamagedCheckpoint) as info:
            read(run)
        assert_clear(info.value, path, damage)


@CASES
def test_loaders_and_resume_refuse_a_damaged_checkpoint(run, damage, tmp_path):
    path = run / ckpt.CHECKPOINT_FILE
    damage(path)
    with pytest.raises(ckpt.DamagedCheckpoint) as info:
        load_checkpoint(run, "cpu")
    assert_clear(info.value, path, damage)
    trainer = tiny_trainer(tmp_path / "other")
    with pytest.raises(ckpt.DamagedCheckpoint) as info:
        trainer.load(run)
    assert_clear(info.value, path, damage)
    assert trainer.step == 0  # nothing was half-loaded


def test_read_tensors_names_a_damaged_weights_file(tmp_path):
    """The reader for plain weights files (a shipped or exported model's model.safetensors)."""
    folder = write_asset(tmp_path / "asset", {"w": torch.arange(1000, dtype=torch.float32)}, {"unet": {}})
    path = folder / WEIGHTS_FILE
    assert torch.equal(ckpt.read_tensors(path)["w"], torch.arange(1000, dtype=torch.float32))
    cut_in_half(path)
    with pytest.raises(ckpt.DamagedCheckpoint, match=r"is not a readable weights file: it holds \d+ of the \d+ bytes"
                                                     r".*Export it again") as info:
        ckpt.read_tensors(path)
    assert str(info.value).startswith(str(path))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        ckpt.read_tensors(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [cut_in_half, html_error_page, strip_metadata],
                         ids=["truncated", "garbage", "no_metadata"])
def test_cli_resume_and_sample_print_the_message_without_a_traceback(run, damage, tmp_path, capsys):
    path = run / ckpt.CHECKPOINT_FILE
    damage(path)
    assert main(["train", "--resume", str(run), "--steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not a readable checkpoint: ") and "start the run again" in err
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not a readable checkpoint: ") and "Traceback" not in err
    assert not (tmp_path / "grid.png").exists()


def test_python_m_diffusion_course_train_resume_shows_one_line_of_error(run):
    """What a learner sees in a terminal: exit status 2 and the message, no traceback."""
    path = run / ckpt.CHECKPOINT_FILE
    cut_in_half(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSION_COURSE_MODE": "quick"}
    done = subprocess.run([sys.executable, "-m", "diffusion_course", "train", "--resume", str(run), "--steps", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {path} is not a readable checkpoint: it holds ")
    assert "so it was truncated" in done.stderr and "start the run again" in done.stderr
    assert done.stderr.count("\n") == 1  # one line


def test_a_damaged_exported_model_is_named_by_its_loader_and_by_the_cli(intact_run, tmp_path, capsys):
    """An exported model folder whose weights are cut short, or whose config.json is garbled: the loader
    names the file, and `python -m diffusion_course export`/`sample` end in one line, not a traceback."""
    from diffusion_course import pretrained

    asset = pretrained.export(intact_run, tmp_path / "asset")
    pretrained.load_pretrained(asset)  # intact: loads
    cut_in_half(asset / WEIGHTS_FILE)
    with pytest.raises(ckpt.DamagedCheckpoint, match=re.escape(str(asset / WEIGHTS_FILE))):
        pretrained.load_pretrained(asset)
    (asset / "config.json").write_text("{ not json")
    with pytest.raises(ckpt.DamagedCheckpoint, match="config.json is not valid JSON"):
        pretrained.load_pretrained(asset)
    broken_run = tmp_path / "run"
    shutil.copytree(intact_run, broken_run)
    cut_in_half(broken_run / "checkpoint.safetensors")
    assert main(["export", "--checkpoint", str(broken_run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and "Traceback" not in err
