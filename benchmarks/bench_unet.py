"""Our U-Net (diffusion_course.nn.UNet) against diffusers' UNet2DModel configured to the same layout.

Measures, for each network, in one run on one device:

* training images/s: forward + backward + AdamW step on the eps-prediction MSE at random t;
* sampling images/s: no-grad forward passes (denoiser evaluations/s x batch), the cost of one sampling step;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed loop (weights, optimizer state and
  activations); on CPU (Linux) the peak resident set size (VmHWM, reset through ``/proc/self/clear_refs``
  just before the model is built) minus the resident size at that moment, so it too counts weights,
  optimizer state and activations, and also what the warm-up steps allocated. So that both mean "this
  model, this phase", every (model, phase) runs in a fresh subprocess.

Throughput is the batch size over the median time of one step (robust to other processes' bursts on a
shared host); ``--rounds`` repeats everything with the models alternating and reports the best round (the
least disturbed; the JSON keeps every round). On a loaded CPU, ``--threads 1`` gives far steadier numbers.

The diffusers network gets the same levels (block_out_channels = model_channels x channel_mult), residual
blocks per level, attention levels (AttnDown/AttnUpBlock2D where ds is in attention_resolutions, plus the
middle block's attention), GroupNorm groups and eps (1e-6), heads (attention_head_dim = channels / heads)
and time embedding (sinusoidal, cosines first, 4 x model_channels). The one difference in parameters:
diffusers' q, k, v projections have biases and ours do not (+0.07% for "small", +0.04% for "medium").

On CUDA both networks run under bf16 autocast by default (``--amp``). diffusers is optional
(``pip install -e ".[bench]"``); without it the script says so and measures our U-Net alone.

``--compile`` measures every network a second time through ``torch.compile`` (mode ``--compile-mode``), so that
eager and compiled stand side by side for both libraries; the first compiled step (tracing and code generation)
is timed apart as ``compile s`` and left out of the throughput. ``--channels-last`` runs models and inputs in the
channels-last memory format. ``--diffusers-classic`` also measures diffusers' network with its classic attention
processor (``AttnProcessor``: an explicit softmax, where its default calls ``scaled_dot_product_attention``), the
counterpart of the explicit path our attention takes in a bf16 training step on the CPU.

Work per image is counted once per network with ``torch.utils.flop_counter.FlopCounterMode`` on the eager model:
two FLOPs per multiply-add of every matrix product and convolution (attention through
``scaled_dot_product_attention`` included), forward and backward for a training step, forward alone for sampling;
element-wise work (normalisation, activations, the optimizer) is not counted. Achieved TFLOP/s = that count x
images/s. On a GPU whose dense bf16/fp16 tensor-core peak is known (``PEAK_TFLOPS``, from NVIDIA's data sheets,
without sparsity) or given by ``--peak-tflops``, the model FLOPs utilisation (MFU) is achieved / peak.

    python benchmarks/bench_unet.py --config small --batch 16 --warmup 2 --iters 5 --rounds 3 --threads 1
    python benchmarks/bench_unet.py --device cuda --config medium --batch 128 --json unet.json
    python benchmarks/bench_unet.py --device cuda --config medium --batch 256 --compile --compile-mode max-autotune
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from typing import Any, Dict, Optional

from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import diffusion_course  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS: Dict[str, Dict[str, Any]] = {
    # the shapes of the lessons' U-Nets: "medium" is UNetConfig's default (the 32x32 digits U-Net)
    "small": dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(2,),
                  num_heads=4, norm_groups=8),
    "medium": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2,),
                   num_heads=4, norm_groups=32),
}
T = 1000
LABELS = {"ours": "ours (diffusion_course.nn.UNet)", "diffusers": "diffusers UNet2DModel",
          "diffusers-classic": "diffusers UNet2DModel, classic attention"}
# dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, by a part of the device name
PEAK_TFLOPS: Dict[str, float] = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                                 "H100": 756.0, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0,
                                 "T4": 65.0, "V100": 125.0}


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16/fp16 peak of the first ``PEAK_TFLOPS`` entry whose key is part of ``device_name``."""
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def count_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, train: bool) -> int:
    """FLOPs of one forward pass (and its backward when ``train``) of ``model(x, t)``, as FlopCounterMode counts
    them (matrix products and convolutions, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model(x, t).float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                model(x, t)
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def build(name: str, config: str, image_size: int, channels: int = 1) -> torch.nn.Module:
    """Our UNet, or diffusers' UNet2DModel with the same levels, channels, blocks, attention, groups and
    heads ("diffusers-classic": the same with diffusers' classic attention processor). Both return the eps
    prediction from ``model(x, t)``."""
    c = CONFIGS[config]
    if name == "ours":
        from diffusion_course.nn import UNet, UNetConfig

        return UNet(UNetConfig(image_size=image_size, in_channels=channels, **c))
    from diffusers import UNet2DModel

    mc, mults = c["model_channels"], c["channel_mult"]
    attn = [2 ** level in c["attention_resolutions"] for level in range(len(mults))]
    width = [mc * m for m in mults]
    heads_dim = {w // c["num_heads"] for w, a in zip(width, attn) if a} | {width[-1] // c["num_heads"]}
    if len(heads_dim) != 1:
        raise ValueError("diffusers fixes one attention_head_dim; use attention levels of equal width")
    net = UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(width), layers_per_block=c["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=heads_dim.pop(), norm_num_groups=c["norm_groups"], norm_eps=1e-6,
        flip_sin_to_cos=True, freq_shift=0, dropout=0.0)
    if name == "diffusers-classic":
        from diffusers.models.attention_processor import Attention, AttnProcessor

        for module in net.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())

    class EpsOnly(torch.nn.Module):  # diffusers returns an output object; unwrap .sample
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t):
            return self.inner(x, t).sample

    return EpsOnly(net)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set size (VmHWM) of this process; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``--amp``: auto is bf16 on CUDA and float32 elsewhere."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def measure(name: str, phase: str, args: argparse.Namespace, variant: str = "eager") -> Dict[str, Any]:
    """Time ``iters`` steps of one phase ("train" or "sample") of one network, eager or compiled, after
    ``warmup`` steps."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if name.startswith("diffusers"):
        from diffusers import UNet2DModel  # noqa: F401  (import first: the library's own memory is not the model's)
    if dev.type == "cpu" and not reset_peak_rss():
        raise RuntimeError("measuring CPU memory needs Linux (/proc/self/clear_refs resets the peak RSS)")
    rss_before_model = rss_bytes()  # CPU: the peak is measured from here, so it includes weights and optimizer state
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build(name, args.config, args.image_size).to(dev, memory_format=fmt)
    n_params = sum(p.numel() for p in model.parameters())
    x0 = torch.randn(args.batch, 1, args.image_size, args.image_size, device=dev).contiguous(memory_format=fmt)
    noise = torch.randn_like(x0)
    t = torch.randint(0, T, (args.batch,), device=dev)
    dtype = amp_dtype(args.amp, dev)
    flops = count_flops(model, x0[:1], t[:1], train=phase == "train") if variant == "eager" else None
    net = model
    if variant == "compiled":
        net = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode,
                            backend=args.compile_backend)
    autocast = torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    if phase == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast:
                loss = F.mse_loss(net(x0, t).float(), noise)  # x0 stands in for x_t: the cost is the same
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                net(x0, t)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    compile_seconds = None
    if variant == "compiled":  # the first call traces and generates code: timed apart
        start = time.perf_counter()
        step()
        sync()
        compile_seconds = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes() - rss_before_model
    out = dict(model=name, phase=phase, variant=variant, params=n_params, images_per_s=args.batch / median,
               mean_images_per_s=args.batch * len(times) / sum(times), step_seconds=times, peak_mem_bytes=int(peak),
               flops_per_image=flops, compile_seconds=compile_seconds)
    if args.profile and phase == "train":
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            sync()
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        out["profile"] = prof.key_averages().table(sort_by=key, row_limit=12)
    return out


