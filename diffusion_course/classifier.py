"""The attribute classifier that scores images of shapes against their captions.

Taught in lesson 07_cross_attention: a text-conditioned model is asked for "a red circle above a blue
square"; did it draw one? :class:`ShapeSegmenter`, a small fully convolutional network, labels every pixel
of an image with its joint class (colour, kind) or the background; :func:`parse_objects` turns that mask
into objects (connected regions, their class and centre); :func:`caption_adherence` compares them with the
caption's objects, relation and position and reports the share of images that are entirely right.

The segmenter is trained on freshly generated shapes of every pair (the held-out ones included, so that it
can judge them), with noise, blur and colour jitter so that imperfect generated images are still read.
The trained one ships in ``diffusion_course/assets/shape_classifier_32`` (safetensors weights in float16,
``config.json`` and ``COMMAND.txt``, the command that made it and what it measured); make a new one with
``python -m diffusion_course train-shape-classifier --image-size 32 --out DIR``.
"""
from __future__ import annotations

import math
import shlex
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import shapes
from .checkpoint import atomic_write, write_json
from .utils import dataclass_from_dict, seed_everything

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_ASSET = "shape_classifier_32"
CONFIG_KEY = "shape_segmenter"


@dataclass
class SegmenterConfig:
    """The architecture of a :class:`ShapeSegmenter`: the image side it is trained at, the channels of its
    three resolutions (S, S/2, S/4), the number of classes and the groups of its GroupNorms.
    Lesson: 07_cross_attention."""

    image_size: int = 32
    channels: Tuple[int, int, int] = (16, 32, 48)
    num_classes: int = shapes.NUM_CLASSES
    groups: int = 4

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 3 or any(c % self.groups for c in self.channels):
            raise ValueError(f"channels must be three widths divisible by groups={self.groups}, got {self.channels}")
        if self.image_size < 8 or self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two halvings), got {self.image_size}")


