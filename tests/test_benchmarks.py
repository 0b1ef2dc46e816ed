"""The benchmark scripts run end to end (tiny sizes; their figures are reported, never asserted)."""
import importlib.util
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from diffusion_course.utils import cpu_bf16_supported

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_samplers_measures_every_sampler_and_the_floor(tmp_path):
    out = tmp_path / "s.json"
    with pytest.warns(UserWarning, match="fewer samples"):
        result = load("bench_samplers").main(["--model", "ddpm_digits16", "--device", "cpu", "--n", "12",
                                              "--seeds", "2", "--ddim", "2,4", "--no-ddpm", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["real train digits", "DDIM", "DDIM"] and rows[2]["steps"] == 4
    assert result["n"] == 12 and result["n_reference"] == 359 and result["step"] == 6000
    assert all(r["fd"]["mean"] > 0 for r in rows) and rows[1]["images_per_s"] > 0
    assert all(0 < r["mean_term"]["mean"] < r["fd"]["mean"] for r in rows)  # the shift is a part of the FD


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no bfloat16 kernels")
def test_bench_guidance_samples_pixel_and_latent_models_in_bf16_on_request(one_thread):
    for task, model in (("digits", "cond_digits16"), ("shapes", "ldm_shapes32")):
        def run(amp):
            with pytest.warns(UserWarning, match="fewer samples") if task == "digits" else nullcontext():
                return load("bench_guidance").main(["--task", task, "--model", model, "--device", "cpu", "--n", "10",
                                                    "--scales", "3", "--steps", "4", "--splits", "test",
                                                    "--amp", amp])
        full, low = run("off"), run("bf16")
        assert (full["amp"], low["amp"]) == ("off", "bf16")
        key = "fd" if task == "digits" else "shapes right"
        a, b = full["rows"][1][key], low["rows"][1][key]
        assert abs(a - b) <= 0.2 * max(a, 0.5), (task, a, b)
        if task == "digits":
            assert a != b  # the same noise, the network in another precision: near, not equal


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no bfloat16 kernels")
def test_bench_samplers_runs_the_network_in_bf16_on_request(one_thread):
    def run(amp):
        with pytest.warns(UserWarning, match="fewer samples"):
            return load("bench_samplers").main(["--device", "cpu", "--n", "12", "--seeds", "1", "--ddim", "4",
                                                "--no-ddpm", "--amp", amp])
    full, low = run("off"), run("bf16")
    assert (full["amp"], low["amp"]) == ("off", "bf16")
    a, b = full["rows"][1]["fd"]["mean"], low["rows"][1]["fd"]["mean"]
    assert a != b and abs(a - b) < 0.1 * a  # the same noise: nearly the same samples, not the same


def test_bench_samplers_reports_fd_against_the_sample_size(one_thread):
    with pytest.warns(UserWarning, match="fewer samples"):
        result = load("bench_samplers").main(["--device", "cpu", "--n", "12", "--seeds", "2", "--ddim", "2",
                                              "--no-ddpm", "--fd-sizes", "6,12,50"])
    sizes = result["fd_by_size"]
    assert set(sizes) == {"real train digits", "DDIM 2"}
    assert set(sizes["DDIM 2"]) == {"6", "12"}            # 50 is more than the 12 samples drawn: left out
    assert all(v["mean"] > 0 and v["std"] >= 0 for d in sizes.values() for v in d.values())
    # the full set of 12 is its own only subset: every repeat gives the FD of the sampler's row for that seed
    assert sizes["DDIM 2"]["12"]["mean"] == pytest.approx(result["rows"][1]["fd"]["mean"], rel=1e-6)
    assert set(result["fd_inf"]) == {"real train digits", "DDIM 2"}
    fit = load("bench_samplers").fd_infinity({100: [1.5 + 40 / 100] * 2, 400: [1.5 + 40 / 400], 50: [1.5 + 40 / 50]})
    assert fit["fd_inf"] == pytest.approx(1.5) and fit["slope"] == pytest.approx(40.0)
    with pytest.raises(ValueError, match="two sizes"):
        load("bench_samplers").fd_infinity({100: [1.0, 2.0]})


def test_bench_samplers_runs_dpm_solver_beside_ddim(tmp_path, one_thread):
    out = tmp_path / "d.json"
    with pytest.warns(UserWarning, match="fewer samples"):
        result = load("bench_samplers").main(["--device", "cpu", "--n", "12", "--seeds", "1", "--ddim", "2",
                                              "--dpm", "2,3", "--no-ddpm", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["sampler"], r["steps"]) for r in rows] == [("real train digits", 0), ("DDIM", 2),
                                                          ("DPM-Solver++ 2M", 2), ("DPM-Solver++ 2M", 3)]
    assert [r.get("spacing") for r in rows] == [None, None, "linspace", "linspace"]
    # with two steps both are first order on the same grid from the same noise: the same samples, the same FD
    assert rows[2]["fd"]["mean"] == pytest.approx(rows[1]["fd"]["mean"], rel=1e-4)
    assert rows[3]["fd"]["mean"] > 0 and rows[3]["images_per_s"] > 0 and result["rows"][3]["spacing"] == "linspace"
    with pytest.warns(UserWarning, match="fewer samples"):
        trailing = load("bench_samplers").main(["--device", "cpu", "--n", "12", "--seeds", "1", "--ddim", "2",
                                                "--dpm", "3", "--spacing", "trailing", "--no-ddpm"])
    assert trailing["rows"][2]["spacing"] == "trailing" and trailing["rows"][2]["fd"]["mean"] > 0
    with pytest.warns(UserWarning, match="fewer samples"):
        sde = load("bench_samplers").main(["--device", "cpu", "--n", "12", "--seeds", "1", "--ddim", "3",
                                           "--dpm-sde", "3", "--sde-eta", "0.5,1", "--no-ddpm"])
    assert [(r["sampler"], r["steps"]) for r in sde["rows"][1:]] == [
        ("DDIM", 3), ("DPM-Solver++ 2M SDE (eta 0.5)", 3), ("DPM-Solver++ 2M SDE", 3)]
    assert [r.get("eta") for r in sde["rows"][1:]] == [None, 0.5, 1.0]
    assert sde["rows"][2]["fd"]["mean"] > 0 and sde["rows"][2]["spacing"] == "linspace"
    assert sde["rows"][2]["fd"]["mean"] != sde["rows"][3]["fd"]["mean"]


def test_bench_samplers_runs_the_third_order_solver_on_the_logsnr_grid(one_thread):
    with pytest.warns(UserWarning, match="fewer samples"):
        result = load("bench_samplers").main(["--device", "cpu", "--n", "12", "--seeds", "1", "--ddim", "2",
                                              "--dpm", "4", "--dpm-sde", "4", "--dpm-orders", "2,3",
                                              "--spacing", "logsnr", "--no-ddpm"])
    rows = result["rows"][2:]
    assert [(r["sampler"], r["order"], r["spacing"]) for r in rows] == [
        ("DPM-Solver++ 2M", 2, "logsnr"), ("DPM-Solver++ 3M", 3, "logsnr"),
        ("DPM-Solver++ 2M SDE", 2, "logsnr"), ("DPM-Solver++ 3M SDE", 3, "logsnr")]
    assert all(r["fd"]["mean"] > 0 for r in rows) and rows[0]["fd"]["mean"] != rows[1]["fd"]["mean"]
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--dpm", "5", "--dpm-orders", "4"])


def test_bench_samplers_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--n", "1"])
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--dpm-sde", "5", "--sde-eta", "1.5"])
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--ddim", "0,5"])
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--dpm", "0,5"])
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--dpm", "5", "--spacing", "uniform"])
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--device", "cpu", "--dpm", "100000"])


def test_bench_guidance_measures_both_tasks(tmp_path):
    out = tmp_path / "g.json"
    with pytest.warns(UserWarning, match="fewer samples"):
        result = load("bench_guidance").main(["--task", "digits", "--device", "cpu", "--n", "20", "--scales", "0,3",
                                              "--steps", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["real train digits", "s = 0.0", "s = 3.0"]
    assert rows[0]["adherence"] > 0.8 and all(0 <= r["adherence"] <= 1 and r["fd"] > 0 for r in rows)
    shapes_result = load("bench_guidance").main(["--task", "shapes", "--device", "cpu", "--n", "4", "--scales", "1",
                                                 "--steps", "2"])
    names = [(r["split"], r["name"]) for r in shapes_result["rows"]]
    assert names == [("test", "real images"), ("test", "s = 1.0"), ("holdout", "real images"), ("holdout", "s = 1.0")]
    assert result["model"] == "cond_digits16" and shapes_result["model"] == "shapes_caption32"
    real_row = shapes_result["rows"][0]  # the real images: every shape right, every relation and no opposite
    assert real_row["shapes right"] == 1.0 and real_row["n relation if shapes right"] >= 1
    assert real_row["relation if shapes right"] == 1.0 and real_row["opposite if shapes right"] == 0.0
    for r in shapes_result["rows"]:
        assert sum(r[f"shapes {kind}"] for kind in ("right", "count", "binding", "colour", "kind",
                                                    "colour and kind")) == pytest.approx(1.0)
    with pytest.raises(SystemExit):
        load("bench_guidance").main(["--scales", "-1"])
    with pytest.raises(SystemExit):
        load("bench_guidance").main(["--task", "shapes", "--splits", "train,valid"])
    trained_on = load("bench_guidance").main(["--task", "shapes", "--device", "cpu", "--n", "2", "--scales", "1",
                                              "--steps", "1", "--splits", "train"])
    assert [(r["split"], r["n"]) for r in trained_on["rows"]] == [("train", 2), ("train", 2)]
    steered = load("bench_guidance").main(["--task", "shapes", "--device", "cpu", "--n", "2", "--scales", "3",
                                           "--steps", "2", "--splits", "test", "--attend", "0.015",
                                           "--attend-steps", "1"])
    assert [r["name"] for r in steered["rows"]] == ["real images", "s = 3.0", "s = 3.0 + attention"]
    with pytest.raises(SystemExit):  # attention guidance steers caption models only
        load("bench_guidance").main(["--task", "shapes", "--model", "ldm_shapes32_layout", "--n", "2", "--attend",
                                     "0.01"])
    latent_steered = load("bench_guidance").main(["--task", "shapes", "--model", "ldm_shapes32", "--device", "cpu",
                                                  "--n", "2", "--scales", "3", "--steps", "2", "--splits", "test",
                                                  "--attend", "0.015", "--attend-steps", "1", "--attend-map-size", "8",
                                                  "--attend-weights", "2,2"])
    assert [r["name"] for r in latent_steered["rows"]] == ["real images", "s = 3.0", "s = 3.0 + attention"]
    for bad in ("2", "1,-1", "a,b"):
        with pytest.raises(SystemExit):
            load("bench_guidance").main(["--task", "shapes", "--attend", "0.01", "--attend-weights", bad])
    with pytest.raises(SystemExit):  # attention guidance runs in float32
        load("bench_guidance").main(["--task", "shapes", "--attend", "0.01", "--amp", "bf16"])
    # a latent diffusion model (lesson 08) goes through the same script
    latent = load("bench_guidance").main(["--task", "shapes", "--model", "ldm_shapes32", "--device", "cpu", "--n", "3",
                                          "--scales", "3", "--steps", "2"])
    assert latent["model"] == "ldm_shapes32" and len(latent["rows"]) == 4
    # the sampler is a choice, recorded, and reaches pixel and latent models alike
    bench, cpu, labels = load("bench_guidance"), torch.device("cpu"), torch.tensor([1, 2])
    for name in ("cond_digits16", "ldm_digits32"):
        ddim = bench.load_model(name, cpu)[0](2, labels, 3.0, 3, 0)
        sde = bench.load_model(name, cpu, "dpmpp2m_sde", 1.0)[0](2, labels, 3.0, 3, 0)
        assert ddim.shape == sde.shape and not torch.allclose(ddim, sde), name
        assert torch.equal(ddim, bench.load_model(name, cpu, "ddim", 0.0)[0](2, labels, 3.0, 3, 0)), name
    with pytest.warns(UserWarning, match="fewer samples"):
        other = bench.main(["--task", "digits", "--device", "cpu", "--n", "2", "--scales", "3", "--steps", "2",
                            "--sampler", "dpmpp2m", "--seed", "1"])
    assert other["sampler"] == "dpmpp2m" and other["eta"] is None
    assert all(r["spread"] != r["spread"] for r in other["rows"])  # NaN: with 2 samples no label is drawn twice
    with pytest.raises(SystemExit):
        bench.main(["--sampler", "euler"])


def test_bench_ldm_tasks_measures_inpainting_layout_and_semantic_maps(tmp_path, one_thread):
    out = tmp_path / "t.json"
    result = load("bench_ldm_tasks").main(["--n", "3", "--steps", "2", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["task"] for r in rows] == ["inpainting", "layout to image", "semantic map to image"]
    inpaint = rows[0]
    assert all(0 < inpaint[k] < 100 for k in ("psnr_kept_vs_reconstruction", "psnr_kept_vs_image",
                                               "psnr_reconstruction_vs_image"))
    assert 0 < inpaint["hidden_share"] < 1 and all(0 <= r.get("adherence", 0) <= 1 for r in rows)
    assert 0 <= rows[2]["shape_pixel_agreement"] <= 1 and result["n"] == 3


def test_bench_latent_measures_costs_and_quality_in_a_budget(tmp_path, one_thread):
    out = tmp_path / "l.json"
    with pytest.warns(UserWarning, match="fewer samples"):
        result = load("bench_latent").main(["--device", "cpu", "--budget-s", "0.5", "--batch-size", "2", "--n", "12",
                                            "--steps", "2", "--repeats", "1", "--n-train", "24", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["costs"]] == ["pixel", "latent f=4", "latent f=8"]
    assert [r["name"] for r in saved["quality"]] == ["real train digits", "pixel", "latent f=4"]
    assert saved["costs"][2]["trained_autoencoder"] is False and saved["settings"]["budget_s"] == 0.5
    assert all(r["step_ratio"] > 0 and r["activation_bytes"] > 0 for r in result["costs"])
    assert all(0 <= r["adherence"] <= 1 and r["fd"] > 0 for r in result["quality"])
    assert all(r["steps"] >= 1 for r in result["quality"][1:])
    costs_only = load("bench_latent").main(["--device", "cpu", "--batch-size", "1", "--repeats", "1",
                                            "--skip-quality"])
    assert "quality" not in costs_only and len(costs_only["costs"]) == 3
    with pytest.raises(SystemExit):
        load("bench_latent").main(["--budget-s", "0"])


def _tiny_sr_assets(tmp_path):
    """A tiny pixel prior (16x16) as an asset folder, and SR models on it: StableSR and the concat baseline at
    x4, and StableSR at x2; each trained 2 steps and exported as `export-sr` does."""
    import torch

    from diffusion_course import pretrained
    from diffusion_course.nn import UNet, UNetConfig
    from diffusion_course.sr_training import SRTrainConfig, SRTrainer, export_sr

    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=16, in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), num_heads=2, norm_groups=8))
    for p in unet.parameters():  # zero-initialised output layers would make the prior predict nothing
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    prior = tmp_path / "prior"
    pretrained.write_asset(prior, unet.state_dict(), {"train": {"schedule": "linear", "T": 50, "clip_x0": True},
                                                      "unet": unet.config.to_dict(), "step": 0}, "made by a test")
    data = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assets = []
    for kind, scale in (("stablesr", 4), ("concat", 4), ("stablesr", 2)):
        name = f"sr_tiny_{kind}_x{scale}"
        config = SRTrainConfig(prior=str(prior), kind=kind, scale=scale, encoder_channels=8, encoder_out=16,
                               sft_hidden=8, batch_size=4, steps=2, sample_every=0, checkpoint_every=0,
                               progress=False, device="cpu", out=str(tmp_path / "runs" / name))
        SRTrainer(config, data, data[:2]).train()
        assets.append(export_sr(tmp_path / "runs" / name, tmp_path / name, "made by a test"))
    return assets


@pytest.mark.filterwarnings("ignore:PerceptualLoss. no ImageNet VGG16 weights:UserWarning")
def test_bench_sr_scores_bicubic_models_and_the_step_sweep_on_the_same_patches(tmp_path, one_thread, capsys):
    import math

    from diffusion_course.data import get_dataset
    from diffusion_course.degradations import DegradationConfig, degrade, upsample
    from diffusion_course.stablesr import sr_scores

    stablesr, concat, stablesr_x2 = _tiny_sr_assets(tmp_path)
    out = tmp_path / "sr.json"
    argv = ["--models", f"{stablesr},{concat}", "--n", "4", "--steps", "2", "--step-sweep", "1,2", "--batch", "2",
            "--device", "cpu", "--seed", "3"]
    bench = load("bench_sr")
    result = bench.run(argv + ["--json", str(out)])
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["bicubic", "sr_tiny_stablesr_x4 (stablesr, time-aware)",
                                           "sr_tiny_concat_x4 (concat)", "sr_tiny_stablesr_x4, DDIM-1",
                                           "sr_tiny_stablesr_x4, DDIM-2"]
    assert [r["steps"] for r in rows] == [None, 2, 2, 1, 2]
    assert all(math.isfinite(r[k]) for r in rows for k in ("psnr", "ssim", "perceptual", "seconds"))
    assert all(r["perceptual"] >= 0 and -1 <= r["ssim"] <= 1 and r["seconds"] >= 0 for r in rows)
    assert result["n"] == 4 and result["steps"] == 2 and result["perceptual_source"]
    assert result["scale"] == 4 and result["hr_size"] == 16 and result["dataset"] == "photos"
    # the bicubic row is exactly sr_scores of the upsampled patches, degraded as the first model was trained
    hr = get_dataset("photos", 16, "test").images[:4]
    train = json.loads((stablesr / "config.json").read_text())["train"]
    lr = degrade(hr, DegradationConfig.from_dict({**train["degradation"], "scale": train["scale"]}), seed=3)
    assert rows[0]["psnr"] == pytest.approx(sr_scores(upsample(lr, 4), hr)["psnr"], abs=1e-6)
    # the sweep at --steps is the comparison row's images (same seeds)
    scores = lambda rs: [[r[k] for k in ("psnr", "ssim", "perceptual")] for r in rs]  # noqa: E731
    assert scores(rows[4:]) == scores(rows[1:2])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    # seeded: a second run gives the same numbers
    assert scores(bench.run(argv)["rows"]) == scores(rows)
    with pytest.raises(SystemExit):  # a model of another scale cannot be scored on the same patches
        bench.run(["--models", f"{stablesr},{stablesr_x2}", "--n", "2", "--steps", "1", "--device", "cpu"])
    # colour fixes: one more row per model and method, the model's own images corrected towards bicubic
    fixed = bench.run(argv[:2] + ["--n", "4", "--steps", "2", "--step-sweep", "", "--batch", "2", "--device", "cpu",
                                  "--seed", "3", "--color-fix", "adain,wavelet"])
    assert [r["method"] for r in fixed["rows"]] == [
        "bicubic", "sr_tiny_stablesr_x4 (stablesr, time-aware)", "sr_tiny_stablesr_x4 (stablesr, time-aware) + adain fix",
        "sr_tiny_stablesr_x4 (stablesr, time-aware) + wavelet fix", "sr_tiny_concat_x4 (concat)",
        "sr_tiny_concat_x4 (concat) + adain fix", "sr_tiny_concat_x4 (concat) + wavelet fix"]
    assert scores(fixed["rows"][1:2]) == scores(rows[1:2]) and fixed["color_fix"] == ["adain", "wavelet"]
    assert scores(fixed["rows"][2:4]) != scores(fixed["rows"][1:2]) * 2
    # paired differences to bicubic: zero for bicubic itself, the difference of the means for every row
    assert fixed["rows"][0]["psnr_vs_bicubic"] == 0 and fixed["rows"][0]["perceptual_vs_bicubic_se"] == 0
    for r in fixed["rows"][1:]:
        assert r["psnr_vs_bicubic"] == pytest.approx(r["psnr"] - fixed["rows"][0]["psnr"], abs=1e-4)
        assert r["perceptual_vs_bicubic"] == pytest.approx(r["perceptual"] - fixed["rows"][0]["perceptual"], abs=1e-6)
        assert r["psnr_vs_bicubic_se"] > 0 and r["perceptual_vs_bicubic_se"] > 0
    # ILVR: one more row per model, sampled from the same noise with the low frequencies held; and the unsteered
    # prior, one more model: the first model's prior with nothing trained
    held = bench.run(["--models", str(stablesr), "--n", "4", "--steps", "2", "--step-sweep", "", "--batch", "2",
                      "--device", "cpu", "--seed", "3", "--ilvr", "2", "--unsteered"])
    assert [r["method"] for r in held["rows"]] == [
        "bicubic", "sr_tiny_stablesr_x4 (stablesr, time-aware)", "sr_tiny_stablesr_x4 (stablesr, time-aware) + ILVR-2",
        "prior, unsteered", "prior, unsteered + ILVR-2"] and held["ilvr"] == 2
    assert scores(held["rows"][1:2]) == scores(rows[1:2])
    assert all(scores(held["rows"][k:k + 1]) != scores(rows[1:2]) for k in (2, 3, 4))
    assert held["models"][1]["prior"] == held["models"][0]["prior"]
    with pytest.raises(SystemExit):
        bench.run(argv[:2] + ["--n", "2", "--device", "cpu", "--ilvr", "0"])
    # the training split: other patches, so another bicubic score
    seen = bench.run(argv[:2] + ["--n", "4", "--steps", "1", "--step-sweep", "", "--device", "cpu", "--seed", "3",
                                 "--split", "train"])
    train_hr = get_dataset("photos", 16, "train").images[:4]
    train_lr = degrade(train_hr, DegradationConfig.from_dict({**train["degradation"], "scale": train["scale"]}), seed=3)
    assert seen["split"] == "train"
    assert seen["rows"][0]["psnr"] == pytest.approx(sr_scores(upsample(train_lr, 4), train_hr)["psnr"], abs=1e-6)
    with pytest.raises(SystemExit):
        bench.run(argv[:2] + ["--n", "2", "--device", "cpu", "--color-fix", "histogram"])
    assert "same scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.run(["--models", str(stablesr), "--n", "0"])
    with pytest.raises(SystemExit):
        bench.run(["--models", str(stablesr), "--step-sweep", "0,5"])


def test_bench_threads_times_concurrent_processes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its processes are spawned: they import it by name
    bench = importlib.import_module("bench_threads")
    out = tmp_path / "t.json"
    rows = bench.main(["--procs", "2", "--threads", "1", "--seconds", "0.3", "--batch", "2",
                                       "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["procs"], r["threads"], len(r["per_process"])) for r in rows] == [(2, 1, 2)]
    assert all(v > 0 for v in rows[0]["per_process"]) and rows[0]["total"] == pytest.approx(sum(rows[0]["per_process"]))
    with pytest.raises(SystemExit):
        bench.main(["--procs", "0"])


def test_bench_unet_counts_flops_and_measures_eager_and_compiled(one_thread):
    import argparse

    import torch

    bench = load("bench_unet")
    conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)

    class Net(torch.nn.Module):  # the (x, t) signature the script calls
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, t):
            return self.conv(x)

    x, t = torch.randn(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)
    forward = 2 * 4 * 1 * 9 * 64                              # 2 FLOPs per multiply-add, 4 outputs of 9 taps each
    assert bench.count_flops(Net(), x, t, train=False) == forward
    assert bench.count_flops(Net(), x, t, train=True) == 2 * forward   # + the weight gradient (no input gradient)
    assert conv.weight.grad is None                            # counting leaves no gradients behind
    assert bench.peak_tflops("NVIDIA H200") == 989.4 and bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_tflops("cpu") is None
    args = argparse.Namespace(threads=0, device="cpu", config="small", image_size=8, batch=2, channels_last=True,
                              amp="off", compile_mode="default", compile_backend="eager", warmup=0, iters=2,
                              profile=False)
    eager = bench.measure("ours", "train", args)
    compiled = bench.measure("ours", "sample", args, variant="compiled")
    assert eager["variant"] == "eager" and eager["flops_per_image"] > 0 and eager["compile_seconds"] is None
    assert compiled["variant"] == "compiled" and compiled["compile_seconds"] > 0 and compiled["flops_per_image"] is None
    assert min(eager["images_per_s"], compiled["images_per_s"]) > 0 and len(eager["step_seconds"]) == 2
    with pytest.raises(SystemExit):
        bench.main(["--peak-tflops", "0"])


def test_bench_attention_times_both_paths_and_names_the_one_taken(tmp_path, one_thread):
    bench = load("bench_attention")
    out = tmp_path / "attention.json"
    result = bench.main(["--dtype", "bf16", "--head-dims", "8", "--cases", "16x16,16x4", "--tokens", "32",
                         "--warmup", "0", "--iters", "1", "--json", str(out)])
    rows = result["rows"]
    assert [(r["n"], r["m"], r["phase"]) for r in rows] == [(16, 16, "forward"), (16, 16, "train"),
                                                            (16, 4, "forward"), (16, 4, "train")]
    assert all(r["fused_ms"] > 0 and r["explicit_ms"] > 0 and r["batch"] == 2 for r in rows)
    # the rule: the explicit softmax for a small bf16 training step on the CPU, the fused kernel otherwise
    assert [r["takes"] for r in rows] == ["fused", "explicit", "fused", "explicit"]
    assert json.loads(out.read_text())["rows"] == rows
    assert bench.parse_cases("256x77, 64X64") == [(256, 77), (64, 64)]
    for bad in (["--cases", "256"], ["--cases", "0x4"], ["--head-dims", "0"]):
        with pytest.raises(SystemExit):
            bench.main(bad)


def test_bench_unet_builds_diffusers_with_its_classic_attention_on_request():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    bench = load("bench_unet")
    torch.manual_seed(0)
    default, classic = bench.build("diffusers", "small", 16), bench.build("diffusers-classic", "small", 16)
    kinds = {name: {type(m.processor) for m in net.modules() if isinstance(m, Attention)}
             for name, net in (("default", default), ("classic", classic))}
    assert kinds == {"default": {AttnProcessor2_0}, "classic": {AttnProcessor}}
    for p in default.parameters():
        torch.nn.init.normal_(p, std=0.05)          # so that the attention layers matter
    classic.load_state_dict(default.state_dict())   # the same network: only the attention kernel differs
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 500])
    with torch.no_grad():
        assert torch.allclose(default(x, t), classic(x, t), atol=1e-5)


def test_bench_samplers_samples_through_torch_compile(monkeypatch, one_thread):
    import torch

    real_compile = torch.compile
    modes = []

    def traced_only(model, mode=None):  # dynamo without code generation: the wiring, in seconds
        modes.append(mode)
        return real_compile(model, backend="eager")

    args = ["--device", "cpu", "--n", "12", "--seeds", "1", "--ddim", "3", "--no-ddpm"]
    with pytest.warns(UserWarning, match="fewer samples"):
        plain = load("bench_samplers").main(args)
    monkeypatch.setattr(torch, "compile", traced_only)
    with pytest.warns(UserWarning, match="fewer samples"):
        compiled = load("bench_samplers").main(args + ["--compile", "reduce-overhead"])
    assert modes == ["reduce-overhead"] and compiled["compile_seconds"] > 0 and plain["compile_seconds"] is None
    assert compiled["rows"][1]["fd"]["mean"] == pytest.approx(plain["rows"][1]["fd"]["mean"], rel=1e-4)
