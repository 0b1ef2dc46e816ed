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
