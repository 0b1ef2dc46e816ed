"""The training engine: exact resume, atomic checkpoints, refusal of foreign checkpoints, the NaN stop, EMA,
the mixed-precision choice, the command line, and a two-process DDP run on gloo."""
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file

from diffusion_course import checkpoint as ckpt
from diffusion_course.__main__ import main
from diffusion_course.nn import UNetConfig
from diffusion_course.train_cli import TRAIN_HELP
from diffusion_course import training
from diffusion_course.nn import UNet
from diffusion_course.training import (RESUMABLE, TrainConfig, Trainer, ema_decay_at, ema_update, load_checkpoint,
                                       select_amp)
from diffusion_course.utils import Autocast, cpu_bf16_supported

ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_heads=2, norm_groups=4, dropout=0.1)
TINY_CLI = ["--image-size", "8", "--batch-size", "8", "--T", "20", "--sample-steps", "3", "--n-samples", "4",
            "--model-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--num-heads", "2",
            "--norm-groups", "4", "--no-progress", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(123)
    return torch.rand(32, 1, 8, 8, generator=g) * 2 - 1  # (N, C, S, S) in [-1, 1]


def tiny(out=None, unet=None, **kw):
    base = dict(image_size=8, batch_size=4, steps=6, T=20, lr=1e-3, warmup_steps=2, grad_clip=1.0, ema_decay=0.9,
                sample_every=0, checkpoint_every=0, n_samples=4, sample_steps=3, out=out, device="cpu",
                progress=False)
    base.update(kw)
    return TrainConfig(**base), UNetConfig(**{**TINY_UNET, **(unet or {})})


def weights(trainer):
    return {**{f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()},
            **{f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()}}


def assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------

def test_select_amp_picks_bf16_then_fp16_on_cuda_bf16_on_a_capable_cpu_and_nothing_elsewhere():
    assert select_amp("cpu") is None and select_amp("cpu", "off") is None and select_amp("mps", "auto") is None
    assert select_amp("cuda", "auto", bf16_supported=True) is torch.bfloat16
    assert select_amp("cuda", "auto", bf16_supported=False) is torch.float16
    assert select_amp("cuda:1", "fp16", bf16_supported=True) is torch.float16
    assert select_amp("cuda", "bf16", bf16_supported=True) is torch.bfloat16
    assert select_amp("cuda", "off", bf16_supported=True) is None
    with pytest.raises(ValueError, match="does not support bf16"):
        select_amp("cuda", "bf16", bf16_supported=False)
    with pytest.raises(ValueError, match="not as fp16 on cpu"):
        select_amp("cpu", "fp16", bf16_supported=True)
    with pytest.raises(ValueError, match="amp must be one of"):
        select_amp("cpu", "fp8")
    # the CPU: bf16 where it has bfloat16 kernels, refused where it would be emulated; auto stays float32
    assert select_amp("cpu", "bf16", bf16_supported=True) is torch.bfloat16
    assert select_amp("cpu", "auto", bf16_supported=True) is None
    with pytest.raises(ValueError, match="no bfloat16 kernels"):
        select_amp("cpu", "bf16", bf16_supported=False)
    with pytest.raises(ValueError, match="not as bf16 on mps"):
        select_amp("mps", "bf16")


needs_cpu_bf16 = pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no bfloat16 kernels")


def test_autocast_wrapper_computes_in_bf16_and_returns_the_input_dtype(images):
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY_UNET)).eval()
    for p in net.parameters():  # the zero-initialised output layers too, so that the output depends on every path
        p.data.add_(0.05 * torch.randn_like(p))
    seen = []
    net.out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, t = images[:4], torch.tensor([0, 5, 10, 19])
    with torch.no_grad():
        full, low = net(x, t), Autocast(net)(x, t)
    assert seen == [torch.float32, torch.bfloat16]  # the network ran in bf16 inside the wrapper
    assert low.dtype == torch.float32 and low.shape == full.shape
    err = ((low - full).norm() / full.norm()).item()
    assert 0 < err < 0.05, err  # bfloat16's 8-bit mantissa: close, not equal
    assert Autocast(net).config is net.config
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        Autocast(net, torch.float64)


