"""Lesson 08_latent_diffusion, pixel against latent: the cost measures (saved activations exactly, timings only
run), one U-Net family in both spaces, and the budget-and-score path on tiny models. Timings are never asserted."""
import math

import pytest
import torch

from diffusion_course import costs, pretrained
from diffusion_course.autoencoder import AutoencoderConfig
from diffusion_course.conditions import build_model
from diffusion_course.ddpm import GaussianDiffusion
from diffusion_course.ldm import LatentDiffusion
from diffusion_course.nn import ConditionerConfig

TINY = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), norm_groups=8,
            context_dim=16)


@pytest.fixture(scope="module")
def f4_config():
    return pretrained.load_autoencoder("ae_digits32_f4", device="cpu")[0].config


def test_activation_bytes_counts_what_autograd_saves_exactly():
    W = torch.nn.Parameter(torch.randn(8, 3))
    x = torch.randn(4, 8)
    # x @ W saves x (4 x 8 float32) for W's gradient, and nothing else: sum saves only a shape
    assert costs.activation_bytes(lambda: (x @ W).sum().backward()) == 4 * 8 * 4

    def square():
        h = x @ W  # (4, 3)
        (h * h).sum().backward()  # h is saved twice, as both factors: one storage, counted once

    assert costs.activation_bytes(square) == 4 * 8 * 4 + 4 * 3 * 4
    # a parameter saved for backward is counted unless excluded (it exists anyway)
    lin, xg = torch.nn.Linear(8, 3), torch.randn(4, 8, requires_grad=True)
    step = lambda: lin(xg).sum().backward()  # noqa: E731
    assert costs.activation_bytes(step) == 4 * 8 * 4 + 3 * 8 * 4
    assert costs.activation_bytes(step, exclude=lin.parameters()) == 4 * 8 * 4
    with torch.no_grad():
        assert costs.activation_bytes(lambda: x @ W) == 0  # nothing is saved without a graph


def test_time_it_calls_warmup_plus_repeats_and_returns_seconds():
    calls = []
    seconds = costs.time_it(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and seconds >= 0
    with pytest.raises(ValueError, match="repeats >= 1"):
        costs.time_it(lambda: None, repeats=0)


def test_pixel_and_latent_unets_are_one_family(f4_config):
    pixel, latent = costs.pixel_and_latent_unets(f4_config, 1, 32, **TINY)
    same = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim", "norm_groups")
    assert all(getattr(pixel, k) == getattr(latent, k) for k in same)
    assert (pixel.image_size, pixel.in_channels, pixel.out_channels) == (32, 1, 1)
    assert (latent.image_size, latent.in_channels, latent.out_channels) == (8, 4, 4)
    # the default family fits the 4x4 latents of f = 8 too
    f8 = AutoencoderConfig.for_factor(8, in_channels=1, image_size=32, latent_channels=4)
    p8, l8 = costs.pixel_and_latent_unets(f8, 1, 32)
    assert l8.image_size == 4 and p8.channel_mult == l8.channel_mult == costs.UNET_SETTINGS["channel_mult"]
    with pytest.raises(ValueError, match="use at most 3 levels"):
        costs.pixel_and_latent_unets(f8, 1, 32, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="takes 1-channel images of size 32"):
        costs.pixel_and_latent_unets(f4_config, 3, 32)


def test_the_latent_model_saves_fewer_activations(f4_config, one_thread):
    pixel, latent = costs.pixel_and_latent_unets(f4_config, 1, 32, **TINY)
    cc = ConditionerConfig(kind="class", context_dim=16, num_classes=10)
    kwargs = {"cond": torch.tensor([3, 7])}
    found = {}
    for name, unet in (("pixel", pixel), ("latent", latent)):
        torch.manual_seed(0)
        model = build_model(unet, cc)
        x = torch.randn(2, unet.in_channels, unet.image_size, unet.image_size)
        step = costs.training_step_cost(model, GaussianDiffusion(), x, kwargs, repeats=1, warmup=0)
        again = costs.training_step_cost(model, GaussianDiffusion(), x, kwargs, repeats=1, warmup=0)
        assert step["activation_bytes"] == again["activation_bytes"] > 0  # deterministic
        assert step["params"] == sum(p.numel() for p in model.parameters()) and step["cuda_peak_bytes"] is None
        assert all(p.grad is None for p in model.parameters())  # gradients cleared after measuring
        call = costs.sampling_call_cost(model, x, torch.tensor([10, 900]), kwargs, repeats=1, warmup=0)
        assert call["seconds"] > 0 and step["seconds"] > 0
        found[name] = step
    # 16x fewer positions: far fewer saved activations, about the same parameters
    assert found["latent"]["activation_bytes"] * 4 < found["pixel"]["activation_bytes"]
    assert abs(found["latent"]["params"] - found["pixel"]["params"]) < 0.05 * found["pixel"]["params"]


def test_compare_costs_gives_pixel_f4_and_f8_rows(one_thread):
    rows = costs.compare_costs(batch_size=2, device="cpu", repeats=1, warmup=0, unet_settings=TINY)
    assert [r["name"] for r in rows] == ["pixel", "latent f=4", "latent f=8"]
    assert [r["input_shape"] for r in rows] == [[1, 32, 32], [4, 8, 8], [4, 4, 4]]
    assert rows[0]["step_ratio"] == rows[0]["call_ratio"] == rows[0]["activation_ratio"] == 1.0
    assert rows[1]["trained_autoencoder"] is True and rows[2]["trained_autoencoder"] is False
    for r in rows:
        for key in ("step_seconds", "call_seconds", "step_ratio", "call_ratio", "activation_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert r["cuda_peak_bytes"] is None and r["cuda_peak_ratio"] is None
    for r in rows[1:]:
        assert math.isfinite(r["encode_seconds"]) and math.isfinite(r["decode_seconds"])
    # saved activations are deterministic: smaller latents save less
    assert rows[0]["activation_bytes"] > rows[1]["activation_bytes"] > rows[2]["activation_bytes"]


def test_train_for_budget_and_score_class_model(one_thread):
    runs = costs.train_for_budget(0.3, batch_size=4, n_train=32, device="cpu", unet_settings=TINY)
    assert list(runs) == ["pixel", "latent f=4"]
    assert isinstance(runs["latent f=4"]["model"], LatentDiffusion)
    assert runs["latent f=4"]["trainer"].latent.scale_factor == pytest.approx(0.3916771, rel=1e-5)
    for name, run in runs.items():
        assert run["steps"] >= 1 and run["seconds"] >= 0.3 and math.isfinite(run["loss"])
        with pytest.warns(UserWarning, match="fewer samples"):
            score = costs.score_class_model(run["model"], run["diffusion"], n=12, steps=2, batch_size=8)
        assert 0 <= score["adherence"] <= 1 and math.isfinite(score["fd"]) and score["fd"] > 0
        assert score["n"] == 12 and score["ddim_steps"] == 2 and score["sample_seconds"] > 0
    with pytest.raises(ValueError, match="needs its diffusion"):
        costs.score_class_model(runs["pixel"]["model"], None, n=2)
