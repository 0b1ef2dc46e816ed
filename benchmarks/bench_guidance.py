"""Adherence against diversity over the classifier-free guidance scale, for the shipped conditional models.

* ``--task digits`` (a class-conditional model such as ``cond_digits16``): ``--n`` samples per scale, the labels
  0..9 in turn, scored by the package's digit classifier: **adherence** (the share read as the asked-for digit),
  the Fréchet distance (FD) to the real test digits in the classifier's feature space, and the within-class
  spread (mean distance of a label's samples from their mean in that space: diversity). The floor row scores
  ``--n`` real training digits the same way.
* ``--task shapes`` (a caption- or layout-conditional model such as ``shapes_caption32``): for the first ``--n``
  captions of the shapes ``test`` split and of the ``holdout`` split (captions with a colour-shape pair never seen in
  training), the share of samples whose every attribute is right by the shipped attribute classifier, with the
  objects, relations and positions separately (a layout model draws from the boxes of the same images). The real
  images of each split give the classifier's ceiling. Each row also says what is wrong with the shapes
  (``classifier.shape_diagnosis``: the share of samples with the right shapes, another number of shapes, colours
  and kinds joined into the wrong pairs, wrong colours, wrong kinds, or both) and, on the samples whose shapes are
  right, how often the caption's relation holds against how often its opposite does. ``--splits train,test``
  scores the first training captions beside unseen ones: a model that does much better on the captions it was
  trained on has memorised them rather than learnt to compose. ``--attend STEP`` adds, for a caption model (in pixel
  or latent space), a row per scale sampled from the same noise with attention guidance
  (:mod:`diffusion_course.attend`; a latent model's maps over its latent grid steer z_t).

A model is a shipped name or an exported folder, in pixel space (lessons 04, 07) or a latent diffusion model
(lesson 08, e.g. ``ldm_digits32``, ``ldm_shapes32``), which samples latents and decodes them.

Every row uses the sampler ``--sampler`` (default DDIM; ``ddpm`` is Algorithm 2 with all T steps, ``dpmpp2m`` and
``dpmpp2m_sde`` the DPM-Solver++ forms of lesson 04) with ``--steps`` network calls, and ``--eta`` for the samplers
that take one (DDIM's eta, the SDE's noise level); the numbers are reported, never asserted. ``--amp bf16`` runs the
network of the plain sampler under bf16 autocast (a GPU, or a CPU with bfloat16 kernels).

    python benchmarks/bench_guidance.py --task digits --model cond_digits16 --n 1000 --scales 0,1,2,3,5,8
    python benchmarks/bench_guidance.py --task shapes --model shapes_caption32 --n 500 --scales 1,3,5
    python benchmarks/bench_guidance.py --task shapes --model ldm_shapes32 --n 500 --scales 1,3,5
    python benchmarks/bench_guidance.py --task shapes --n 200 --scales 3 --sampler dpmpp2m_sde --steps 50
    python benchmarks/bench_guidance.py --task shapes --n 200 --scales 3 --attend 0.015
    python benchmarks/bench_guidance.py --task shapes --model ldm_shapes32 --n 200 --scales 3 --amp bf16
    python benchmarks/bench_guidance.py --task shapes --model ldm_shapes32 --n 200 --scales 3 --attend 0.08 \
        --attend-steps 12 --attend-weights 2,2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from diffusion_course import attend, classifier, data, ldm, metrics, pretrained, shapes, utils  # noqa: E402
from diffusion_course.conditions import encode_captions  # noqa: E402
from diffusion_course.nn import ConditionerConfig  # noqa: E402
from diffusion_course.solvers import SAMPLERS  # noqa: E402
from diffusion_course.training import sample_images, select_amp  # noqa: E402


def parse_scales(text: str) -> List[float]:
    scales = [float(s) for s in text.split(",") if s.strip()]
    if not scales or min(scales) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated scales >= 0, got {text!r}")
    return scales


def parse_splits(text: str) -> Tuple[str, ...]:
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in splits if s not in shapes.SPLITS]
    if bad or not splits:
        raise argparse.ArgumentTypeError(f"unknown shapes split(s) {', '.join(bad) or '(none given)'}; valid: "
                                         f"{', '.join(shapes.SPLITS)}")
    return splits


def parse_weights(text: str) -> Tuple[float, float]:
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 2 or min(weights) < 0:
        raise argparse.ArgumentTypeError(f"expected two weights >= 0 as BIND,REL, got {text!r}")
    return weights


def digit_scores(images: torch.Tensor, want: torch.Tensor, reference: torch.Tensor,
                 clf: metrics.DigitClassifier) -> Dict[str, float]:
    """Adherence, FD and within-class spread of 32x32 digit images with the labels ``want``."""
    probs = clf.predict_proba(images)
    with torch.no_grad():
        feats = clf.features(images)
    classes = [c for c in range(10) if (want == c).sum() > 1]
    spread = sum((feats[want == c] - feats[want == c].mean(0)).norm(dim=1).mean().item() for c in classes)
    return dict(adherence=(probs.argmax(1) == want).float().mean().item(),
                fd=metrics.frechet_distance(images, reference, metrics.ClassifierFeatures(clf)),
                spread=spread / len(classes) if classes else float("nan"))  # no label drawn twice: no spread


def load_model(name: str, device: torch.device, sampler: str = "ddim", eta: Optional[float] = None,
               amp: str = "off") -> Tuple[Callable[..., torch.Tensor], int, Dict[str, Any]]:
    """``(draw(n, cond, scale, steps, seed) -> images in [-1, 1], image size, config dict)`` of a shipped pixel or
    latent model, sampling with ``sampler`` (and ``eta``), the network under autocast when ``amp`` says so."""
    if name in pretrained.available("ldm") or (Path(name) / "config.json").is_file() and \
            "ldm" in json.loads((Path(name) / "config.json").read_text()):
        latent, info = ldm.load_latent_diffusion(name, device=device)
        dtype = select_amp(device, amp)
        return (lambda n, cond, scale, steps, seed: latent.sample(n, cond=cond, guidance_scale=scale, steps=steps,
                                                                   seed=seed, sampler=sampler, eta=eta, autocast=dtype),
                latent.autoencoder.config.image_size, info)
    model, diffusion, info = pretrained.load_pretrained(name, device=device)
    return (lambda n, cond, scale, steps, seed: sample_images(model, diffusion, n, sampler, steps, seed=seed, eta=eta,
                                                               progress=False, cond=cond, guidance_scale=scale,
                                                               amp=amp),
            model.config.image_size, info)


def bench_digits(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    draw, S, info = load_model(args.model, device, args.sampler, args.eta, args.amp)
    to32 = lambda x: data.resize(x.cpu(), 32)  # noqa: E731
    clf = metrics.load_digit_classifier(32)
    reference = to32(data.get_dataset("digits", image_size=S, split="test").images)
    train = data.get_dataset("digits", image_size=S, split="train")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    rows = [dict(scale=None, name="real train digits", **digit_scores(to32(train.images[pick]), train.labels[pick],
                                                                         reference, clf))]
    want = torch.arange(args.n) % 10
    for s in args.scales:
        t0 = time.time()
        xs = draw(args.n, want, s, args.steps, args.seed)
        secs = time.time() - t0
        rows.append(dict(scale=s, name=f"s = {s}", seconds=secs, **digit_scores(to32(xs), want, reference, clf)))
    return dict(step=info["step"], rows=rows)


def bench_shapes(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    draw, S, info = load_model(args.model, device, args.sampler, args.eta, args.amp)
    config = ConditionerConfig.from_dict(info["conditioner"])
    if args.attend > 0:
        if config.kind != "text" or args.sampler != "ddim" or args.eta:
            raise SystemExit("--attend steers DDIM (eta 0) of a caption model such as shapes_caption32 or ldm_shapes32")
        options = dict(steps=args.steps, step_size=args.attend, guided_steps=args.attend_steps,
                       map_size=args.attend_map_size, bind_weight=args.attend_weights[0],
                       relation_weight=args.attend_weights[1], seed=args.seed)
        if "ldm" in info:  # the latents z_t are steered, then decoded
            latent, _ = ldm.load_latent_diffusion(args.model, device=device)
            steer = lambda captions, s: latent.attention_guided_sample(captions, guidance_scale=s, **options)  # noqa: E731
        else:
            model, diffusion, _ = pretrained.load_pretrained(args.model, device=device)
            steer = lambda captions, s: attend.attention_guided_sample(  # noqa: E731
                model, diffusion, captions, guidance_scale=s, **options)
    segmenter = classifier.load_shape_classifier()
    rows = []
    for split in args.splits:
        ds = shapes.shapes_dataset(S, split)
        sub = ds.subset(torch.arange(min(args.n, len(ds))))
        real = classifier.adherence_of(segmenter, None, sub)
        rows.append(dict(split=split, scale=None, name="real images", **_shares(real),
                         **_diagnosis(segmenter, sub.images, sub, real)))
        cond = encode_captions(sub.captions, config) if config.kind == "text" else sub.layout
        for s in args.scales:
            t0 = time.time()
            xs = draw(len(sub), cond, s, args.steps, args.seed)
            secs = time.time() - t0
            result = classifier.adherence_of(segmenter, xs, sub)
            rows.append(dict(split=split, scale=s, name=f"s = {s}", seconds=secs, **_shares(result),
                             **_diagnosis(segmenter, xs, sub, result)))
            if args.attend > 0:  # the same noise, steered by the cross-attention maps
                t0 = time.time()
                xs = steer(sub.captions, s)
                secs = time.time() - t0
                result = classifier.adherence_of(segmenter, xs, sub)
                rows.append(dict(split=split, scale=s, name=f"s = {s} + attention", seconds=secs, **_shares(result),
                                 **_diagnosis(segmenter, xs, sub, result)))
    return dict(step=info["step"], rows=rows)


def _shares(result: Dict[str, Any]) -> Dict[str, float]:
    return {k: result[k] for k in ("adherence", "objects_right", "relation_right", "position_right", "n")}


def _diagnosis(segmenter: Any, images: torch.Tensor, sub: Any, result: Dict[str, Any]) -> Dict[str, float]:
    """classifier.shape_diagnosis, flattened: the share of each kind of wrong shapes, and the relation against its
    opposite on the samples whose shapes are right."""
    d = classifier.shape_diagnosis(segmenter, images, sub, result)
    return {**{f"shapes {kind}": share for kind, share in d["errors"].items()},
            "relation if shapes right": d["relation_if_right"], "opposite if shapes right": d["opposite_if_right"],
            "n relation if shapes right": d["n_relation_if_right"]}


def main(argv: Any = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("digits", "shapes"), default="digits")
    p.add_argument("--model", default=None, help="shipped model name or exported folder (default: cond_digits16 "
                                                  "or shapes_caption32)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--n", type=int, default=1000, help="samples per scale (shapes: captions per split)")
    p.add_argument("--scales", type=parse_scales, default=parse_scales("0,1,2,3,5,8"), help="guidance scales")
    p.add_argument("--steps", type=int, default=50, help="network calls per sample (ddpm: ignored, all T)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="the sampler (default ddim)")
    p.add_argument("--eta", type=float, default=None, help="DDIM's eta or the SDE samplers' noise level (default: "
                                                           "the sampler's own, 0 for DDIM)")
    p.add_argument("--splits", type=parse_splits, default=("test", "holdout"),
                   help="shapes splits to score, e.g. test,holdout (default) or train,test to compare the "
                        "training captions with unseen ones")
    p.add_argument("--attend", type=float, default=0.0,
                   help="also sample each scale with attention guidance of this step size (diffusion_course.attend; "
                        "0.015 in lesson 07), from the same noise (default 0: off)")
    p.add_argument("--attend-steps", type=int, default=10, help="DDIM steps that attention guidance steers "
                                                                 "(the first ones; default 10)")
    p.add_argument("--attend-weights", type=parse_weights, default=(1.0, 2.0), metavar="BIND,REL",
                   help="weights of the binding and the relation loss of attention guidance (default 1,2)")
    p.add_argument("--attend-map-size", type=int, default=16, help="side of the grid the cross-attention maps are "
                   "resized to for attention guidance (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                   help="run the network of the plain sampler under autocast (bf16: a GPU, or a CPU with bfloat16 "
                        "kernels; attention guidance stays float32)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.n < 2 or args.steps < 1:
        p.error("--n must be >= 2 and --steps >= 1")
    if args.amp != "off" and args.attend > 0:
        p.error("attention guidance samples in float32: give --amp or --attend, not both")
    args.model = args.model or {"digits": "cond_digits16", "shapes": "shapes_caption32"}[args.task]
    device = torch.device(args.device) if args.device else utils.get_device()
    result = (bench_digits if args.task == "digits" else bench_shapes)(args, device)
    result.update(task=args.task, model=args.model, n=args.n, steps=args.steps, sampler=args.sampler, eta=args.eta,
                  amp=args.amp, device=str(device),
                  torch=torch.__version__, machine=platform.machine())
    for r in result["rows"]:
        where = f"{r['split']:>8} " if "split" in r else ""
        rest = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                         if k not in ("scale", "name", "split"))
        print(f"{where}{r['name']:>18}: {rest}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
