import json
import shutil

import pytest
import torch

from diffusion_course import checkpoint as ckpt, pretrained
from diffusion_course.conditions import encode_captions
from diffusion_course.nn import ConditionerConfig, UNetConfig
from diffusion_course.training import Trainer, TrainConfig, load_checkpoint


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(dataset="digits", image_size=8, batch_size=8, steps=3, T=20, sample_steps=5, n_samples=4,
                      sample_every=0, checkpoint_every=0, out=str(out), progress=False)
    unet = UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2,), num_heads=2, norm_groups=4)
    trainer = Trainer(cfg, unet)
    trainer.train()
    trainer.close()
    return out


def test_export_and_load_round_trip(tiny_run, tmp_path):
    folder = pretrained.export(tiny_run, tmp_path / "tiny", command="python -m diffusion_course train ...")
    assert (folder / "COMMAND.txt").read_text().startswith("python -m diffusion_course train")
    model, diffusion, config = pretrained.load_pretrained(folder, device="cpu")
    ref, ref_diffusion, ref_config = load_checkpoint(tiny_run, device="cpu")
    assert config["step"] == 3 and diffusion.T == ref_diffusion.T == 20
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert a.dtype == b.dtype == torch.float32, name
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name  # float16 storage
    x = diffusion.ddim_sample(model, (2, 1, 8, 8), steps=5, progress=False, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_export_command_line(tiny_run, tmp_path):
    from diffusion_course.__main__ import main

    assert main(["export", "--checkpoint", str(tiny_run), "--out", str(tmp_path / "cli"), "--command", "made by hand"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").stat().st_size < 200_000


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match="available"):
        pretrained.load_pretrained("no_such_model")


def test_shipped_models_load():
    for name in pretrained.available():
        model, diffusion, config = pretrained.load_pretrained(name, device="cpu")
        assert "python -m diffusion_course train" in config["command"], f"{name} does not record its command"
        size = config["unet"]["image_size"]
        x = torch.randn(1, config["unet"]["in_channels"], size, size)
        kwargs = {}
        if config.get("conditioner"):  # a conditional model (lesson 07) takes one condition per image
            cc = ConditionerConfig.from_dict(config["conditioner"])
            kwargs["cond"] = (torch.tensor([cc.num_classes - 1]) if cc.kind == "class" else
                              encode_captions(["a red circle in the middle"], cc))
        assert model(x, torch.zeros(1, dtype=torch.long), **kwargs).shape == x.shape


def test_the_shipped_ddpm_makes_recognisable_digits():
    """DDIM with 25 steps from the shipped 16x16 digit model, judged like lesson 04 judges it: close to the
    real digits' floor and far from an untrained model (FD about 50) or noise (FD about 100)."""
    from diffusion_course import data, metrics

    assert "ddpm_digits16" in pretrained.available()
    model, diffusion, config = pretrained.load_pretrained("ddpm_digits16", device="cpu")
    assert config["step"] == 6000 and config["unet"]["image_size"] == 16
    folder = pretrained.ASSETS / "ddpm_digits16"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5_000_000
    x = diffusion.ddim_sample(model, (200, 1, 16, 16), steps=25, generator=torch.Generator().manual_seed(0),
                              progress=False).clamp(-1, 1)
    clf = metrics.load_digit_classifier(32)
    ref = data.resize(data.get_dataset("digits", image_size=16, split="test").images, 32)
    q = metrics.sample_quality(data.resize(x, 32), ref, clf, reference_name="digits test split")
    print(metrics.format_quality(q))
    assert q["fd"] < 3.0 and q["confident_share"] > 0.75
    assert min(q["class_histogram"]) >= 5                    # every digit class appears


def test_the_shipped_class_conditional_model_draws_the_asked_for_digit():
    """DDIM with 25 steps and guidance scale 3 from the shipped class-conditional model (lesson 07): the digit
    classifier reads nearly every sample as the digit asked for, and no guidance (s = 0) is far less faithful."""
    from diffusion_course import data, metrics
    from diffusion_course.training import sample_images

    model, diffusion, config = pretrained.load_pretrained("cond_digits16", device="cpu")
    assert config["conditioner"]["kind"] == "class" and config["unet"]["context_dim"] == 64
    want = torch.arange(100) % 10
    clf = metrics.load_digit_classifier(32)
    share = {}
    for s in (0.0, 3.0):
        x = sample_images(model, diffusion, 100, "ddim", 25, seed=0, progress=False, cond=want, guidance_scale=s)
        share[s] = (clf.predict_proba(data.resize(x, 32)).argmax(1) == want).float().mean().item()
    print(share)
    assert share[3.0] > 0.9 and share[0.0] < 0.5


def test_init_from_starts_a_new_run_from_a_shipped_model(tiny_run, tmp_path, capsys):
    from diffusion_course.__main__ import main

    folder = pretrained.export(tiny_run, tmp_path / "tiny", command="python -m diffusion_course train ...")
    state, _ = pretrained.read_asset(folder, "unet")
    unet = UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(2,), num_heads=2, norm_groups=4)
    cfg = dict(dataset="digits", image_size=8, batch_size=8, steps=2, T=20, sample_steps=5, sample_every=0,
               checkpoint_every=0,
               progress=False, seed=5)
    trainer = Trainer(TrainConfig(**cfg, init_from=str(folder)), unet)
    assert trainer.step == 0
    for name, v in trainer.model.state_dict().items():
        assert torch.equal(v, state[name]) and torch.equal(trainer.ema.state_dict()[name], v), name
    trainer.train()  # and it trains on from there
    assert trainer.step == 2 and not all(torch.equal(v, state[k]) for k, v in trainer.model.state_dict().items())
    fresh = Trainer(TrainConfig(**cfg), unet)
    assert not all(torch.equal(v, state[k]) for k, v in fresh.model.state_dict().items())
    other = UNetConfig(**{**unet.to_dict(), "model_channels": 16})
    with pytest.raises(ValueError, match="model_channels"):
        Trainer(TrainConfig(**cfg, init_from=str(folder)), other)
    with pytest.raises(ValueError, match="conditional"):
        Trainer(TrainConfig(**{**cfg, "condition": "class"}, init_from=str(folder)),
                UNetConfig(**{**unet.to_dict(), "context_dim": 64}),
                conditioner_config=ConditionerConfig(kind="class", context_dim=64, num_classes=10))
    with pytest.raises(ValueError, match="no shipped unet model"):
        Trainer(TrainConfig(**cfg, init_from=str(tmp_path / "nowhere")), unet)

    # the command line takes the network and the task from the model: only the run's own settings are given
    run = tmp_path / "finetune"
    assert main(["train", "--init-from", str(folder), "--steps", "2", "--batch-size", "4", "--sample-every", "0",
                 "--n-samples", "1", "--checkpoint-every", "0", "--no-progress", "--device", "cpu", "--out",
                 str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["init_from"] == str(folder) and config["train"]["T"] == 20
    assert config["train"]["image_size"] == 8 and config["unet"]["model_channels"] == 8
    assert main(["train", "--init-from", str(folder), "--model-channels", "16", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "model_channels" in capsys.readouterr().err
    # a shipped caption model: its condition encoder's sizes come with it
    caption = tmp_path / "caption"
    assert main(["train", "--init-from", "shapes_caption32", "--steps", "1", "--batch-size", "2", "--sample-every",
                 "0", "--n-samples", "1", "--sample-steps", "2", "--checkpoint-every", "0", "--no-progress",
                 "--device", "cpu", "--out", str(caption)]) == 0
    config = json.loads((caption / "config.json").read_text())
    assert config["train"]["condition"] == "caption" and config["conditioner"]["depth"] == 2
    # resuming the fine-tune needs only its own checkpoint: the model it started from may be gone
    before = ckpt.read_checkpoint(run)[0]["model"]
    shutil.rmtree(folder)
    assert main(["train", "--resume", str(run), "--steps", "3", "--no-progress"]) == 0
    groups, meta = ckpt.read_checkpoint(run)
    assert meta["trainer_state"]["step"] == 3 and meta["config"]["train"]["init_from"] == str(folder)
    assert not all(torch.equal(v, before[k]) for k, v in groups["model"].items())
