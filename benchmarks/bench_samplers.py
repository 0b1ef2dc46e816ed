"""Sample quality and speed of a shipped DDPM digit model: DDPM (all T steps), DDIM and DPM-Solver++ 2M at several
step counts.

The samplers: DDPM's Algorithm 2 with all T network calls (``--no-ddpm`` skips it), DDIM with eta = 0 at each step
count of ``--ddim`` (on its own evenly spread grid), and, when ``--dpm`` gives step counts, the second-order
DPM-Solver++ 2M (``diffusion_course.solvers``) on the grid that ``--spacing`` names (``linspace``, the DDIM grid, by
default; ``leading`` or ``trailing``), and with ``--dpm-sde`` its stochastic form, DPM-Solver++ 2M SDE, on the same
grid, once for each noise level of ``--sde-eta`` (1: the reverse SDE; between 0 and 1 it adds less noise). With
``--dpm-orders 2,3`` both forms also run at third order (DPM-Solver++ 3M and 3M SDE), each a row of its own. DDIM
and every DPM-Solver++ form make one network call per step, so a row's step count is its cost. ``--amp bf16`` runs
the network under bf16 autocast (on a GPU, or a CPU with bfloat16 kernels), the samplers' updates in float32.

For each sampler it draws ``--n`` digits from the EMA weights, several times with different seeds, and
measures, with the package's digit classifier (``diffusion_course.metrics``):

* the Fréchet distance (FD) in the classifier's feature space against the real **test split** of the digits;
* the share of samples the classifier gives some class with probability >= 0.9 ("confident");
* the wall time and images per second of sampling.

Two floors say what a perfect generator would reach:

* ``real train digits``: ``--n`` real *training* digits (random subsets, one per seed) against the same test
  split, the same sample counts as the generated sets. This is the floor to compare with;
* ``split-half``: the test split's own two halves against each other (fewer samples, so a higher number).

Real digits go through the same resizing as the model's samples (8x8 -> model size -> 32x32), so the only
difference between a generated and a real set is where the images came from.

    python benchmarks/bench_samplers.py --model ddpm_digits16 --n 1000 --seeds 3 --json samplers.json
    python benchmarks/bench_samplers.py --model ddpm_digits16 --n 64 --seeds 1 --ddim 10,50   # quick, CPU
    python benchmarks/bench_samplers.py --model ddpm_digits16 --n 1000 --seeds 3 --ddim 5,10,20,50 --dpm 5,10,20,50
    python benchmarks/bench_samplers.py --n 64 --seeds 1 --no-ddpm --ddim 10 --dpm 10 --spacing trailing
    python benchmarks/bench_samplers.py --n 512 --seeds 1 --ddim 50 --fd-sizes 128,256,512   # FD against n
    python benchmarks/bench_samplers.py --n 512 --seeds 3 --ddim 25 --dpm-sde 25 --sde-eta 0.25,0.5,1
    python benchmarks/bench_samplers.py --n 512 --seeds 3 --ddim 25 --dpm 25 --dpm-sde 25 --dpm-orders 2,3 --spacing logsnr

The Fréchet distance of a finite set is biased upwards, the more the fewer samples there are: on this model the
floor of real training digits falls from about 2.3 at 64 samples to about 0.7 at 512 (``--fd-sizes``), which is
larger than the differences between samplers. Compare FDs only at equal sample counts, with several seeds.
The bias shrinks like 1/n with a slope that depends on the set itself (on its feature covariance), so two samplers
can swap places as n grows. With two or more ``--fd-sizes`` the script also fits FD(n) = FD_inf + k / n to the
subsets' FDs by least squares and reports FD_inf, the FD extrapolated to infinitely many samples (Chong & Forsyth,
"Effectively unbiased FID and Inception Score and where to find them", CVPR 2020), beside the slope k.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_course import data, metrics, pretrained, solvers, training, utils  # noqa: E402


def parse_steps(text: str) -> List[int]:
    steps = [int(s) for s in text.split(",") if s.strip()]
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive step counts, got {text!r}")
    return steps


def parse_etas(text: str) -> List[float]:
    etas = [float(s) for s in text.split(",") if s.strip()]
    if not etas or min(etas) < 0 or max(etas) > 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated noise levels in [0, 1], got {text!r}")
    return etas


def fd_infinity(by_size: Dict[int, List[float]]) -> Dict[str, float]:
    """Least-squares fit of FD(n) = fd_inf + slope / n to every subset FD of every size (at least two sizes)."""
    pairs = [(1.0 / n, v) for n, values in by_size.items() for v in values]
    if len({x for x, _ in pairs}) < 2:
        raise ValueError("extrapolating the FD needs subsets of at least two sizes")
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    return dict(fd_inf=coef[0].item(), slope=coef[1].item())


def main(argv: Any = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ddpm_digits16", help="shipped model name or exported folder")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--n", type=int, default=1000, help="generated samples per sampler and seed")
    p.add_argument("--seeds", type=int, default=3, help="repeats with different noise")
    p.add_argument("--ddim", type=parse_steps, default=parse_steps("10,25,50,100,250"), help="DDIM step counts")
    p.add_argument("--dpm", type=parse_steps, default=[],
                   help="DPM-Solver++ 2M step counts, e.g. 10,20 (default: none)")
    p.add_argument("--dpm-sde", type=parse_steps, default=[],
                   help="DPM-Solver++ 2M SDE step counts (stochastic; e.g. 10,25), on the --spacing grid")
    p.add_argument("--dpm-orders", type=parse_steps, default=[2],
                   help="orders of the DPM-Solver++ rows: 2 (2M, default), 3 (3M) or 2,3 (both)")
    p.add_argument("--sde-eta", type=parse_etas, default=[1.0],
                   help="noise levels eta of the DPM-Solver++ SDE forms, each a row per --dpm-sde step count and order "
                        "(default 1)")
    p.add_argument("--spacing", default="linspace", choices=solvers.SPACINGS,
                   help="time-step grid of DPM-Solver++ 2M (DDIM always uses its linspace grid)")
    p.add_argument("--no-ddpm", action="store_true", help="skip the T-step ancestral sampler")
    p.add_argument("--batch", type=int, default=1000, help="images per sampling batch")
    p.add_argument("--fd-sizes", type=parse_steps, default=[],
                   help="also report the FD of random subsets of these sizes (e.g. 128,256,512) of every sampler's "
                        "samples and of the real training digits: the FD of a finite set is biased upwards, by "
                        "more for fewer samples, so only equal sizes compare")
    p.add_argument("--compile", default="off", choices=("off", "default", "reduce-overhead", "max-autotune"),
                   help="sample through torch.compile in this mode (reduce-overhead: CUDA graphs on a GPU); the code "
                        "generation is timed apart, before the timed runs")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                   help="run the network under autocast in this precision (bf16: a GPU, or a CPU with bfloat16 "
                        "kernels); the samplers' updates stay in float32")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.n < 2 or args.seeds < 1 or args.batch < 1:
        p.error("--n must be >= 2, --seeds and --batch >= 1")
    if not set(args.dpm_orders) <= {2, 3}:
        p.error(f"--dpm-orders takes 2 and 3, got {args.dpm_orders}")

    device = torch.device(args.device) if args.device else utils.get_device()
    model, diffusion, config = pretrained.load_pretrained(args.model, device=device)
    size = config["unet"]["image_size"]
    amp_dtype = training.select_amp(device, args.amp)
    if amp_dtype is not None:
        model = utils.Autocast(model, amp_dtype)
    compile_seconds = None
    if args.compile != "off":  # every sampler calls the network on the same shapes: compile once, before timing
        model = torch.compile(model, mode=None if args.compile == "default" else args.compile)
        t0 = time.perf_counter()
        for start in range(0, args.n, args.batch):  # every batch shape the runs will use
            diffusion.ddim_sample(model, (min(args.batch, args.n - start), 1, size, size), steps=2, device=device,
                                  progress=False)
        utils.cuda_sync()
        compile_seconds = time.perf_counter() - t0
        print(f"torch.compile (mode {args.compile}): {compile_seconds:.1f} s of code generation before the timed runs")
    if max(args.ddim + args.dpm + args.dpm_sde) > diffusion.T:
        p.error(f"step counts must be at most T = {diffusion.T}, got {max(args.ddim + args.dpm + args.dpm_sde)}")
    to32 = lambda x: data.resize(x.float().cpu(), 32)  # noqa: E731
    train_real = data.get_dataset("digits", image_size=size, split="train").images
    ref = to32(data.get_dataset("digits", image_size=size, split="test").images)
    if args.n > len(train_real):
        p.error(f"--n {args.n} exceeds the {len(train_real)} real training digits the floor needs")
    clf = metrics.load_digit_classifier(32)
    print(f"model {args.model} (step {config['step']}), {size}x{size}, T = {diffusion.T}, device {device}, "
          f"network in {training.dtype_name(amp_dtype)}; "
          f"reference: digits test split, {len(ref)} images; {args.n} samples per run, {args.seeds} seeds")

    def summary(values: List[float]) -> Dict[str, float]:
        t = torch.tensor(values, dtype=torch.float64)
        return dict(mean=t.mean().item(), std=t.std().item() if len(values) > 1 else 0.0)

    rows: List[Dict[str, Any]] = []
    to32_train = to32(train_real)
    extractor = metrics.ClassifierFeatures(clf)
    by_size: Dict[str, Dict[int, List[float]]] = {}

    def subset_fds(name: str, images: torch.Tensor, seed: int) -> None:
        """FD of 3 random subsets of each --fd-sizes size of ``images`` (32x32) against the test split."""
        g = torch.Generator().manual_seed(10_000 + seed)
        for m in args.fd_sizes:
            if m <= len(images):
                for _ in range(3):
                    pick = torch.randperm(len(images), generator=g)[:m]
                    by_size.setdefault(name, {}).setdefault(m, []).append(
                        metrics.frechet_distance(images[pick], ref, extractor))

    for seed in range(args.seeds if args.fd_sizes else 0):
        subset_fds("real train digits", to32_train, seed)
    floor = metrics.real_data_floor(to32_train, ref, clf, n=args.n, repeats=args.seeds, seed=1000)
    pick = torch.Generator().manual_seed(1000)  # the floor's subsets again (real_data_floor draws them so)
    floor_shift = [metrics.frechet_terms(to32_train[torch.randperm(len(to32_train), generator=pick)[:args.n]], ref,
                                         extractor)["mean_term"] for _ in range(args.seeds)]
    rows.append(dict(sampler="real train digits", steps=0, fd=dict(mean=floor["fd"], std=floor["fd_std"]),
                     mean_term=summary(floor_shift), confident=dict(mean=floor["confident_share"], std=0.0),
                     seconds=None, images_per_s=None))
    half = metrics.split_half_floor(ref, clf, repeats=5)
    print(f"floor, real train digits: FD {rows[0]['fd']['mean']:.3f} ± {rows[0]['fd']['std']:.3f}; "
          f"split-half of the test split ({half['n_half']} vs {half['n_half']}): {half['fd']:.3f} ± {half['fd_std']:.3f}")

    runs = (([] if args.no_ddpm else [("DDPM", diffusion.T, None, 0)]) + [("DDIM", s, None, 0) for s in args.ddim]
            + [(f"DPM-Solver++ {o}M", s, None, o) for o in args.dpm_orders for s in args.dpm]
            + [(f"DPM-Solver++ {o}M SDE", s, e, o) for o in args.dpm_orders for s in args.dpm_sde for e in args.sde_eta])
    for name, steps, eta, order in runs:
        label = name if eta is None or eta == 1 else f"{name} (eta {eta:g})"
        fds, confs, secs, shifts = [], [], [], []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            out = []
            utils.cuda_sync()
            t0 = time.perf_counter()
            for start in range(0, args.n, args.batch):
                shape = (min(args.batch, args.n - start), 1, size, size)
                if name == "DDPM":
                    out.append(diffusion.sample(model, shape, generator=g, device=device, progress=False))
                elif order:
                    out.append(solvers.dpm_solver_pp_2m_sample(diffusion, model, shape, steps=steps,
                                                               spacing=args.spacing, generator=g, device=device,
                                                               sde=name.endswith("SDE"), eta=eta, order=order))
                else:
                    out.append(diffusion.ddim_sample(model, shape, steps=steps, generator=g, device=device,
                                                      progress=False))
            utils.cuda_sync()
            secs.append(time.perf_counter() - t0)
            images = to32(torch.cat(out).clamp(-1, 1))
            q = metrics.sample_quality(images, ref, clf, reference_name="digits test split")
            subset_fds(f"{label} {steps}", images, seed)
            fds.append(q["fd"])
            shifts.append(metrics.frechet_terms(images, ref, extractor)["mean_term"])
            confs.append(q["confident_share"])
        row = dict(sampler=label, steps=steps, fd=summary(fds), mean_term=summary(shifts), confident=summary(confs),
                   seconds=summary(secs), images_per_s=args.n / summary(secs)["mean"])
        if order:
            row["spacing"], row["order"] = args.spacing, order
        if eta is not None:
            row["eta"] = eta
        rows.append(row)
        print(f"{label:>4} {steps:>5} steps: FD {row['fd']['mean']:.3f} ± {row['fd']['std']:.3f}, confident "
              f"{row['confident']['mean']:.1%}, {row['seconds']['mean']:.2f} s per {args.n} samples "
              f"({row['images_per_s']:.0f} images/s)")

    print("\nshift: the FD's mean term |mu_g - mu_test|^2, the part that a systematic difference of every sample makes; "
          "the rest of the FD is the difference of the spreads")
    print("\n| sampler | network calls | FD (mean ± std) | shift (mean ± std) | confident | images/s |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        calls = r["steps"] or "-"
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        label = f"{r['sampler']} ({r['spacing']})" if "spacing" in r else r["sampler"]
        print(f"| {label} | {calls} | {r['fd']['mean']:.3f} ± {r['fd']['std']:.3f} | "
              f"{r['mean_term']['mean']:.3f} ± {r['mean_term']['std']:.3f} | {r['confident']['mean']:.1%} | {ips} |")
    fd_inf: Dict[str, Dict[str, float]] = {}
    if by_size:
        sizes = [m for m in args.fd_sizes if m <= args.n]
        print("\nFD against the number of samples (mean ± std over 3 random subsets per seed):\n")
        extrapolate = len(sizes) >= 2
        if extrapolate:
            print("FD_inf: the least-squares fit of FD(n) = FD_inf + k / n over these subsets (Chong & Forsyth 2020)\n")
        print("| set | " + " | ".join(f"n = {m}" for m in sizes) + (" | FD_inf | k |" if extrapolate else " |"))
        print("| --- |" + " ---: |" * (len(sizes) + 2 * extrapolate))
        for name, fds in by_size.items():
            cells = [f"{summary(fds[m])['mean']:.3f} ± {summary(fds[m])['std']:.3f}" if m in fds else "-" for m in sizes]
            if extrapolate and len(fds) >= 2:
                fit = fd_infinity(fds)
                fd_inf[name] = fit
                cells += [f"{fit['fd_inf']:.3f}", f"{fit['slope']:.1f}"]
            elif extrapolate:
                cells += ["-", "-"]
            print(f"| {name} | " + " | ".join(cells) + " |")
    result = dict(model=args.model, step=config["step"], device=str(device),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                  torch=torch.__version__, n=args.n, seeds=args.seeds, n_reference=len(ref),
                  reference="digits test split", split_half=half, rows=rows,
                  fd_by_size={name: {str(m): summary(v) for m, v in fds.items()} for name, fds in by_size.items()},
                  fd_inf=fd_inf, compile=args.compile, compile_seconds=compile_seconds, amp=args.amp)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
