"""How many CPU threads per process: concurrent training processes against torch's thread count.

Runs ``--procs`` processes at the same time, each training the lesson-04 digits U-Net (``ddpm_digits16``'s layout,
16x16, batch ``--batch``) for ``--seconds`` after one warm-up step, with ``torch.set_num_threads(threads)``, for every
(processes, threads) pair asked for. It reports each process's steps per second and the total over the processes,
so a table shows what a second job does to the first when both ask for all the cores (oversubscription: the
threads of one process wait at every parallel region for threads the other process has pushed off the cores).

    python benchmarks/bench_threads.py                      # 1 and 2 processes x 1 and 2 threads, 20 s each
    python benchmarks/bench_threads.py --procs 1,2,3 --threads 1,2 --seconds 30 --json threads.json

The package's own choice (:func:`diffusion_course.utils.cpu_threads`) is printed first: the cores this process may
run on, or ``DIFFUSION_COURSE_THREADS`` when it is set.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _worker(threads: int, batch: int, seconds: float, barrier, queue) -> None:
    try:
        torch.set_num_threads(threads)
        from diffusion_course.nn import UNet, UNetConfig

        torch.manual_seed(0)
        model = UNet(UNetConfig(image_size=16, in_channels=1, model_channels=32, channel_mult=(1, 2, 2),
                                num_res_blocks=1, attention_resolutions=(4,), num_heads=4, norm_groups=8))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 1, 16, 16)
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,))

        def step() -> None:
            loss = F.mse_loss(model(x, t), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up, then wait so that every process starts timing together
        barrier.wait()
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            steps += 1
        queue.put(dict(steps_per_s=steps / (time.perf_counter() - t0)))
    except Exception as e:  # report, do not hang the parent (nor the other processes at the barrier)
        barrier.abort()
        queue.put(dict(error=f"{type(e).__name__}: {e}"))


def run(procs: int, threads: int, batch: int, seconds: float) -> Dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    barrier = ctx.Barrier(procs, timeout=600)  # released once every process has imported torch and warmed up
    workers = [ctx.Process(target=_worker, args=(threads, batch, seconds, barrier, queue)) for _ in range(procs)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    rates = sorted(r["steps_per_s"] for r in results)
    return dict(procs=procs, threads=threads, per_process=rates, total=sum(rates))


def parse_list(text: str) -> List[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main(argv: Any = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=parse_list, default=parse_list("1,2"), help="concurrent processes")
    p.add_argument("--threads", type=parse_list, default=parse_list("1,2"), help="torch threads per process")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per configuration")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.batch < 1 or args.seconds <= 0:
        p.error("--batch and --seconds must be positive")
    from diffusion_course.utils import cpu_threads

    print(f"cores this process may use: {len(os.sched_getaffinity(0))}; the package's choice: "
          f"{cpu_threads()} thread(s); torch {torch.__version__}, batch {args.batch}, {args.seconds:g} s each")
    print("\n| processes | threads each | steps/s per process | total steps/s |")
    print("| ---: | ---: | --- | ---: |")
    rows = []
    for procs in args.procs:
        for threads in args.threads:
            r = run(procs, threads, args.batch, args.seconds)
            rows.append(r)
            each = " / ".join(f"{v:.2f}" for v in r["per_process"])
            print(f"| {procs} | {threads} | {each} | {r['total']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