@needs_cpu_bf16
def test_bf16_training_and_sampling_on_the_cpu(images, tmp_path, capsys, monkeypatch):
    full = Trainer(*tiny(), images)
    low = Trainer(*tiny(amp="bf16"), images)
    assert full.amp_dtype is None and low.amp_dtype is torch.bfloat16
    full.train(6)
    low.train(6)
    assert all(p.dtype == torch.float32 for p in low.model.parameters())  # autocast keeps float32 master weights
    # the same data, noise and initial weights: the losses follow each other to bf16's precision
    for a, b in zip(full.loss_history, low.loss_history):
        assert abs(a - b) < 0.05 * a, (full.loss_history, low.loss_history)
    assert full.loss_history != low.loss_history
    # sampling: the network in bf16, the sampler in float32; the same noise gives nearly the same images
    from diffusion_course.training import sample_images
    a = sample_images(full.ema, full.diffusion, 4, "ddim", 5, seed=1, progress=False)
    b = sample_images(full.ema, full.diffusion, 4, "ddim", 5, seed=1, progress=False, amp="bf16")
    assert a.dtype == b.dtype == torch.float32
    assert 0 < (a - b).abs().max().item() < 0.1
    # the command line: `sample --amp bf16`, and a clear refusal where the CPU would emulate bf16
    full.save(tmp_path)
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(grid), "--steps", "3", "--n", "4",
                 "--device", "cpu", "--amp", "bf16"]) == 0 and grid.exists()
    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: False)
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(grid), "--steps", "3", "--n", "4",
                 "--device", "cpu", "--amp", "bf16"]) == 2
    assert "no bfloat16 kernels" in capsys.readouterr().err


def test_warmup_lr_rises_linearly_then_stays():
    from diffusion_course.training import warmup_lr

    assert [warmup_lr(1e-3, 4, k) for k in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warmup_lr(3e-4, 0, 0) == warmup_lr(3e-4, 0, 50) == 3e-4


def test_ema_update_matches_the_hand_formula():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().double().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.75)
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e.double(), 0.75 * e0 + 0.25 * p.double(), atol=1e-7)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(10**6, 0.999) == 0.999 and ema_decay_at(0, 0.999, warmup=False) == 0.999


def test_trainer_ema_after_one_step_is_the_weighted_average(images):
    config, unet = tiny()
    trainer = Trainer(config, unet, images)
    assert trainer.amp_dtype is None and not trainer.scaler.is_enabled()  # full precision on the CPU
    init = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train_step()
    d = ema_decay_at(0, config.ema_decay, config.ema_warmup)  # 0.1 for the first update
    for k, e in trainer.ema.named_parameters():
        assert torch.allclose(e, d * init[k] + (1 - d) * dict(trainer.model.named_parameters())[k], atol=1e-6)
    assert any(not torch.equal(init[k], p) for k, p in trainer.model.named_parameters())


def test_train_config_checks_its_input_and_round_trips():
    with pytest.raises(ValueError, match="unknown data set 'mnistt'"):
        TrainConfig(dataset="mnistt")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="unknown training configuration keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    c = TrainConfig(lr=1e-3, out="runs/x")
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    names = {f.name for f in fields(TrainConfig)}
    assert set(TRAIN_HELP) == names and set(RESUMABLE) <= names


