"""Classifier-free guidance and conditional training: the guidance combination at its two anchor scales,
one batched call, condition dropout, a conditioned training step that reaches the condition encoder, exact
resume with a conditioner, and the conditional command line."""
import json
import math

import pytest
import torch

from diffusion_course import checkpoint as ckpt
from diffusion_course.__main__ import main
from diffusion_course.conditions import build_model, conditional_data
from diffusion_course.ddpm import GaussianDiffusion
from diffusion_course.guidance import ClassifierFreeGuidance, condition_dropout, guided_eps
from diffusion_course.nn import ConditionerConfig, UNetConfig
from diffusion_course.shapes import shapes_dataset
from diffusion_course.training import TrainConfig, Trainer, load_checkpoint, sample_images

UNET = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(2,), num_heads=2, norm_groups=4, context_dim=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


def unzeroed_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(UNetConfig(**UNET), ConditionerConfig(kind="class", context_dim=8, num_classes=3))
    for p in model.parameters():  # undo every zero initialisation, so that the condition matters
        if p.dim() > 1 and torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_guided_eps_is_the_published_combination():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    assert torch.allclose(guided_eps(c, u, 0.0), u) and torch.allclose(guided_eps(c, u, 1.0), c)
    assert torch.allclose(guided_eps(c, u, 3.0), u + 3 * (c - u))
    with pytest.raises(ValueError, match="differ in shape"):
        guided_eps(c, u[:1], 1.0)


def test_guidance_scale_1_is_the_conditional_and_0_the_unconditional_prediction():
    model = unzeroed_model()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([5, 100, 500, 999]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond = model(x, t, cond=y)
        uncond = model(x, t, cond=y, drop=torch.ones(4, dtype=torch.bool))
        assert not torch.allclose(cond, uncond, atol=1e-4)  # the condition matters to this network
        assert torch.allclose(ClassifierFreeGuidance(model, 1.0)(x, t, y), cond, atol=1e-5)
        assert torch.allclose(ClassifierFreeGuidance(model, 0.0)(x, t, y), uncond, atol=1e-5)
        assert torch.allclose(ClassifierFreeGuidance(model, 2.5)(x, t, y), uncond + 2.5 * (cond - uncond), atol=1e-4)
    with pytest.raises(ValueError, match="one condition per image"):
        ClassifierFreeGuidance(model, 2.0)(x, t, y[:2])
    with pytest.raises(ValueError, match=">= 0"):
        ClassifierFreeGuidance(model, -1.0)


def test_guidance_makes_one_batched_call():
    calls = []

    class Spy(torch.nn.Module):
        config = None

        def forward(self, x, t, cond=None, drop=None):
            calls.append((x.shape[0], drop.tolist()))
            return torch.where(drop[:, None, None, None], torch.zeros_like(x), torch.ones_like(x))

    out = ClassifierFreeGuidance(Spy(), 4.0)(torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long),
                                             torch.tensor([1, 2, 3]))
    assert calls == [(6, [False] * 3 + [True] * 3)]
    assert torch.allclose(out, torch.full_like(out, 4.0))  # 0 + 4 * (1 - 0)
    # at s = 1 and s = 0 one half has weight zero: only the other half is computed
    calls.clear()
    x, t, y = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    assert torch.equal(ClassifierFreeGuidance(Spy(), 1.0)(x, t, y), torch.ones_like(x))
    assert torch.equal(ClassifierFreeGuidance(Spy(), 0.0)(x, t, y), torch.zeros_like(x))
    assert calls == [(3, [False] * 3), (3, [True] * 3)]


def test_every_sampler_takes_the_guided_model_and_a_plain_function_gets_its_device_from_x_T():
    model = unzeroed_model()
    diffusion = GaussianDiffusion("linear", 20)
    y = torch.tensor([0, 1])
    for sampler, steps in (("ddim", 4), ("ddpm", None)):
        a = sample_images(model, diffusion, 2, sampler, steps, seed=1, progress=False, cond=y, guidance_scale=2.0)
        b = sample_images(model, diffusion, 2, sampler, steps, seed=1, progress=False, cond=y, guidance_scale=0.0)
        assert a.shape == (2, 1, 8, 8) and torch.isfinite(a).all() and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="conditional"):
        sample_images(model, diffusion, 2, "ddim", 4, progress=False)
    seen = []

    def plain(x, t):
        seen.append(x.device)
        return torch.zeros_like(x)

    x_T = torch.randn(2, 1, 4, 4)
    out = diffusion.ddim_sample(plain, (2, 1, 4, 4), steps=3, x_T=x_T, progress=False)
    assert out.device == x_T.device and set(seen) == {x_T.device}


