"""Super-resolution quality and speed of the lesson-09 models (StableSR, its time-agnostic ablation, the SR3-style
concat baseline) against bicubic upsampling, on the same held-out low-resolution patches.

The patches are the first ``--n`` images of the **test split** (``--split train``: of the training split, to
see how much of a model's quality is knowledge of its training images) of the first model's training data set, at
that model's high-resolution size, degraded once with that model's training degradation (seeded by ``--seed``):
every method is scored on the very same LR inputs (all models must share the scale and the HR size). Rows:

* ``bicubic``: the LR patches upsampled (the baseline every model must beat);
* each model of ``--models``, DDIM with ``--steps`` steps (eta = 0);
* with ``--unsteered``, the first model's frozen prior alone (a freshly built StableSR on it, whose zero-initialised
  SFT layers leave the prior exactly as it is): what the sampler does without any trained steering;
* with ``--color-fix adain,wavelet`` (or either), each model's images again after StableSR's colour correction
  towards the bicubic image (:func:`~diffusion_course.stablesr.color_fix`);
* with ``--ilvr LEVELS``, each model sampled again with the LR image's low frequencies held at every step (ILVR,
  ``SRDiffusion.sample(ilvr=LEVELS)``), from the same noise;
* the first model again at each step count of ``--step-sweep`` (a count equal to ``--steps`` reuses that row's
  images, which the same seeds would reproduce exactly).

Columns: PSNR (dB, peak-to-peak range 2, higher is better), SSIM (higher is better), a perceptual distance (lower
is better; :class:`~diffusion_course.losses.PerceptualLoss`, an LPIPS-style distance whose weights are printed:
ImageNet VGG16 when the torchvision weights are cached, otherwise a **random** VGG16 that is not LPIPS), for PSNR
and the perceptual distance the paired difference to bicubic on the same patches (mean over patches, with its
standard error: a difference of two or three standard errors is more than the choice of patches) and the wall
time of sampling all ``--n`` patches. Sampling runs in batches of ``--batch``, each with its own
``torch.Generator`` seeded from ``--seed`` and the batch index, so a run is reproducible and every model starts
from the same noise. Numbers are reported, never asserted.

    python benchmarks/bench_sr.py --n 200 --steps 50 --json sr.json
    python benchmarks/bench_sr.py --n 200 --steps 25 --start-t 600 --color-fix wavelet --ilvr 2 --step-sweep ""
    OMP_NUM_THREADS=1 python benchmarks/bench_sr.py --n 32 --steps 10 --step-sweep "" --device cpu   # quick
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_course import utils  # noqa: E402
from diffusion_course.data import get_dataset  # noqa: E402
from diffusion_course.degradations import DegradationConfig, degrade, upsample  # noqa: E402
from diffusion_course.losses import PerceptualLoss  # noqa: E402
from diffusion_course.sr_training import hr_size  # noqa: E402
from diffusion_course.stablesr import SRDiffusion, build_sr, color_fix, load_sr, per_image_scores  # noqa: E402
from diffusion_course.training import stream_seed  # noqa: E402

DEFAULT_MODELS = "sr_photos32,sr_photos32_agnostic,sr_photos32_concat"


def parse_names(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one model name or folder")
    return names


def parse_steps(text: str) -> List[int]:
    """Comma-separated positive step counts; the empty string is an empty list (no sweep)."""
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts, got {text!r}") from None
    if steps and min(steps) < 1:
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {text!r}")
    return steps


def parse_fixes(text: str) -> List[str]:
    fixes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [f for f in fixes if f not in ("adain", "wavelet")]
    if not fixes or unknown:
        raise argparse.ArgumentTypeError(f"colour fixes are adain and wavelet, comma-separated; got {text!r}")
    return fixes


def display_name(name: str) -> str:
    """A shipped asset's name, or an exported folder's last component."""
    path = Path(name)
    return path.name if path.is_dir() else name


UNSTEERED = "unsteered"


def label(name: str, model: SRDiffusion) -> str:
    if name == UNSTEERED:
        return "prior, unsteered"
    if model.kind == "stablesr":
        return f"{display_name(name)} (stablesr, {'time-aware' if model.time_aware else 'time-agnostic'})"
    return f"{display_name(name)} ({model.kind})"


def super_resolve(model: SRDiffusion, lr: torch.Tensor, steps: int, seed: int, batch: int,
                  device: torch.device, start_t: Optional[int] = None, ilvr: Optional[int] = None) -> Dict[str, Any]:
    """DDIM super-resolution of all of ``lr`` in batches, batch ``b`` with a generator seeded from
    ``(seed, b)``, from pure noise or (``start_t``) from the LR image noised to that step, with ILVR of
    ``ilvr`` levels if given; returns the images (CPU) and the wall time."""
    out = []
    utils.cuda_sync()
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(lr), batch)):
        g = torch.Generator().manual_seed(stream_seed(seed, 0, 1, b))
        out.append(model.sample(lr[start:start + batch].to(device), steps, sampler="ddim", generator=g,
                                start_t=start_t, ilvr=ilvr).cpu())
    utils.cuda_sync()
    return {"images": torch.cat(out), "seconds": time.perf_counter() - t0}


def score_row(method: str, images: torch.Tensor, hr: torch.Tensor, perceptual: PerceptualLoss, seconds: float,
              bicubic: Optional[Dict[str, torch.Tensor]] = None, **extra: Any) -> Dict[str, Any]:
    """One table row: the mean scores of ``images`` and, against the per-patch scores ``bicubic``, the paired
    differences ``psnr_vs_bicubic`` and ``perceptual_vs_bicubic`` with their standard errors (``..._se``)."""
    each = per_image_scores(images, hr, perceptual)
    row = {"method": method, **{k: float(each[k].mean()) for k in ("psnr", "ssim", "perceptual")},
           "seconds": seconds, **extra}
    for key in ("psnr", "perceptual"):
        diff = each[key] - bicubic[key] if bicubic is not None else torch.zeros(len(images))
        row[f"{key}_vs_bicubic"] = float(diff.mean())
        row[f"{key}_vs_bicubic_se"] = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else float("nan")
    return row


def print_table(rows: Sequence[Dict[str, Any]]) -> None:
    print("\n| method | PSNR dB (higher better) | SSIM (higher better) | perceptual (lower better) | PSNR - bicubic "
          "| perceptual - bicubic | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['perceptual']:.4f} "
              f"| {r['psnr_vs_bicubic']:+.2f} ± {r['psnr_vs_bicubic_se']:.2f} "
              f"| {r['perceptual_vs_bicubic']:+.4f} ± {r['perceptual_vs_bicubic_se']:.4f} | {r['seconds']:.2f} |")


def run(args_list: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark with command-line arguments ``args_list`` (default: ``sys.argv``); returns what
    ``--json`` writes: ``{"rows": [{"method", "psnr", "ssim", "perceptual", "seconds", ...}], "n", "steps",
    "perceptual_source", ...}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--models", type=parse_names, default=parse_names(DEFAULT_MODELS),
                   help=f"comma-separated SR asset names or exported folders (default: {DEFAULT_MODELS}); the "
                        f"first one's data set and degradation make the test patches")
    p.add_argument("--n", type=int, default=200, help="held-out test patches")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for the comparison of the models")
    p.add_argument("--step-sweep", type=parse_steps, default=parse_steps("5,10,25,50"),
                   help="DDIM step counts run for the first model only (default 5,10,25,50; '' for none)")
    p.add_argument("--seed", type=int, default=0, help="seeds the degradation of the patches and the sampling noise")
    p.add_argument("--color-fix", type=parse_fixes, nargs="?", const=["adain"], default=[],
                   help="also score every model's images after these colour corrections (stablesr.color_fix): "
                        "adain, wavelet or adain,wavelet (no value: adain)")
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="score on the held-out test patches (default) or on patches of the training split")
    p.add_argument("--start-t", type=int, default=None,
                   help="start every model from the LR image noised to this step index (default: pure noise)")
    p.add_argument("--unsteered", action="store_true",
                   help="also score the first model's prior alone (a fresh StableSR on it: no trained steering)")
    p.add_argument("--ilvr", type=int, default=None, metavar="LEVELS",
                   help="also sample every model with ILVR of this many wavelet levels (one more row per model)")
    p.add_argument("--batch", type=int, default=100, help="patches per sampling batch")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(args_list)
    if args.n < 1 or args.steps < 1 or args.batch < 1:
        p.error("--n, --steps and --batch must be >= 1")
    if args.ilvr is not None and args.ilvr < 1:
        p.error(f"--ilvr is a number of wavelet levels >= 1, got {args.ilvr}")
    device = utils.get_device(args.device)

    loaded = []
    for name in args.models:
        model, config = load_sr(name, device)
        loaded.append((name, model, config))
    first_name, first, first_config = loaded[0]
    train = first_config["train"]
    size, scale = hr_size(first), first.scale
    for name, model, _ in loaded[1:]:
        if (model.scale, hr_size(model)) != (scale, size):
            p.error(f"every model must work at the same scale and high-resolution size to be scored on the same "
                    f"patches: {first_name} has scale {scale} at {size}x{size}, {name} has scale {model.scale} "
                    f"at {hr_size(model)}x{hr_size(model)}")
    if args.unsteered:  # the zero-initialised SFT layers leave the frozen prior exactly as it is
        torch.manual_seed(args.seed)
        fresh = build_sr(first_config["sr"]["prior"], "stablesr", device=device).eval().requires_grad_(False)
        loaded.append((UNSTEERED, fresh, {**first_config, "step": 0}))
    degradation = DegradationConfig.from_dict({**train["degradation"], "scale": train["scale"]})
    if degradation.scale != scale:
        p.error(f"{first_name}'s training config says scale {train['scale']} but the model has {scale}")
    test = get_dataset(train["dataset"], size, args.split).images
    if args.n > len(test):
        p.error(f"--n {args.n} exceeds the {len(test)} images of the {train['dataset']!r} {args.split} split")
    hr = test[: args.n]
    lr = degrade(hr, degradation, seed=args.seed)
    perceptual = PerceptualLoss().to(device)

    print(f"{args.n} {args.split} patches of {train['dataset']!r} ({size}x{size}, LR {size // scale}x{size // scale}, "
          f"x{scale}), degraded as {display_name(first_name)} was trained (seed {args.seed}); device {device}")
    print(f"perceptual distance: PerceptualLoss with {perceptual.source}")
    for name, model, config in loaded[1:]:
        if config["train"]["dataset"] != train["dataset"]:
            print(f"note: {display_name(name)} was trained on {config['train']['dataset']!r}, scored on "
                  f"{train['dataset']!r}")

    utils.cuda_sync()
    t0 = time.perf_counter()
    bicubic = upsample(lr.to(device), scale).cpu()
    utils.cuda_sync()
    base = per_image_scores(bicubic, hr, perceptual)
    rows = [score_row("bicubic", bicubic, hr, perceptual, time.perf_counter() - t0, base, model=None, steps=None)]
    start = "pure noise" if args.start_t is None else f"the LR image noised to t = {args.start_t}"
    first_run = None
    for name, model, _ in loaded:
        out = super_resolve(model, lr, args.steps, args.seed, args.batch, device, args.start_t)
        first_run = first_run or out
        rows.append(score_row(label(name, model), out["images"], hr, perceptual, out["seconds"], base,
                              model=display_name(name), steps=args.steps))
        print(f"{rows[-1]['method']}: DDIM-{args.steps} from {start}, {out['seconds']:.2f} s")
        for method in args.color_fix:  # StableSR's colour corrections towards the bicubic image
            rows.append(score_row(f"{label(name, model)} + {method} fix", color_fix(out["images"], bicubic, method),
                                  hr, perceptual, out["seconds"], base, model=display_name(name), steps=args.steps))
        if args.ilvr is not None:
            held = super_resolve(model, lr, args.steps, args.seed, args.batch, device, args.start_t, args.ilvr)
            rows.append(score_row(f"{label(name, model)} + ILVR-{args.ilvr}", held["images"], hr, perceptual,
                                  held["seconds"], base, model=display_name(name), steps=args.steps))
            print(f"{rows[-1]['method']}: DDIM-{args.steps} from {start}, {held['seconds']:.2f} s")
    for k in args.step_sweep:
        out = first_run if k == args.steps else super_resolve(first, lr, k, args.seed, args.batch, device, args.start_t)
        rows.append(score_row(f"{display_name(first_name)}, DDIM-{k}", out["images"], hr, perceptual,
                              out["seconds"], base, model=display_name(first_name), steps=k))
    print_table(rows)

    models = [dict(name=display_name(name), kind=model.kind, step=config.get("step"), prior=config["sr"]["prior"],
                   time_aware=getattr(model, "time_aware", None), dataset=config["train"]["dataset"])
              for name, model, config in loaded]
    result = dict(rows=rows, n=args.n, steps=args.steps, step_sweep=args.step_sweep, start_t=args.start_t, ilvr=args.ilvr,
                  split=args.split, color_fix=args.color_fix, seed=args.seed, batch=args.batch,
                  perceptual_source=perceptual.source, dataset=train["dataset"], hr_size=size, scale=scale,
                  degradation=degradation.to_dict(), models=models, device=str(device),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  torch=torch.__version__)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    run()


if __name__ == "__main__":
    main()