def _conv(c_in: int, c_out: int, groups: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class ShapeSegmenter(nn.Module):
    """Per-pixel logits ``(B, num_classes, S, S)`` for images ``(B, 3, S, S)`` in [-1, 1]: a small U-Net
    (two convs per resolution S, S/2, S/4, skip connections, a 1x1 head). Class 0 is the background, class j
    the joint class j of :mod:`shapes`. Images of another side are resized to ``image_size`` first.
    Lesson: 07_cross_attention."""

    def __init__(self, config: Optional[SegmenterConfig] = None) -> None:
        super().__init__()
        self.config = config or SegmenterConfig()
        c0, c1, c2 = self.config.channels
        g = self.config.groups
        self.enc0 = nn.Sequential(_conv(3, c0, g), _conv(c0, c0, g))              # (B, c0, S, S)
        self.enc1 = nn.Sequential(_conv(c0, c1, g, 2), _conv(c1, c1, g))          # (B, c1, S/2, S/2)
        self.mid = nn.Sequential(_conv(c1, c2, g, 2), _conv(c2, c2, g), _conv(c2, c2, g))  # (B, c2, S/4, S/4)
        self.dec1 = _conv(c2 + c1, c1, g)
        self.dec0 = _conv(c1 + c0, c0, g)
        self.head = nn.Conv2d(c0, self.config.num_classes, 1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Check a batch ``(B, 3, H, H)`` in [-1, 1], clamp it and resize it to ``image_size``.
        Lesson: 07_cross_attention."""
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"the shape segmenter expects square RGB images (B, 3, S, S), got {got}; "
                             "for a single image use x[None]")
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("the images contain NaN or inf (did sampling diverge?)")
        if x.numel() and (x.min() < -1.5 or x.max() > 1.5):
            raise ValueError(f"images must be scaled to [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                             "for [0, 1] images use x * 2 - 1")
        x = x.clamp(-1.0, 1.0)
        S = self.config.image_size
        if x.shape[-1] != S:
            x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > S).clamp(-1.0, 1.0)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.enc0(self.prepare(x))
        h1 = self.enc1(h0)
        h = self.mid(h1)
        h = self.dec1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1))
        h = self.dec0(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h0], 1))
        return self.head(h)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The most probable class per pixel, ``(B, S, S)`` int64 on the CPU, in eval mode.
        Lesson: 07_cross_attention."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [self(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        self.train(was_training)
        S = self.config.image_size
        return torch.cat(out) if out else torch.zeros(0, S, S, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# From a mask to objects, and from objects to a verdict on the caption
# ----------------------------------------------------------------------------------------------

def connected_components(foreground: torch.Tensor) -> torch.Tensor:
    """Label the 4-connected regions of a boolean mask ``(B, H, W)``: ``(B, H, W)`` int64, 0 outside the
    regions and one positive id per region (the largest pixel index in it, plus one). Each pass spreads the
    largest id to the 4 neighbours until nothing changes. Lesson: 07_cross_attention."""
    if foreground.ndim != 3 or foreground.dtype != torch.bool:
        raise ValueError(f"need a boolean mask (B, H, W), got {foreground.dtype} {tuple(foreground.shape)}")
    B, H, W = foreground.shape
    ids = torch.arange(1, H * W + 1, dtype=torch.long).view(1, H, W).expand(B, H, W)
    labels = torch.where(foreground, ids, torch.zeros_like(ids))
    while True:
        p = F.pad(labels, (1, 1, 1, 1))
        spread = torch.stack([labels, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)
        spread = torch.where(foreground, spread, torch.zeros_like(spread))
        if torch.equal(spread, labels):
            return labels
        labels = spread


def default_min_pixels(image_size: int) -> int:
    """The smallest region counted as an object: ``image_size**2 / 128`` pixels, at least 3 (8 at 32x32,
    where the smallest real shape covers about 32). Lesson: 07_cross_attention."""
    return max(3, int(round(image_size * image_size / 128)))


def _objects_of(mask: np.ndarray, regions: np.ndarray, min_pixels: int) -> List[Dict[str, Any]]:
    S = mask.shape[-1]
    found = []
    for region in np.unique(regions[regions > 0]):
        inside = regions == region
        counts = np.bincount(mask[inside], minlength=shapes.NUM_CLASSES)
        size = int(counts.sum())
        # the region's majority class, and any other class big enough to be a second shape touching it
        keep = [j for j in np.argsort(-counts) if j > 0 and counts[j] >= min_pixels
                and (j == np.argmax(counts) or counts[j] >= 0.4 * size)]
        for j in keep:
            ys, xs = np.nonzero(inside & (mask == j))
            colour, kind = shapes.pair_of(int(j))
            centre = ((xs.min() + xs.max() + 1) / (2 * S), (ys.min() + ys.max() + 1) / (2 * S))
            found.append(dict(colour=colour, kind=kind, joint=int(j), centre=(float(centre[0]), float(centre[1])),
                              pixels=int(counts[j])))
    return sorted(found, key=lambda o: -o["pixels"])


def parse_objects(pred_mask: torch.Tensor, min_pixels: Optional[int] = None) -> List[Dict[str, Any]]:
    """The objects in a mask ``(S, S)`` of joint classes: each 4-connected foreground region of at least
    ``min_pixels`` pixels (default :func:`default_min_pixels`) gives its majority class (and a second class
    holding 40% of it, for two shapes that touch). Each object is a dict ``colour, kind, joint, centre``
    (the centre of its pixels' box, ``(x, y)`` in [0, 1], y down) ``, pixels``; largest first.
    Lesson: 07_cross_attention."""
    mask = torch.as_tensor(pred_mask)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"need one square mask (S, S), got shape {tuple(mask.shape)}; for a batch, call per image")
    mask = mask.long().cpu()
    regions = connected_components((mask > 0)[None])[0]
    return _objects_of(mask.numpy(), regions.numpy(), min_pixels or default_min_pixels(mask.shape[-1]))


def _judge(found: List[Dict[str, Any]], objects: Sequence[Tuple[str, str]], relation: Optional[str],
           position: Optional[str]) -> Tuple[bool, Optional[bool], Optional[bool]]:
    """(objects right, relation right or None, position right or None) for one image."""
    pairs = [(o["colour"], o["kind"]) for o in found]
    objects_ok = Counter(pairs) == Counter(tuple(o) for o in objects)
    centre = {}
    for o in found:  # found is sorted largest first: keep the largest region of each pair
        centre.setdefault((o["colour"], o["kind"]), o["centre"])
    first = [centre.get(tuple(o)) for o in objects[:2]]
    relation_ok = position_ok = None
    if relation is not None:
        relation_ok = None not in first and shapes.relation_holds(relation, first[0], first[1])
    if position is not None:
        position_ok = first[0] is not None and shapes.grid_cell(*first[0]) == position
    return objects_ok, relation_ok, position_ok


OBJECT_ERRORS: Tuple[str, ...] = ("right", "count", "binding", "colour", "kind", "colour and kind")


def object_error(found: Sequence[Dict[str, Any]], objects: Sequence[Tuple[str, str]]) -> str:
    """What is wrong with the shapes found in one image (``found``, as :func:`caption_adherence` returns them)
    against its caption's (colour, kind) pairs, as one of :data:`OBJECT_ERRORS`:

    * ``right``: the same pairs (as a multiset);
    * ``count``: another number of shapes;
    * ``binding``: the right colours and the right kinds, joined into the wrong pairs (a red square and a blue
      circle for "a red circle ... a blue square");
    * ``colour``, ``kind``, ``colour and kind``: the multiset of colours, of kinds, or of both differs.

    Lesson: 07_cross_attention.
    """
    got = [(o["colour"], o["kind"]) for o in found]
    want = [tuple(o) for o in objects]
    if Counter(got) == Counter(want):
        return "right"
    if len(got) != len(want):
        return "count"
    colours_ok = Counter(c for c, _ in got) == Counter(c for c, _ in want)
    kinds_ok = Counter(k for _, k in got) == Counter(k for _, k in want)
    if colours_ok and kinds_ok:
        return "binding"
    return "kind" if colours_ok else "colour" if kinds_ok else "colour and kind"


def caption_adherence(segmenter: ShapeSegmenter, images: torch.Tensor, objects: Sequence[Sequence[Tuple[str, str]]],
                      relations: Sequence[Optional[str]], positions: Sequence[Optional[str]],
                      min_pixels: Optional[int] = None, batch_size: int = 256) -> Dict[str, Any]:
    """Whether each image ``(N, 3, S, S)`` shows its caption, given as the objects (colour, kind) in
    caption order, the relation of the first two (or None) and the grid cell of a single one (or None).

    Returns per image ``all_correct``, ``objects_correct`` (the multiset of found pairs equals the caption's;
    bool tensors ``(N,)``), ``relation_correct`` and ``position_correct`` (lists, None where the caption has
    none) and ``found`` (the parsed objects); and the shares ``adherence`` (all right), ``objects_right``,
    ``relation_right`` and ``position_right`` (over the images that have one; nan if none), with ``n``.
    A relation holds when the predicted centres of the first two objects satisfy it along its dominant
    axis (:func:`shapes.relation_holds`); a position when the first object's centre lies in that grid cell.
    Lesson: 07_cross_attention.
    """
    n = len(images)
    if not (len(objects) == len(relations) == len(positions) == n) or n == 0:
        raise ValueError(f"need one caption (objects, relation, position) per image and at least one image; got "
                         f"{n} images, {len(objects)} objects, {len(relations)} relations, {len(positions)} positions")
    masks = segmenter.predict(images, batch_size)
    regions = connected_components(masks > 0).numpy()
    masks_np = masks.numpy()
    min_pixels = min_pixels or default_min_pixels(masks.shape[-1])
    found, obj_ok, rel_ok, pos_ok = [], [], [], []
    for i in range(n):
        f = _objects_of(masks_np[i], regions[i], min_pixels)
        o, r, p = _judge(f, objects[i], relations[i], positions[i])
        found.append(f)
        obj_ok.append(o)
        rel_ok.append(r)
        pos_ok.append(p)
    all_ok = torch.tensor([o and r is not False and p is not False for o, r, p in zip(obj_ok, rel_ok, pos_ok)])

    def share(values: List[Optional[bool]]) -> float:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else math.nan

    return dict(all_correct=all_ok, objects_correct=torch.tensor(obj_ok), relation_correct=rel_ok,
                position_correct=pos_ok, found=found, adherence=all_ok.float().mean().item(),
                objects_right=share(obj_ok), relation_right=share(rel_ok), position_right=share(pos_ok), n=n)


def adherence_of(segmenter: ShapeSegmenter, images: Optional[torch.Tensor], data: shapes.ShapesData,
                 **kwargs) -> Dict[str, Any]:
    """:func:`caption_adherence` of ``images`` (by default ``data.images``, the real ones) against the
    captions of ``data``. Lesson: 07_cross_attention."""
    return caption_adherence(segmenter, data.images if images is None else images, data.objects,
                             data.relations, data.positions, **kwargs)


def shape_diagnosis(segmenter: ShapeSegmenter, images: torch.Tensor, data: shapes.ShapesData,
                    result: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What goes wrong in ``images`` against the captions of ``data``: ``errors``, the share of the images in
    each class of :data:`OBJECT_ERRORS` (:func:`object_error`); and, over the ``n_relation_if_right`` images
    whose caption has a relation and whose shapes are right, the share where the caption's relation holds
    (``relation_if_right``) and where its opposite holds (``opposite_if_right``; nan when there are none). A
    model that ignores the relation word scores the two alike. ``result``: the :func:`adherence_of` of the
    same images, if already computed. Lesson: 07_cross_attention."""
    result = result or adherence_of(segmenter, images, data)
    errors = [object_error(found, objects) for found, objects in zip(result["found"], data.objects)]
    flipped = caption_adherence(segmenter, images, data.objects,
                                [shapes.opposite_relation(r) for r in data.relations], data.positions)
    judged = [(asked, opposite) for asked, opposite, e in zip(result["relation_correct"], flipped["relation_correct"],
                                                              errors) if asked is not None and e == "right"]
    mean = lambda values: float(np.mean(values)) if values else math.nan  # noqa: E731
    return dict(errors={kind: errors.count(kind) / len(errors) for kind in OBJECT_ERRORS},
                relation_if_right=mean([a for a, _ in judged]), opposite_if_right=mean([o for _, o in judged]),
                n_relation_if_right=len(judged))


@torch.no_grad()
def pixel_accuracy(segmenter: ShapeSegmenter, data: shapes.ShapesData) -> Dict[str, float]:
    """Share of all pixels, and of the shapes' pixels, whose predicted class is right. Lesson: 07_cross_attention."""
    pred = segmenter.predict(data.images)
    right = pred == data.masks
    fg = data.masks > 0
    return dict(pixel_accuracy=right.float().mean().item(), foreground_accuracy=right[fg].float().mean().item())


# ----------------------------------------------------------------------------------------------
# Training, saving, loading
# ----------------------------------------------------------------------------------------------

def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make clean images ``(B, 3, S, S)`` look more like generated ones: per image a colour jitter (gain and
    offset per channel), a blur of random strength (a blend with a 3x3 binomial blur) on half of them and
    Gaussian noise of standard deviation U(0, 0.3) on three quarters. Lesson: 07_cross_attention."""
    B = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    x = x * (1 + 0.3 * (u(B, 3, 1, 1) - 0.5)) + 0.2 * (u(B, 3, 1, 1) - 0.5)
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    a = u(B, 1, 1, 1) * (u(B, 1, 1, 1) < 0.5)
    x = (1 - a) * x + a * blurred
    sigma = 0.3 * u(B, 1, 1, 1) * (u(B, 1, 1, 1) < 0.75)
    return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(-1.0, 1.0)


def train_shape_classifier(image_size: int = 32, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3,
                           seed: int = 0, progress: bool = True, device: Optional[str] = None,
                           config: Optional[SegmenterConfig] = None) -> Tuple[ShapeSegmenter, Dict[str, Any]]:
    """Train a :class:`ShapeSegmenter` with per-pixel cross-entropy on a fresh batch of
    ``make_shapes(batch_size, pairs="all")`` each step, augmented by :func:`augment`; Adam with a one-cycle
    learning rate. Returns ``(segmenter in eval mode on the CPU, info)``, ``info`` holding the settings and
    the mean loss of the first and last 50 steps (a quarter of them, if fewer than 200). Lesson: 07_cross_attention."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    gen = seed_everything(seed)
    dev = torch.device(device or "cpu")
    model = ShapeSegmenter(config or SegmenterConfig(image_size=image_size)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses, start = [], time.time()
    model.train()
    for step in range(steps):
        batch = shapes.make_shapes(batch_size, image_size, seed=1_000_000 * (seed + 1) + step, pairs="all")
        x = augment(batch.images, gen).to(dev)
        loss = F.cross_entropy(model(x), batch.masks.to(dev))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the segmenter's loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 250 == 0 or step == steps - 1):
            print(f"step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f} ({time.time() - start:.0f} s)",
                  flush=True)
    model.eval()
    w = max(1, min(50, steps // 4))  # the window of the first and last losses
    info = dict(data="shapes (fresh, pairs='all', augmented)", image_size=image_size, steps=steps,
                batch_size=batch_size, lr=lr, seed=seed, device=str(dev), torch=torch.__version__,
                loss_first=round(float(np.mean(losses[:w])), 5), loss_last=round(float(np.mean(losses[-w:])), 5),
                train_seconds=round(time.time() - start, 1))
    return model.cpu(), info


def save_shape_classifier(model: ShapeSegmenter, out_dir: Union[str, Path], command: str = "",
                          metrics: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model.safetensors`` (weights in float16), ``config.json`` (``{"shape_segmenter": config,
    "training": metrics}``) and, when ``command`` is given, ``COMMAND.txt`` (the command and the metrics),
    each file atomically. Returns the folder. Lesson: 07_cross_attention."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    config = asdict(model.config)
    config["channels"] = list(config["channels"])
    write_json(out / "config.json", {CONFIG_KEY: config, "weights_dtype": "float16", "training": metrics or {}})
    if command:
        lines = [command.rstrip(), ""] + [f"{k}: {v}" for k, v in (metrics or {}).items()]
        atomic_write(out / "COMMAND.txt", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    return out


def load_shape_classifier(path: Optional[Union[str, Path]] = None,
                          device: Optional[Union[str, torch.device]] = None) -> ShapeSegmenter:
    """The trained segmenter (float32, eval mode, gradients off) from ``path``, a folder written by
    :func:`save_shape_classifier`, by default the shipped ``assets/shape_classifier_32``. Weights come from
    safetensors (no pickle). Lesson: 07_cross_attention."""
    import json

    from safetensors.torch import load_file

    folder = ASSETS / DEFAULT_ASSET if path is None else Path(path)
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no shape classifier in {folder} (model.safetensors + config.json); train one with "
                                f"`python -m diffusion_course train-shape-classifier --image-size 32 --out {folder}`")
    saved = json.loads((folder / "config.json").read_text())
    if CONFIG_KEY not in saved:
        raise ValueError(f"{folder / 'config.json'} has no {CONFIG_KEY!r} entry: this folder holds another kind "
                         f"of model (keys {sorted(saved)}); pass a folder written by train-shape-classifier")
    config = dataclass_from_dict(SegmenterConfig, saved[CONFIG_KEY], "shape segmenter configuration")
    model = ShapeSegmenter(config)
    weights = load_file(str(folder / "model.safetensors"))
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"the weights in {folder} do not fit the configuration in its config.json "
                         f"({saved[CONFIG_KEY]}); the checkpoint comes from a different configuration") from e
    model.requires_grad_(False)
    return model.to(device or "cpu").eval()


# ----------------------------------------------------------------------------------------------
# Command line: python -m diffusion_course train-shape-classifier
# ----------------------------------------------------------------------------------------------

def evaluate_shape_classifier(model: ShapeSegmenter, image_size: int = 32) -> Dict[str, float]:
    """Pixel accuracies and the adherence of the REAL images to their own captions on the ``test`` and
    ``holdout`` splits of :func:`shapes.shapes_dataset`. Lesson: 07_cross_attention."""
    out: Dict[str, float] = {}
    for split in ("test", "holdout"):
        data = shapes.shapes_dataset(image_size, split)
        acc, adh = pixel_accuracy(model, data), adherence_of(model, None, data)
        out.update({f"{split}_{k}": round(v, 5) for k, v in acc.items()})
        out.update({f"{split}_{k}": round(adh[k], 5) for k in ("adherence", "objects_right", "relation_right",
                                                               "position_right")})
        out[f"{split}_n"] = len(data)
    return out


def _train_cli(args) -> int:
    out = Path(args.out) if args.out else ASSETS / args.name
    if args.threads:  # on a shared CPU, one thread per process can be many times faster than two
        torch.set_num_threads(args.threads)
    model, info = train_shape_classifier(args.image_size, args.steps, args.batch_size, args.lr, args.seed,
                                         device=args.device)
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                           for k, v in model.state_dict().items()})  # measure what will be loaded
    info.update(evaluate_shape_classifier(model, args.image_size))
    where = f"--out {shlex.quote(str(args.out))}" if args.out else f"--name {shlex.quote(args.name)}"
    command = (f"python -m diffusion_course train-shape-classifier --image-size {args.image_size} --steps {args.steps} "
               f"--batch-size {args.batch_size} --lr {args.lr} --seed {args.seed} {where}"
               + (f" --device {args.device}" if args.device else "")
               + (f" --threads {args.threads}" if args.threads else ""))
    command += (f"\n# measured on the float16 weights: test pixel accuracy {info['test_pixel_accuracy']:.4f}, "
                f"adherence of the real test images to their captions {info['test_adherence']:.4f} "
                f"({info['test_n']} images), holdout {info['holdout_adherence']:.4f} ({info['holdout_n']} images)")
    save_shape_classifier(model, out, command, info)
    for split in ("test", "holdout"):
        print(f"{split}: pixel accuracy {info[f'{split}_pixel_accuracy']:.4f}, foreground "
              f"{info[f'{split}_foreground_accuracy']:.4f}; adherence {info[f'{split}_adherence']:.4f} (objects "
              f"{info[f'{split}_objects_right']:.4f}, relation {info[f'{split}_relation_right']:.4f}, position "
              f"{info[f'{split}_position_right']:.4f}) on {info[f'{split}_n']} real images")
    print(f"saved to {out}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``train-shape-classifier`` to the command line. Lesson: 07_cross_attention."""
    p = subparsers.add_parser("train-shape-classifier",
                              help="train the shapes segmenter that scores images against their captions")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cpu (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder")
    where.add_argument("--name", help=f"a folder of the package's assets, e.g. {DEFAULT_ASSET}")
    p.set_defaults(func=_train_cli)