def test_condition_dropout_has_the_asked_rate():
    g = torch.Generator().manual_seed(0)
    drop = condition_dropout(20000, 0.1, g)
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - 0.1) < 0.01
    assert not condition_dropout(100, 0.0, g).any() and condition_dropout(100, 1.0, g).all()
    with pytest.raises(ValueError, match="probability"):
        condition_dropout(4, 1.5)


def tiny(condition="class", out=None, **kw):
    base = dict(dataset="digits", image_size=8, batch_size=8, steps=4, T=20, lr=2e-3, ema_decay=0.9,
                sample_every=0, checkpoint_every=0, n_samples=4, sample_steps=3, out=out, device="cpu",
                progress=False, condition=condition, p_uncond=0.25)
    base.update(kw)
    return TrainConfig(**base)


def test_a_conditioned_training_step_reaches_the_encoder_and_lowers_the_loss():
    unet = UNetConfig(**{**UNET, "in_channels": 1})
    trainer = Trainer(tiny(steps=60), unet)
    assert trainer.conditioner_config.kind == "class" and trainer.conditioner_config.num_classes == 10
    enc = {k: v.clone() for k, v in trainer.model.conditioner.named_parameters()}
    torch.manual_seed(0)
    x0 = next(trainer.batches)[0]
    fixed_t, fixed_noise = torch.randint(0, 20, (8,)), torch.randn_like(x0)
    y = torch.arange(8) % 10

    def loss():
        with torch.no_grad():
            return trainer.diffusion.L_simple(trainer.model, x0, fixed_t, fixed_noise, {"cond": y}).item()

    before = loss()
    trainer.train()
    assert loss() < before
    moved = [k for k, v in trainer.model.conditioner.named_parameters() if not torch.equal(v, enc[k])]
    assert "null" in moved and any(k != "null" for k in moved)  # the null token and the class embeddings train
    images = trainer.sample(cond=torch.tensor([1, 2]), guidance_scale=2.0)
    assert images.shape == (2, 1, 8, 8)


def test_conditional_resume_is_exact(tmp_path):
    unet = UNetConfig(**UNET)
    straight = Trainer(tiny(steps=6), unet)
    straight.train()
    first = Trainer(tiny(steps=6), unet)
    first.train(3)
    first.save(tmp_path)
    torch.rand(100)
    resumed = Trainer(tiny(steps=6), unet, conditioner_config=first.conditioner_config)
    resumed.load(tmp_path)
    resumed.train()
    assert resumed.loss_history == straight.loss_history
    for (k, a), b in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), k
    model, _, configs = load_checkpoint(tmp_path, "cpu")
    assert configs["conditioner"].kind == "class" and hasattr(model, "conditioner")


def test_conditions_of_the_shapes():
    data = shapes_dataset(16, "test")
    for kind, want in (("class", "class"), ("caption", "text"), ("layout", "layout")):
        cond, config = conditional_data(data, kind, 8)
        assert config.kind == want and len(cond) == len(data)
    ids, config = conditional_data(data, "caption", 8)
    assert ids.dtype == torch.long and ids.shape[1] == config.max_length
    assert conditional_data(data, "none") == (None, None)
    with pytest.raises(ValueError, match="unknown condition"):
        conditional_data(data, "colour")


def test_mismatched_widths_and_missing_conditions_are_refused():
    with pytest.raises(ValueError, match="context_dim"):
        build_model(UNetConfig(**UNET), ConditionerConfig(kind="class", context_dim=16, num_classes=3))
    with pytest.raises(ValueError, match="unknown condition"):
        TrainConfig(condition="colour")
    with pytest.raises(ValueError, match="p_uncond"):
        TrainConfig(p_uncond=1.0)
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match="one condition per image"):
        Trainer(tiny(), UNetConfig(**UNET), images, torch.zeros(3, dtype=torch.long),
                ConditionerConfig(kind="class", context_dim=8, num_classes=3))
    with pytest.raises(ValueError, match="'text' condition encoder"):
        Trainer(tiny(condition="caption"), UNetConfig(**UNET), images, torch.zeros(16, dtype=torch.long),
                ConditionerConfig(kind="class", context_dim=8, num_classes=3))


def test_command_line_trains_and_samples_a_class_conditional_model(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--image-size", "8", "--condition", "class", "--context-dim", "8",
            "--batch-size", "8", "--steps", "2", "--T", "20", "--sample-steps", "3", "--n-samples", "4",
            "--model-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--num-heads", "2",
            "--norm-groups", "4", "--no-progress", "--device", "cpu", "--out", str(run)]
    assert main(args) == 0
    assert (run / ckpt.CHECKPOINT_FILE).exists()
    grid = tmp_path / "g.png"
    assert main(["sample", "--checkpoint", str(run), "--out", str(grid), "--labels", "3,7", "--n", "4",
                 "--steps", "3", "--device", "cpu"]) == 0 and grid.exists()
    assert main(["sample", "--checkpoint", str(run), "--out", str(grid), "--n", "4", "--steps", "3"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(run), "--out", str(grid), "--labels", "12", "--steps", "3"]) == 2
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 0