def _child(name: str, phase: str, args: argparse.Namespace, variant: str, queue) -> None:
    try:
        queue.put(measure(name, phase, args, variant))
    except Exception as e:  # report, do not hang the parent
        queue.put(dict(model=name, phase=phase, error=f"{type(e).__name__}: {e}"))


def run_isolated(name: str, phase: str, args: argparse.Namespace, variant: str = "eager") -> Dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, phase, args, variant, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{name} {variant} {phase}: {result['error']}")
    return result


def mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole comparison, models alternating, and report the best round (noisy hosts)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each run (0: torch's default)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, float32 elsewhere)")
    p.add_argument("--compile", action="store_true", help="also measure every network through torch.compile")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode (reduce-overhead and max-autotune use CUDA graphs on a GPU)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend (inductor generates code; eager only traces, for quick checks)")
    p.add_argument("--channels-last", action="store_true", help="models and inputs in channels-last memory format")
    p.add_argument("--diffusers-classic", action="store_true",
                   help="also measure diffusers' network with its classic (explicit softmax) attention processor")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS by the GPU's name)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one training step")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch, args.iters, args.rounds, args.image_size) < 1 or args.warmup < 0:
        p.error("--batch, --iters, --rounds and --image-size must be positive, --warmup non-negative")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but CUDA is not available here")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be positive")

    names = ["ours"]
    if diffusers_available():
        names += ["diffusers"] + (["diffusers-classic"] if args.diffusers_classic else [])
    else:
        print("diffusers is not installed (pip install -e '.[bench]'): benchmarking our U-Net alone.\n")
    variants = ["eager"] + (["compiled"] if args.compile else [])

    results = [run_isolated(n, ph, args, v) for _ in range(args.rounds) for n in names for v in variants
               for ph in ("train", "sample")]
    flops = {(r["model"], r["phase"]): r["flops_per_image"] for r in results if r["flops_per_image"] is not None}
    by = {}
    for key in {(r["model"], r["variant"], r["phase"]) for r in results}:  # the best round: the one least disturbed
        runs = [r for r in results if (r["model"], r["variant"], r["phase"]) == key]
        best = max(runs, key=lambda r: r["images_per_s"])
        by[key] = dict(best, peak_mem_bytes=max(r["peak_mem_bytes"] for r in runs),
                       rounds_images_per_s=[round(r["images_per_s"], 1) for r in runs],
                       tflops=best["images_per_s"] * flops[key[0], key[2]] / 1e12)
    dev = torch.device(args.device)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    dtype = amp_dtype(args.amp, dev)
    peak = args.peak_tflops or (peak_tflops(device_name) if dev.type == "cuda" and dtype is not None else None)
    precision = "float32" if dtype is None else f"{str(dtype).replace('torch.', '')} autocast"
    mem_kind = ("torch.cuda.max_memory_allocated" if dev.type == "cuda"
                else "peak RSS (VmHWM, reset before the model is built) minus RSS then")
    print(f"device {args.device} ({device_name}), torch {torch.__version__}, threads "
          f"{args.threads or torch.get_num_threads()}; config {args.config} {CONFIGS[args.config]}; "
          f"batch {args.batch}, {args.image_size}x{args.image_size}x1, {precision}, "
          f"{'channels-last' if args.channels_last else 'contiguous'}, warmup {args.warmup}, iters {args.iters}, "
          f"rounds {args.rounds}; img/s = batch / median step time, best of the rounds"
          + (f"; compiled: mode {args.compile_mode}, backend {args.compile_backend}" if args.compile else ""))
    print(f"memory: {mem_kind}; FLOPs: FlopCounterMode (matmuls and convolutions, forward + backward for training)"
          + (f"; MFU against a peak of {peak:g} TFLOP/s" if peak else "") + "\n")
    mfu_head = " train MFU | sample MFU |" if peak else ""
    print("| model | variant | parameters | train img/s | sample img/s | train TFLOP/s | sample TFLOP/s |"
          f"{mfu_head} train peak MiB | sample peak MiB | compile s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if peak else "") + " ---: | ---: | ---: |")
    for n in names:
        for v in variants:
            tr, sa = by[(n, v, "train")], by[(n, v, "sample")]
            label = LABELS[n]
            mfu = f" {tr['tflops'] / peak:.1%} | {sa['tflops'] / peak:.1%} |" if peak else ""
            comp = ("-" if tr["compile_seconds"] is None else
                    f"{tr['compile_seconds']:.0f} / {sa['compile_seconds']:.0f}")
            print(f"| {label} | {v} | {tr['params']:,} | {tr['images_per_s']:,.1f} | {sa['images_per_s']:,.1f} | "
                  f"{tr['tflops']:.3g} | {sa['tflops']:.3g} |{mfu} {mib(tr['peak_mem_bytes'])} | "
                  f"{mib(sa['peak_mem_bytes'])} | {comp} |")
    gflops = {k: v / 1e9 for k, v in flops.items()}
    print("\nGFLOP per image: " + "; ".join(f"{n} train {gflops[n, 'train']:.4f}, sample {gflops[n, 'sample']:.4f}"
                                           for n in names))
    if len(names) > 1:
        po, pd = by[("ours", "eager", "train")]["params"], by[("diffusers", "eager", "train")]["params"]
        print(f"parameters: diffusers / ours = {pd / po:.4f} (diffusers' attention has biases on q, k, v; "
              f"ours has none)")
        for other in names[1:]:
            for v in variants:
                for ph in ("train", "sample"):
                    ratio = by[("ours", v, ph)]["images_per_s"] / by[(other, v, ph)]["images_per_s"]
                    print(f"{v} {ph}: ours / {other} throughput = {ratio:.2f} (img/s per round: ours "
                          f"{by[('ours', v, ph)]['rounds_images_per_s']}, {other} "
                          f"{by[(other, v, ph)]['rounds_images_per_s']})")
    for r in results[: 2 * len(names) * len(variants)]:  # the first round's profiles
        if "profile" in r:
            print(f"\n{r['model']} ({r['variant']}): one training step, top operators\n{r['profile']}")
    meta = dict(device=args.device, device_name=device_name, torch=torch.__version__, config=args.config,
                config_values=CONFIGS[args.config], batch=args.batch, image_size=args.image_size,
                warmup=args.warmup, iters=args.iters, rounds=args.rounds, memory=mem_kind, precision=precision,
                channels_last=args.channels_last, compile_mode=args.compile_mode if args.compile else None,
                compile_backend=args.compile_backend if args.compile else None, peak_tflops=peak)
    report = dict(meta=meta, results=[{k: v for k, v in r.items() if k != "profile"} for r in results],
                  best={f"{n} {v} {ph}": {k: by[(n, v, ph)][k] for k in ("images_per_s", "tflops", "peak_mem_bytes")}
                        for (n, v, ph) in by})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