def test_unet_that_does_not_fit_the_data_is_refused(images):
    config, unet = tiny(unet=dict(image_size=16))
    with pytest.raises(ValueError, match="make UNetConfig's image_size, in_channels and out_channels match"):
        Trainer(config, unet, images)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def test_a_checkpoint_older_than_a_new_setting_still_resumes(images, tmp_path):
    """A checkpoint written before a setting existed (e.g. lesson 08's ``autoencoder``) resumes with that
    setting at its default; a non-default value is still a different configuration."""
    from diffusion_course import checkpoint as ckpt

    config, unet = tiny()
    first = Trainer(config, unet, images)
    first.train(2)
    first.save(tmp_path)
    groups, meta = ckpt.read_checkpoint(tmp_path)
    for key in ("autoencoder", "spatial", "p_hide_all"):  # as a checkpoint of an older package has it
        del meta["config"]["train"][key]
    for key in ("sft_channels", "sft_hidden"):  # the U-Net's settings added for lesson 09
        del meta["config"]["unet"][key]
    ckpt.save_checkpoint(tmp_path, groups, meta)
    assert "spatial" not in ckpt.read_checkpoint(tmp_path)[1]["config"]["train"]
    resumed = Trainer(*tiny(), images)
    resumed.load(tmp_path)
    assert resumed.step == 2
    changed, unet = tiny()
    changed.p_hide_all = 0.25
    with pytest.raises(ValueError, match="p_hide_all"):
        Trainer(changed, unet, images).load(tmp_path)
    config, changed_unet = tiny(unet=dict(sft_hidden=32))
    with pytest.raises(ValueError, match="unet.sft_hidden: checkpoint '<missing>', here 32"):
        Trainer(config, changed_unet, images).load(tmp_path)


def test_resume_gives_bit_identical_weights(images, tmp_path):
    config, unet = tiny()
    straight = Trainer(config, unet, images)
    straight.train()
    assert straight.step == 6

    first = Trainer(config, unet, images)
    first.train(3)
    first.save(tmp_path)
    del first
    torch.rand(1000)  # disturb the global generator (dropout draws from it), as a new process would
    resumed = Trainer(*tiny(), images)
    resumed.load(tmp_path)
    assert resumed.step == 3 and len(resumed.loss_history) == 3
    resumed.train()

    assert resumed.step == 6
    assert resumed.loss_history == straight.loss_history
    assert_same(weights(resumed), weights(straight))
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    # and the run did something: the weights moved away from the EMA, the losses vary
    assert len(set(straight.loss_history)) == 6
    assert any(not torch.equal(straight.model.state_dict()[k], straight.ema.state_dict()[k])
               for k in straight.model.state_dict())


def test_a_failed_write_leaves_the_previous_checkpoint(images, tmp_path, monkeypatch):
    config, unet = tiny(out=str(tmp_path))
    trainer = Trainer(config, unet, images)
    trainer.train(2)  # writes the checkpoint of step 2
    saved = weights(trainer)
    trainer.train_step()  # one more step, not yet saved

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.undo()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"
    fresh = Trainer(*tiny(out=str(tmp_path)), images)
    fresh.load(tmp_path)
    assert fresh.step == 2
    assert_same(weights(fresh), saved)
    assert json.loads((tmp_path / ckpt.STATE_FILE).read_text())["step"] == 2


def test_atomic_write_cleans_up_and_keeps_no_partial_file(tmp_path):
    target = tmp_path / "x.json"

    def write_half_then_fail(tmp):
        Path(tmp).write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        ckpt.atomic_write(target, write_half_then_fail)
    assert list(tmp_path.iterdir()) == []
    ckpt.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_a_checkpoint_of_another_configuration_is_refused(images, tmp_path):
    config, unet = tiny()
    Trainer(config, unet, images).save(tmp_path)
    other = Trainer(*tiny(lr=5e-4, unet=dict(model_channels=16)), images)
    with pytest.raises(ValueError) as err:
        other.load(tmp_path)
    msg = str(err.value)
    assert "unet.model_channels: checkpoint 8, here 16" in msg and "train.lr: checkpoint 0.001, here 0.0005" in msg
    assert "train.seed" not in msg
    # settings that do not change what is learnt may differ
    Trainer(*tiny(steps=50, sample_every=7), images).load(tmp_path)


def test_missing_or_foreign_checkpoint_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.safetensors"):
        load_checkpoint(tmp_path)
    (tmp_path / ckpt.CHECKPOINT_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)