def test_the_exercise_references_agree_with_the_package():
    from diffusion_course import checks
    from diffusion_course.nn import TextEncoder

    torch.manual_seed(0)
    enc = TextEncoder(vocab_size=12, context_dim=8, max_length=5, depth=1, num_heads=2)
    ids = torch.tensor([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10], [2, 0, 0, 0, 0], [11, 3, 0, 0, 0]])
    u = torch.tensor([0.05, 0.5, 0.01, 0.99])
    with torch.no_grad():
        ctx, mask = enc(ids)
        want_ctx, want_mask = enc(ids, drop=u < 0.1)
        got_ctx, got_mask = checks.ref_condition_dropout(ctx, mask, u, 0.1, enc.null)
    assert torch.equal(got_mask, want_mask) and torch.allclose(got_ctx, want_ctx)
    assert want_mask[0].tolist() == [True, False, False, False, False] and torch.equal(want_ctx[1], ctx[1])
    g = torch.Generator().manual_seed(3)
    attn = checks.lesson07._random_cross_attention(3, 8, 6, 2)
    x, c = torch.randn(2, 5, 8, generator=g), torch.randn(2, 4, 6, generator=g)
    m = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        assert torch.allclose(checks.ref_cross_attention(attn, x, c, m), attn(x, c, m), atol=1e-5)


@pytest.mark.parametrize("condition, kind", [("caption", "text"), ("layout", "layout")])
def test_caption_and_layout_conditioned_training_on_the_shapes(condition, kind):
    unet = UNetConfig(**{**UNET, "image_size": 16, "in_channels": 3})
    trainer = Trainer(tiny(condition=condition, dataset="shapes", image_size=16, steps=2), unet)
    assert trainer.conditioner_config.kind == kind and trainer.image_size == 16
    trainer.train()
    assert len(trainer.loss_history) == 2 and all(math.isfinite(v) for v in trainer.loss_history)
    assert trainer.sample_cond is not None and trainer.sample().shape == (4, 3, 16, 16)
    assert "conditioner" in trainer.configs() and trainer.configs()["conditioner"]["kind"] == kind


def test_command_line_samples_a_caption_conditional_model_and_names_unknown_words(tmp_path, capsys):
    run = tmp_path / "shapes"
    assert main(["train", "--dataset", "shapes", "--image-size", "16", "--condition", "caption", "--context-dim",
                 "8", "--batch-size", "4", "--steps", "1", "--T", "20", "--sample-steps", "2", "--n-samples", "2",
                 "--model-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--num-heads", "2",
                 "--norm-groups", "4", "--no-progress", "--device", "cpu", "--out", str(run)]) == 0
    grid = tmp_path / "c.png"
    assert main(["sample", "--checkpoint", str(run), "--out", str(grid), "--caption", "a red circle in the middle",
                 "--caption", "a blue square above a green triangle", "--n", "4", "--steps", "2"]) == 0
    assert grid.exists()
    assert main(["sample", "--checkpoint", str(run), "--out", str(grid), "--caption", "a purple circle",
                 "--n", "2", "--steps", "2"]) == 2
    assert "purple" in capsys.readouterr().err


def test_command_line_sizes_the_caption_encoder(tmp_path, capsys):
    base = ["--dataset", "shapes", "--image-size", "16", "--context-dim", "8", "--batch-size", "4", "--steps", "1",
            "--T", "20", "--sample-steps", "2", "--n-samples", "2", "--model-channels", "8", "--channel-mult", "1,2",
            "--num-res-blocks", "1", "--num-heads", "2", "--norm-groups", "4", "--no-progress", "--device", "cpu"]
    run = tmp_path / "deep"
    assert main(["train", *base, "--condition", "caption", "--text-depth", "3", "--text-heads", "2",
                 "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())["conditioner"]
    assert (saved["depth"], saved["num_heads"]) == (3, 2)
    model, _, configs = load_checkpoint(run, "cpu")
    assert len(model.conditioner.encoder.layers) == 3 and configs["conditioner"].depth == 3
    # resuming keeps them; another depth would be another model and is refused by name
    assert main(["train", "--resume", str(run), "--steps", "2", "--no-progress"]) == 0
    assert main(["train", "--resume", str(run), "--steps", "3", "--text-depth", "2", "--no-progress"]) == 2
    assert "conditioner.depth" in capsys.readouterr().err
    # only a caption condition has a text encoder to size
    assert main(["train", *base, "--condition", "class", "--text-depth", "3", "--out", str(tmp_path / "c")]) == 2
    assert "caption encoder" in capsys.readouterr().err
