"""The benchmark scripts run end to end (tiny sizes; their figures are reported, never asserted)."""
import importlib.util
import json
from pathlib import Path

import pytest

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


def test_bench_samplers_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--n", "1"])
    with pytest.raises(SystemExit):
        load("bench_samplers").main(["--ddim", "0,5"])


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
    with pytest.raises(SystemExit):
        load("bench_guidance").main(["--scales", "-1"])
    # a latent diffusion model (lesson 08) goes through the same script
    latent = load("bench_guidance").main(["--task", "shapes", "--model", "ldm_shapes32", "--device", "cpu", "--n", "3",
                                          "--scales", "3", "--steps", "2"])
    assert latent["model"] == "ldm_shapes32" and len(latent["rows"]) == 4


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
