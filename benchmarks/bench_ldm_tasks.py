"""The tasks of lesson 08 measured on the shipped latent diffusion models of the shapes.

* **inpainting** (``--caption-model``, default ``ldm_shapes32``): the box of each test image's first shape is
  hidden (widened to whole latent cells) and filled from the image's caption; reported are the PSNR of the
  **kept** region against the autoencoder's reconstruction D(E(x)) (what it must equal) and against x (the
  autoencoder's error included), and the share of inpainted images whose whole caption the attribute classifier
  finds right, with the objects alone;
* **layout to image** (``--layout-model``): samples from the boxes of test images, judged against those images'
  captions (objects: every colour and kind right; all: also the relation or position);
* **semantic map to image** (``--semantic-model``): samples from the test images' semantic maps; the share of
  pixels, and of the shapes' pixels, where the classifier's map of the sample agrees with the given map (its
  agreement on the real images is the ceiling).

DDIM with ``--steps`` steps and guidance scale ``--scale`` throughout, on the first ``--n`` test images; numbers
are reported, never asserted.

    python benchmarks/bench_ldm_tasks.py --n 200 --steps 50 --device cpu
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_course import classifier, ldm, shapes, utils  # noqa: E402
from diffusion_course.conditions import encode_captions  # noqa: E402
from diffusion_course.nn import ConditionerConfig  # noqa: E402


def _judged(result: Dict[str, Any]) -> Dict[str, float]:
    return {k: result[k] for k in ("adherence", "objects_right", "n")}


def bench_inpainting(name: str, data: shapes.ShapesData, segmenter: Any, args: argparse.Namespace,
                     device: torch.device) -> Dict[str, Any]:
    model, config = ldm.load_latent_diffusion(name, device=device)
    keep = ldm.box_keep_masks(data.layout[:, 0, 1:], data.images.shape[-1], f=model.f)
    t0 = time.time()
    filled = model.inpaint(data.images, keep, cond=encode_captions(data.captions, ConditionerConfig.from_dict(
        config["conditioner"])), guidance_scale=args.scale, steps=args.steps, seed=args.seed)
    seconds = time.time() - t0
    recon = model.decode(model.encode(data.images)).clamp(-1, 1).cpu()
    return dict(task="inpainting", model=name, step=config["step"], seconds=seconds,
                hidden_share=float(1 - keep.mean()),
                psnr_kept_vs_reconstruction=ldm.masked_psnr(filled, recon, keep),
                psnr_kept_vs_image=ldm.masked_psnr(filled, data.images, keep),
                psnr_reconstruction_vs_image=ldm.masked_psnr(recon, data.images, keep),
                **_judged(classifier.adherence_of(segmenter, filled, data)))


def bench_layout(name: str, data: shapes.ShapesData, segmenter: Any, args: argparse.Namespace,
                 device: torch.device) -> Dict[str, Any]:
    model, config = ldm.load_latent_diffusion(name, device=device)
    t0 = time.time()
    xs = model.sample(len(data), cond=data.layout, guidance_scale=args.scale, steps=args.steps, seed=args.seed)
    return dict(task="layout to image", model=name, step=config["step"], seconds=time.time() - t0,
                **_judged(classifier.adherence_of(segmenter, xs, data)))


def bench_semantic(name: str, data: shapes.ShapesData, segmenter: Any, args: argparse.Namespace,
                   device: torch.device) -> Dict[str, Any]:
    model, config = ldm.load_latent_diffusion(name, device=device)
    t0 = time.time()
    xs = model.sample(len(data), concat=model.spatial_input(semantic=data.masks), steps=args.steps, seed=args.seed)
    seconds = time.time() - t0
    fg = data.masks > 0
    agree, real = segmenter.predict(xs) == data.masks, segmenter.predict(data.images) == data.masks
    return dict(task="semantic map to image", model=name, step=config["step"], seconds=seconds,
                pixel_agreement=agree.float().mean().item(), shape_pixel_agreement=agree[fg].float().mean().item(),
                real_shape_pixel_agreement=real[fg].float().mean().item(), n=len(data))


def main(argv: Any = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--caption-model", default="ldm_shapes32", help="caption + inpainting model ('' to skip)")
    p.add_argument("--layout-model", default="ldm_shapes32_layout", help="layout model ('' to skip)")
    p.add_argument("--semantic-model", default="ldm_shapes32_semantic", help="semantic-map model ('' to skip)")
    p.add_argument("--n", type=int, default=200, help="test images per task")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale (token conditions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        p.error("--n and --steps must be >= 1")
    device = torch.device(args.device) if args.device else utils.get_device()
    test = shapes.shapes_dataset(32, "test")
    data = test.subset(torch.arange(min(args.n, len(test))))
    segmenter = classifier.load_shape_classifier()
    rows = []
    for name, bench in ((args.caption_model, bench_inpainting), (args.layout_model, bench_layout),
                        (args.semantic_model, bench_semantic)):
        if name:
            rows.append(bench(name, data, segmenter, args, device))
            print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))
    result = dict(rows=rows, n=len(data), steps=args.steps, scale=args.scale, device=str(device),
                  torch=torch.__version__, machine=platform.machine())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
