"""The fused attention kernel against the explicit softmax, per shape: the rule behind
``diffusion_course.nn.attention.dot_product_attention``.

For each case (query tokens N, key tokens M, head width d; ``--heads`` heads and a batch that keeps about
``--tokens`` query tokens per call, 16 images of 16 x 16 by default) one attention call runs two ways on one device
and dtype: ``torch.nn.functional.scaled_dot_product_attention`` (fused) and
``diffusion_course.nn.attention.explicit_attention`` (softmax(Q K^T / sqrt(d)) V as three operations, the score
matrix materialised), forward alone ("forward", as in sampling) and forward + backward ("train"). The table gives
the median time of each (``--iters`` timed calls after ``--warmup``), fused / explicit (above 1: the explicit
softmax is faster), the path ``dot_product_attention`` takes in that case and whether it is the faster one.

    python benchmarks/bench_attention.py --device cpu --dtype bf16 --threads 1
    python benchmarks/bench_attention.py --device cpu --dtype float32 --threads 1 --json attention_fp32.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

try:
    import diffusion_course  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_course.nn.attention import explicit_attention, explicit_attention_pays  # noqa: E402

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CASES = "64x64,256x256,512x512,1024x1024,256x16,1024x16,256x77"


def parse_cases(text: str) -> List[Tuple[int, int]]:
    """"256x256,256x16" -> [(256, 256), (256, 16)]: query tokens x key tokens."""
    cases = []
    for item in text.split(","):
        try:
            n, m = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"a case is written N x M, as in 256x256 (query x key tokens), got {item!r}") from None
        if n < 1 or m < 1:
            raise ValueError(f"token counts must be positive, got {item!r}")
        cases.append((n, m))
    return cases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, train: bool, warmup: int, iters: int) -> float:
    """Median seconds of one call of ``fn(q, k, v)`` (and its backward pass when ``train``)."""
    grad = torch.randn_like(q) if train else None

    def once():
        if train:
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v)

    for _ in range(warmup):
        once()
    times = []
    for _ in range(iters):
        _sync(q.device)
        start = time.perf_counter()
        once()
        _sync(q.device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(n: int, m: int, d: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batch = max(1, args.tokens // n)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for train in (False, True):
        q, k, v = (torch.randn(batch, args.heads, length, d, generator=gen).to(device, dtype).requires_grad_(train)
                   for length in (n, m, m))
        with torch.set_grad_enabled(train):
            picks_explicit = explicit_attention_pays(q, k, v)
        fused = time_call(F.scaled_dot_product_attention, q, k, v, train, args.warmup, args.iters)
        explicit = time_call(explicit_attention, q, k, v, train, args.warmup, args.iters)
        rows.append(dict(n=n, m=m, d=d, batch=batch, heads=args.heads, phase="train" if train else "forward",
                         fused_ms=1e3 * fused, explicit_ms=1e3 * explicit, ratio=fused / explicit,
                         takes="explicit" if picks_explicit else "fused",
                         takes_faster=(explicit <= fused) == picks_explicit))
    return rows


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dims", default="16,32,64", help="comma-separated widths per head")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated query x key token counts")
    p.add_argument("--tokens", type=int, default=4096, help="query tokens per call (batch = tokens // N)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
        dims = [int(v) for v in args.head_dims.split(",")]
    except ValueError as err:
        p.error(str(err))
    if min(dims) < 1 or args.heads < 1 or args.tokens < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--head-dims, --heads, --tokens and --iters must be positive, --warmup not negative")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    rows = [row for d in dims for n, m in cases for row in measure(n, m, d, args)]
    print(f"# attention on {args.device}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), {args.heads} heads, about {args.tokens} query tokens per call; median of {args.iters}\n")
    print("| d | N x M | batch | pass | fused ms | explicit ms | fused / explicit | path taken | the faster? |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        print(f"| {r['d']} | {r['n']} x {r['m']} | {r['batch']} | {r['phase']} | {r['fused_ms']:.2f} | "
              f"{r['explicit_ms']:.2f} | {r['ratio']:.2f} | {r['takes']} | {'yes' if r['takes_faster'] else 'no'} |")
    result = dict(device=args.device, dtype=args.dtype, threads=torch.get_num_threads(), torch=torch.__version__,
                  python=platform.python_version(), rows=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