def test_nan_loss_stops_training_before_the_weights_change(images):
    bad = images.clone()
    bad[:, :, 2, 3] = float("nan")
    config, unet = tiny()
    trainer = Trainer(config, unet, bad)
    before = weights(trainer)
    with pytest.raises(FloatingPointError, match="the loss is nan at step 0"):
        trainer.train()
    assert trainer.step == 0 and trainer.loss_history == []
    assert_same(weights(trainer), before)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def test_cli_train_resume_sample_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--steps", "3", "--sample-every", "2", "--out", str(run)] + TINY_CLI) == 0
    assert {p.name for p in run.iterdir()} == {"checkpoint.safetensors", "config.json", "trainer_state.json", "samples"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000003.png"]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["dataset"] == "digits" and config["unet"]["model_channels"] == 8

    # a second `train` into the same folder is refused; --resume continues it
    assert main(["train", "--steps", "3", "--out", str(run)] + TINY_CLI) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--steps", "5", "--no-progress"]) == 0
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["step"] == 5 and len(state["loss_history"]) == 5
    assert main(["train", "--resume", str(run), "--steps", "6", "--lr", "0.1"]) == 2
    assert "train.lr" in capsys.readouterr().err

    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run), "--out", str(grid), "--sampler", "ddim", "--steps", "3",
                 "--n", "4", "--seed", "0", "--device", "cpu"]) == 0
    img = matplotlib.image.imread(grid)
    assert img.shape[:2] == (2 * 8 + 1, 2 * 8 + 1)  # a 2 x 2 grid of 8 x 8 images, 1 pixel apart

    model, diffusion, configs = load_checkpoint(run, "cpu")
    assert configs["step"] == 5 and configs["unet"].model_channels == 8 and diffusion.T == 20
    ema = {k[len("ema/"):]: v for k, v in load_file(run / ckpt.CHECKPOINT_FILE).items() if k.startswith("ema/")}
    assert_same(model.state_dict(), ema)
    assert not model.training


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "g.png")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    assert main(["train", "--dataset", "mnistt", "--out", str(tmp_path / "a")]) == 2
    assert "unknown data set 'mnistt'" in capsys.readouterr().err
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "b")] + TINY_CLI + ["--image-size", "9"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(["train", "--steps", "1"] + TINY_CLI) == 2
    assert "--out is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Two processes, DistributedDataParallel on gloo
# ----------------------------------------------------------------------------------------------

DDP_SCRIPT = """
# Runs `python -m diffusion_course train` in each process; before the trainer closes, each rank also dumps its
# weights and its next batch, so that the test can compare the ranks.
import os, sys
import torch
from safetensors.torch import save_file
from diffusion_course import training
from diffusion_course.__main__ import main

torch.set_num_threads(1)
out = sys.argv[1]
close = training.Trainer.close


def dump_then_close(self):
    tensors = {"model/" + k: v for k, v in self.model.state_dict().items()}
    tensors.update({"ema/" + k: v for k, v in self.ema.state_dict().items()})
    tensors["next_batch"] = next(self.batches)
    tensors["world"] = torch.tensor(self.dist.world_size)
    tensors["is_ddp"] = torch.tensor(isinstance(self.net, torch.nn.parallel.DistributedDataParallel))
    save_file(tensors, os.path.join(out, f"rank{self.dist.rank}.safetensors"))
    close(self)


training.Trainer.close = dump_then_close
sys.exit(main(["train", "--dataset", "digits", "--steps", "3", "--checkpoint-every", "2", "--sample-every", "2",
               "--out", os.path.join(out, "run")] + sys.argv[2:]))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_gloo_keeps_the_ranks_in_step(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("DIFFUSION_COURSE_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(tmp_path)] + TINY_CLI
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    for r in (r0, r1):
        assert r.pop("world").item() == 2 and r.pop("is_ddp").item()
    b0, b1 = r0.pop("next_batch"), r1.pop("next_batch")
    assert b0.shape == (4, 1, 8, 8) and not torch.equal(b0, b1), "each rank should draw half of a batch of 8, not the same"
    assert_same(r0, r1)  # DDP averaged the gradients: the ranks stayed identical

    # only rank 0 wrote, and what it wrote is a valid checkpoint holding both ranks' random streams
    run = tmp_path / "run"
    model, _, configs = load_checkpoint(run, "cpu")
    assert configs["step"] == 3
    assert_same(model.state_dict(), {k[4:]: v for k, v in r0.items() if k.startswith("ema/")})
    groups, meta = ckpt.read_checkpoint(run)
    assert meta["trainer_state"]["world_size"] == 2 and {"0/data", "1/data", "0/noise", "1/noise"} <= set(groups["rng"])
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000003.png"]
    assert not list(run.rglob("*.tmp"))


def test_mixed_precision_path_and_scaler_state_survive_a_checkpoint(images, tmp_path):
    # CUDA is not needed to run the code path: bf16 autocast and a gradient scaler also work on the CPU
    def mixed(trainer):
        trainer.amp_dtype = torch.bfloat16
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
        return trainer

    trainer = mixed(Trainer(*tiny(), images))
    trainer.train(3)
    assert len(trainer.loss_history) == 3 and all(math.isfinite(v) for v in trainer.loss_history)
    scale = trainer.scaler.get_scale()
    assert scale != 1024.0  # the scaler has been stepping
    trainer.save(tmp_path)
    resumed = mixed(Trainer(*tiny(), images))
    resumed.load(tmp_path)
    assert resumed.scaler.get_scale() == scale and resumed.step == 3


# ----------------------------------------------------------------------------------------------
# Compilation and the measured choice of precision
# ----------------------------------------------------------------------------------------------

def test_a_compiled_trainer_learns_what_the_eager_one_learns_and_saves_the_plain_weights(images, tmp_path,
                                                                                          monkeypatch):
    from diffusion_course import training

    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")  # dynamo traces the network; no code generation
    eager = Trainer(*tiny(steps=6), images)
    compiled = Trainer(*tiny(steps=6, compile="default", out=str(tmp_path)), images)
    assert compiled.net is not compiled.model and hasattr(compiled.net, "_orig_mod")
    # the same batches, noise and dropout: every loss after the first also checks the updates before it (the
    # weights themselves are not compared: Adam divides near-zero gradients by their own size, so a rounding
    # difference of 1e-9 in a gradient can move a weight by a whole step)
    assert compiled.train() == pytest.approx(eager.train(), rel=1e-4)
    saved = load_file(str(tmp_path / ckpt.CHECKPOINT_FILE))
    assert saved and not any("_orig_mod" in k for k in saved)
    model, _, configs = load_checkpoint(tmp_path, "cpu")        # loads into a plain U-Net
    assert configs["train"].compile == "default"
    with pytest.raises(ValueError, match="compile must be one of"):
        TrainConfig(compile="fast")
    assert "compile" in RESUMABLE and "compile" in TRAIN_HELP


def test_measure_amp_times_each_precision_and_leaves_model_and_generators_alone(images):
    from diffusion_course.ddpm import GaussianDiffusion
    from diffusion_course.nn import UNet
    from diffusion_course.training import measure_amp

    torch.manual_seed(0)
    model = UNet(UNetConfig(**TINY_UNET))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    dtype, seconds = measure_amp(model, GaussianDiffusion("linear", 20), images[:4], None,
                                 (torch.bfloat16, None), warmup=1, iters=2)
    assert set(seconds) == {"bfloat16", "float32"} and min(seconds.values()) > 0
    assert dtype == (torch.bfloat16 if seconds["bfloat16"] < seconds["float32"] else None)  # the faster one
    assert torch.equal(torch.get_rng_state(), rng)                # dropout's draws were given back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="at least one candidate"):
        measure_amp(model, GaussianDiffusion("linear", 20), images[:4], candidates=())


def test_choose_amp_probes_a_conditional_trainer_without_moving_its_streams(capsys):
    from diffusion_course.data import get_dataset
    from diffusion_course.conditions import conditional_data

    ds = get_dataset("digits", 8)
    cond, cc = conditional_data(ds, "class", 8)
    config, unet = tiny(condition="class", steps=2)
    probed = Trainer(config, UNetConfig(**{**TINY_UNET, "context_dim": 8}), ds.images[:64], cond[:64], cc)
    dtype, seconds = probed.choose_amp((torch.bfloat16, None))
    assert dtype in (torch.bfloat16, None) and set(seconds) == {"bfloat16", "float32"}
    assert "mixed precision (amp='auto')" in capsys.readouterr().out
    plain = Trainer(config, UNetConfig(**{**TINY_UNET, "context_dim": 8}), ds.images[:64], cond[:64], cc)
    assert probed.train() == plain.train()                     # the probe drew nothing from the run's streams
