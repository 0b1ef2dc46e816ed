"""Pixel against latent (lesson 08): the same class-conditional U-Net family on the digits at 32x32, in pixel
space and in the latent spaces of autoencoders with f = 4 (the shipped ``ae_digits32_f4``) and f = 8.

How the numbers are measured (``diffusion_course/costs.py``; every time is a median over ``--repeats`` calls
after one warm-up, CUDA synchronised):

* **step s**: one L_simple forward and backward on a batch of ``--batch-size`` (no optimiser step). The latent
  model trains on latents cached once, so its step never runs the encoder;
* **call s**: one no-grad network call on a batch of ``--batch-size`` (a guided DDIM step is one call on 2B);
* **act MiB**: the bytes autograd saves for backward in one step, each storage once, parameters left out:
  deterministic and the same on every device. On CUDA, **peak MiB** is ``torch.cuda.max_memory_allocated``
  over a step and a call (weights, gradients and batch included);
* **ratio**: pixel / latent, how many times cheaper the latent model is;
* **enc s / dec s**: the one-off costs of a latent model, encoding a batch (once per image, when the data is
  cached) and decoding one (once per sample);
* **f = 8**: no trained autoencoder ships; one of the same family (``AutoencoderConfig.for_factor(8)``) is
  randomly initialised, since costs do not depend on the weights. Its quality is therefore not measured.

Quality in the same budget: a pixel and an f = 4 latent model are trained by the package's ``Trainer`` for
``--budget-s`` seconds each (the same digits, batch, learning rate and condition encoder; the latent cache is
built before the clock starts, its time shown as setup s). Then ``--n`` samples of each, the labels 0..9 in turn,
by DDIM with ``--steps`` steps and guidance scale ``--guidance-scale``, from the EMA weights, are scored by the
package's digit classifier: **adherence** (the share read as the asked-for digit) and the Fréchet distance
(**FD**) to the digits test split in the classifier's feature space. The row of ``--n`` real training digits is
the floor. The numbers are reported, never asserted.

    python benchmarks/bench_latent.py --budget-s 300 --n 500 --steps 50
    python benchmarks/bench_latent.py --device cuda --batch-size 256 --budget-s 120 --n 1000 --json latent.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_course import costs, data, utils  # noqa: E402

MiB = 2 ** 20


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_costs(rows: List[Dict[str, Any]]) -> None:
    cuda = rows[0]["cuda_peak_bytes"] is not None
    head = (f"{'model':>11} {'input':>9} {'step s':>9} {'ratio':>6} {'call s':>9} {'ratio':>6} {'act MiB':>9} "
            f"{'ratio':>6} {'params':>8}" + (f" {'peak MiB':>9} {'ratio':>6}" if cuda else "")
            + f" {'enc s':>8} {'dec s':>8}")
    print(head)
    for r in rows:
        line = (f"{r['name']:>11} {'x'.join(map(str, r['input_shape'])):>9} {r['step_seconds']:9.4f} "
                f"{r['step_ratio']:6.1f} {r['call_seconds']:9.4f} {r['call_ratio']:6.1f} "
                f"{r['activation_bytes'] / MiB:9.2f} {r['activation_ratio']:6.1f} {r['params']:8d}")
        if cuda:
            line += f" {r['cuda_peak_bytes'] / MiB:9.1f} {r['cuda_peak_ratio']:6.1f}"
        line += f" {_num(r.get('encode_seconds'), '8.4f'):>8} {_num(r.get('decode_seconds'), '8.4f'):>8}"
        print(line + ("  (random autoencoder)" if r.get("trained_autoencoder") is False else ""))


def print_quality(rows: List[Dict[str, Any]]) -> None:
    print(f"{'model':>17} {'steps':>6} {'train s':>8} {'setup s':>8} {'sample s':>9} {'adherence':>9} {'FD':>8}")
    for r in rows:
        print(f"{r['name']:>17} {_num(r.get('steps'), '6d'):>6} {_num(r.get('seconds'), '8.1f'):>8} "
              f"{_num(r.get('setup_seconds'), '8.1f'):>8} {_num(r.get('sample_seconds'), '9.1f'):>9} "
              f"{r['adherence']:9.3f} {r['fd']:8.3f}")


def quality(args: argparse.Namespace, device: torch.device) -> List[Dict[str, Any]]:
    runs = costs.train_for_budget(args.budget_s, args.batch_size, n_train=args.n_train, device=str(device),
                                  seed=args.seed)
    train = data.get_dataset("digits", 32)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    rows = [dict(name="real train digits", **costs.score_digits(train.images[pick], train.labels[pick]))]
    for name, run in runs.items():
        score = costs.score_class_model(run["model"], run["diffusion"], args.n, args.steps, args.guidance_scale,
                                        seed=args.seed)
        rows.append(dict(name=name, steps=run["steps"], seconds=run["seconds"], setup_seconds=run["setup_seconds"],
                         loss=run["loss"], **score))
    return rows


def main(argv: Any = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-s", type=float, default=120.0, help="training seconds for each model")
    p.add_argument("--batch-size", type=int, default=64, help="batch of the cost measurements and of training")
    p.add_argument("--n", type=int, default=500, help="samples scored per model")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--n-train", type=int, default=None, help="train on the first N training digits (default all)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per cost (the median is reported)")
    p.add_argument("--amp", choices=("off", "auto", "bf16", "fp16"), default="off",
                   help="autocast of the cost measurements (training uses the Trainer's own choice)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-quality", action="store_true", help="measure the costs only")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.repeats < 1 or args.budget_s <= 0 or args.n < 2:
        p.error("--batch-size, --steps, --repeats and --budget-s must be positive, --n at least 2")
    device = torch.device(args.device) if args.device else utils.get_device()
    result: Dict[str, Any] = dict(device=str(device), torch=torch.__version__, machine=platform.machine(),
                                  settings={k: v for k, v in vars(args).items() if k != "json"},
                                  unet=costs.UNET_SETTINGS)
    result["costs"] = costs.compare_costs(args.batch_size, device=str(device), repeats=args.repeats, amp=args.amp,
                                          seed=args.seed)
    print(f"cost per training step and sampling call, batch {args.batch_size}, on {device}:")
    print_costs(result["costs"])
    if not args.skip_quality:
        result["quality"] = quality(args, device)
        print(f"\nquality after {args.budget_s:g} s of training each ({args.n} samples, DDIM {args.steps} steps, "
              f"guidance {args.guidance_scale:g}; FD against the digits test split):")
        print_quality(result["quality"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
