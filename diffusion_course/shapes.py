"""A procedurally generated, captioned data set of coloured shapes, for the conditioning lessons.

Taught in lesson 07_cross_attention, where a U-Net first follows a text prompt.

Each image (``S x S``, 32 by default; any ``S >= 16`` that is a multiple of 8) shows one to three shapes
on a plain dark background. A shape is one of :data:`SHAPE_KINDS` in one of the :data:`COLOURS`; its
*joint class* numbers the pair (colour, kind) from 1 to ``len(COLOURS) * len(SHAPE_KINDS)``, and 0 is the
background. Every image comes with

* a caption from a small fixed grammar, always true of the picture:

  - one shape:    ``"a red circle in the top left"`` (the 3x3 grid cell of its centre),
  - two shapes:   ``"a red circle above a blue square"`` (``above``, ``below``, ``left of``, ``right of``),
  - three shapes: ``"a red circle above a blue square and a green triangle"`` (the third anywhere);

* its layout: one row ``[joint class, x0, y0, x1, y1]`` per shape, box corners in [0, 1] (x to the right,
  y down), padded with zero rows;
* a semantic mask ``(S, S)`` of joint classes (a pixel belongs to a shape when the shape covers at least
  half of it) and a label, the joint class of the first shape minus one.

Shapes are drawn anti-aliased (``SUPERSAMPLE``^2 sub-pixels averaged), never overlap (their boxes keep a
gap), and within one image are distinct (colour, kind) pairs. A relation is placed to hold along its
dominant axis with a clear margin; a single shape's centre keeps clear of the grid-cell borders.

:data:`HOLDOUT_PAIRS` are (colour, kind) pairs that the ``train`` split never shows: a conditional model
that draws them has composed a colour and a shape it never saw together.

Everything is vectorised numpy and deterministic from the seed (10,000 images of 32x32 take a few
seconds). The images of ``make_shapes(n, seed=s)`` depend on ``n`` as well as on ``s``.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

SHAPE_KINDS: Tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: "OrderedDict[str, Tuple[float, float, float]]" = OrderedDict([  # RGB in [0, 1]
    ("red", (0.92, 0.12, 0.12)), ("green", (0.12, 0.80, 0.20)), ("blue", (0.16, 0.32, 0.96)),
    ("yellow", (0.95, 0.86, 0.10)), ("magenta", (0.86, 0.16, 0.86)), ("cyan", (0.10, 0.84, 0.90)),
])
BACKGROUND: Tuple[float, float, float] = (0.08, 0.08, 0.10)
HOLDOUT_PAIRS: Tuple[Tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"))
RELATIONS: Tuple[str, ...] = ("above", "below", "left of", "right of")
POSITIONS: Tuple[str, ...] = ("top left", "top", "top right", "left", "middle", "right",
                              "bottom left", "bottom", "bottom right")  # row-major 3x3 grid cells
POSITION_PHRASES: Dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "middle": "in the middle", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
PAIRS: Tuple[Tuple[str, str], ...] = tuple((c, k) for c in COLOURS for k in SHAPE_KINDS)  # joint class - 1
NUM_CLASSES = len(PAIRS) + 1  # the joint classes and the background
SPLITS: Dict[str, Tuple[int, int, str]] = {"train": (10_000, 7001, "train"), "test": (1000, 7002, "train"),
                                           "holdout": (1000, 7003, "holdout")}  # default n, seed, pairs
SUPERSAMPLE = 4
MAX_SHAPES = 3

# sizes and margins in pixels of a 32x32 image, scaled with the image size
_HALF_SIZE = (4.0, 7.0)    # half the side of a shape's (square) box
_EDGE = 0.5                # a box keeps this far from the image border
_GAP = 2.0                 # boxes of two shapes keep at least this far apart (along x or y)
_CELL_MARGIN = 2.0         # a single shape's centre keeps this far from the grid-cell borders
_RELATION_MARGIN = 4.0     # for "above": dy > |dx| + margin (and alike for the others)


def joint_class(colour: str, kind: str) -> int:
    """The joint class ``1 .. len(COLOURS) * len(SHAPE_KINDS)`` of a (colour, kind) pair; 0 is the
    background. Lesson: 07_cross_attention."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; valid: {', '.join(COLOURS)}")
    if kind not in SHAPE_KINDS:
        raise ValueError(f"unknown shape kind {kind!r}; valid: {', '.join(SHAPE_KINDS)}")
    return 1 + list(COLOURS).index(colour) * len(SHAPE_KINDS) + SHAPE_KINDS.index(kind)


def pair_of(joint: int) -> Tuple[str, str]:
    """The (colour, kind) pair of a joint class ``1 .. len(PAIRS)`` (the inverse of :func:`joint_class`).
    Lesson: 07_cross_attention."""
    if not 1 <= int(joint) <= len(PAIRS):
        raise ValueError(f"joint class {joint} is not a shape; shapes are 1..{len(PAIRS)} (0 is the background)")
    return PAIRS[int(joint) - 1]


def class_names() -> List[str]:
    """The names ``"red circle", ...`` of the joint classes 1.. in order, i.e. indexed by a label (joint
    class - 1). Lesson: 07_cross_attention."""
    return [f"{c} {k}" for c, k in PAIRS]


def caption_vocabulary() -> List[str]:
    """Every word that can appear in a caption, sorted. Lesson: 07_cross_attention."""
    words = {"a", "and"} | set(COLOURS) | set(SHAPE_KINDS)
    for phrase in list(RELATIONS) + list(POSITION_PHRASES.values()):
        words.update(phrase.split())
    return sorted(words)


def make_caption(objects: Sequence[Tuple[str, str]], relation: Optional[str] = None,
                 position: Optional[str] = None) -> str:
    """The caption of one image from its objects (colour, kind) in caption order, the relation of the first
    two (two or three objects) or the grid cell of a single one. Lesson: 07_cross_attention."""
    names = [f"a {c} {k}" for c, k in objects]
    if len(objects) == 1:
        if position not in POSITION_PHRASES:
            raise ValueError(f"one shape needs a position from {POSITIONS}, got {position!r}")
        return f"{names[0]} {POSITION_PHRASES[position]}"
    if len(objects) not in (2, 3) or relation not in RELATIONS:
        raise ValueError(f"two or three shapes need a relation from {RELATIONS}; got {len(objects)} shapes "
                         f"and relation {relation!r}")
    text = f"{names[0]} {relation} {names[1]}"
    return text + (f" and {names[2]}" if len(objects) == 3 else "")


def opposite_relation(relation: Optional[str]) -> Optional[str]:
    """The relation that holds when ``relation`` is read the other way round ("below" for "above"); None for
    None (a caption without a relation). Lesson: 07_cross_attention."""
    if relation is None:
        return None
    opposite = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
    if relation not in opposite:
        raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
    return opposite[relation]


def relation_holds(relation: str, a: Tuple[float, float], b: Tuple[float, float], margin: float = 0.0) -> bool:
    """Whether ``a relation b`` holds for centres ``(x, y)`` (y down) along its dominant axis:
    ``above`` means ``y_b - y_a > |x_b - x_a| + margin``, and alike. Lesson: 07_cross_attention."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}
    if relation not in along:
        raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
    across = abs(dx) if relation in ("above", "below") else abs(dy)
    return bool(along[relation] > across + margin)


def grid_cell(x: float, y: float) -> str:
    """The name of the 3x3 grid cell (``"top left"``, ..., ``"bottom right"``) of a point ``(x, y)`` in
    [0, 1]. Lesson: 07_cross_attention."""
    col, row = min(max(int(np.floor(x * 3)), 0), 2), min(max(int(np.floor(y * 3)), 0), 2)
    return POSITIONS[row * 3 + col]


@dataclass
class ShapesData:
    """A captioned shapes data set, duck-typed like ``data.ImageData``. Lesson: 07_cross_attention.

    images (N, 3, S, S) float32 in [-1, 1]; labels (N,) int64, the joint class of the first object - 1;
    classes the names of the labels; captions N strings; layout (N, max_shapes, 5) float32 rows
    ``[joint class (0 = padding), x0, y0, x1, y1]`` in [0, 1]; masks (N, S, S) int64 joint classes;
    objects the (colour, kind) pairs of each image in caption order; relations (None for one shape) and
    positions (None for two or three).
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    classes: List[str]
    captions: List[str]
    layout: torch.Tensor
    masks: torch.Tensor
    objects: List[List[Tuple[str, str]]]
    relations: List[Optional[str]]
    positions: List[Optional[str]]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def shape(self) -> tuple:
        """The shape of one image, ``(3, S, S)``."""
        return tuple(self.images.shape[1:])

    def subset(self, idx) -> "ShapesData":
        """A new ShapesData of the rows ``idx`` (ints, a slice, a boolean or integer tensor or array).
        Lesson: 07_cross_attention."""
        rows = torch.arange(len(self))[idx if isinstance(idx, slice) else torch.as_tensor(idx)].reshape(-1)
        pick = rows.tolist()
        return ShapesData(self.images[rows], self.labels[rows], self.name, list(self.classes),
                          [self.captions[i] for i in pick], self.layout[rows], self.masks[rows],
                          [list(self.objects[i]) for i in pick], [self.relations[i] for i in pick],
                          [self.positions[i] for i in pick])

    def __repr__(self) -> str:
        counts = np.bincount([len(o) for o in self.objects], minlength=MAX_SHAPES + 1)[1:]
        first = f"; first: {self.captions[0]!r}" if len(self) else ""
        return (f"ShapesData({self.name!r}, {len(self)} images of shape {self.shape}, {len(self.classes)} classes, "
                f"images with 1/2/3 shapes: {'/'.join(str(int(c)) for c in counts)}{first})")


# ----------------------------------------------------------------------------------------------
# Placement: sizes and centres (pixels) that satisfy the caption
# ----------------------------------------------------------------------------------------------

def _boxes_apart(c1: np.ndarray, h1: np.ndarray, c2: np.ndarray, h2: np.ndarray, gap: float) -> np.ndarray:
    """Whether two square boxes (centres (..., 2), half-sides (...)) are at least ``gap`` apart."""
    d = np.abs(c1 - c2)
    need = (h1 + h2 + gap)[..., None]
    return (d >= need).any(-1)


def _place_pair(rng: np.random.Generator, h: np.ndarray, rel: np.ndarray, S: int) -> Tuple[np.ndarray, np.ndarray]:
    """Centres (m, 2, 2) for the first two objects (half-sides h (m, 2)) so that relation ``rel`` (m,) holds;
    returns them and whether the construction succeeded (m,)."""
    u = S / 32
    m = len(rel)
    vertical = rel <= 1                    # above / below: the dominant axis is y
    forward = (rel == 0) | (rel == 2)      # above / left of: the first object has the smaller coordinate
    h_lo = np.where(forward, h[:, 0], h[:, 1])  # the object with the smaller coordinate along the axis
    h_hi = np.where(forward, h[:, 1], h[:, 0])
    lo_lo, hi_lo = h_lo + _EDGE * u, S - h_lo - _EDGE * u
    lo_hi, hi_hi = h_hi + _EDGE * u, S - h_hi - _EDGE * u
    d_min = np.maximum(h_lo + h_hi + _GAP * u, _RELATION_MARGIN * u + 0.5 * u)
    d_max = hi_hi - lo_lo
    ok = d_max > d_min
    d = d_min + rng.random(m) * np.clip(d_max - d_min, 0, None)
    a_lo = lo_lo + rng.random(m) * np.clip(np.minimum(hi_lo, hi_hi - d) - lo_lo, 0, None)  # along, smaller
    a_hi = a_lo + d
    c_lo = lo_lo + rng.random(m) * (hi_lo - lo_lo)             # across, first object on the axis
    w = d - _RELATION_MARGIN * u                                # |across difference| must stay below w
    lo_b, hi_b = np.maximum(lo_hi, c_lo - w), np.minimum(hi_hi, c_lo + w)
    ok &= hi_b > lo_b
    c_hi = lo_b + rng.random(m) * np.clip(hi_b - lo_b, 0, None)
    lo_obj = np.stack([np.where(vertical, c_lo, a_lo), np.where(vertical, a_lo, c_lo)], -1)  # (x, y)
    hi_obj = np.stack([np.where(vertical, c_hi, a_hi), np.where(vertical, a_hi, c_hi)], -1)
    first = np.where(forward[:, None], lo_obj, hi_obj)
    second = np.where(forward[:, None], hi_obj, lo_obj)
    return np.stack([first, second], 1), ok


def _place(rng: np.random.Generator, k: np.ndarray, rel: np.ndarray, pos: np.ndarray, S: int,
           tries: int = 64, max_rounds: int = 200) -> Tuple[np.ndarray, np.ndarray]:
    """Half-sides (N, 3) and centres (N, 3, 2) in pixels for images of k shapes (unused slots are zero)."""
    N, u = len(k), S / 32
    half = np.zeros((N, MAX_SHAPES))
    centre = np.zeros((N, MAX_SHAPES, 2))
    pending = np.arange(N)
    for _ in range(max_rounds):
        if len(pending) == 0:
            return half, centre
        m = len(pending)
        kk, rr, pp = k[pending], rel[pending], pos[pending]
        h = rng.uniform(*_HALF_SIZE, size=(m, MAX_SHAPES)) * u
        c = np.zeros((m, MAX_SHAPES, 2))
        ok = np.ones(m, bool)
        # one shape: a centre inside its grid cell, clear of the cell borders and inside the image
        cell = np.stack([pp % 3, pp // 3], -1)  # (m, 2) column, row
        lo = np.maximum(cell * S / 3 + _CELL_MARGIN * u, h[:, :1] + _EDGE * u)
        hi = np.minimum((cell + 1) * S / 3 - _CELL_MARGIN * u, S - h[:, :1] - _EDGE * u)
        c[:, 0] = lo + rng.random((m, 2)) * np.clip(hi - lo, 0, None)
        ok &= np.where(kk == 1, (hi > lo).all(-1), True)
        # two or three shapes: the first two satisfy the relation
        pair, pair_ok = _place_pair(rng, h[:, :2], rr, S)
        multi = kk >= 2
        c[multi, :2] = pair[multi]
        ok &= np.where(multi, pair_ok, True)
        # the third: the first of `tries` uniform candidates that keeps clear of the first two
        lo3, hi3 = h[:, 2:] + _EDGE * u, S - h[:, 2:] - _EDGE * u  # (m, 1)
        cand = lo3[:, None] + rng.random((m, tries, 2)) * (hi3 - lo3)[:, None]
        free = (_boxes_apart(cand, h[:, 2:], c[:, None, 0], h[:, :1], _GAP * u)
                & _boxes_apart(cand, h[:, 2:], c[:, None, 1], h[:, 1:2], _GAP * u))  # (m, tries)
        c[:, 2] = cand[np.arange(m), free.argmax(1)]
        ok &= np.where(kk == 3, free.any(1), True)
        # check every promise once more, then keep the images that kept them
        for j in range(1, MAX_SHAPES):
            for i in range(j):
                apart = _boxes_apart(c[:, i], h[:, i], c[:, j], h[:, j], _GAP * u)
                ok &= np.where(kk > j, apart, True)
        for j in range(MAX_SHAPES):
            inside = ((c[:, j] >= h[:, j:j + 1] + 0.999 * _EDGE * u)
                      & (c[:, j] <= S - h[:, j:j + 1] - 0.999 * _EDGE * u)).all(-1)
            ok &= np.where(kk > j, inside, True)
        for i in np.flatnonzero(ok & multi):
            ok[i] = relation_holds(RELATIONS[rr[i]], c[i, 0], c[i, 1], _RELATION_MARGIN * u)
        used = np.arange(MAX_SHAPES)[None] < kk[:, None]
        done = pending[ok]
        half[done], centre[done] = (h * used)[ok], (c * used[..., None])[ok]
        pending = pending[~ok]
    raise RuntimeError(f"could not place the shapes of {len(pending)} images at image_size {S}; "
                       "this is a bug in shapes.py, please report it with the seed and size")


# ----------------------------------------------------------------------------------------------
# Rendering: anti-aliased coverage of each shape, images and masks
# ----------------------------------------------------------------------------------------------

def _inside(kind: str, dx: np.ndarray, dy: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Whether offsets (dx, dy) from the centre (y down) lie in a shape of half-size h (its box half-side)."""
    if kind == "circle":
        return dx * dx + dy * dy <= h * h
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= h
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    return (np.abs(dy) <= h) & (2 * np.abs(dx) <= dy + h)  # triangle, apex up, base at the bottom


def _coverage(kinds: np.ndarray, half: np.ndarray, centre: np.ndarray, S: int, chunk: int = 1024) -> np.ndarray:
    """The share (n, S, S) float32 of each pixel that a shape covers, from SUPERSAMPLE^2 sub-pixels each,
    computed on a patch around the shape."""
    n, ss = len(kinds), SUPERSAMPLE
    P = int(np.ceil(2 * _HALF_SIZE[1] * S / 32)) + 2
    P = min(P, S)
    out = np.zeros((n, S, S), np.float32)
    sub = (np.arange(P * ss) + 0.5) / ss  # sub-pixel centres within a patch
    for s in range(0, n, chunk):
        idx = np.arange(s, min(s + chunk, n))
        x0 = np.clip(np.floor(centre[idx, 0] - P / 2), 0, S - P).astype(int)
        y0 = np.clip(np.floor(centre[idx, 1] - P / 2), 0, S - P).astype(int)
        cov = np.zeros((len(idx), P, P), np.float32)
        for kind_index, kind in enumerate(SHAPE_KINDS):
            sel = np.flatnonzero(kinds[idx] == kind_index)
            if len(sel) == 0:
                continue
            dx = (x0[sel, None] + sub[None] - centre[idx[sel], 0, None])[:, None, :]  # (m, 1, P*ss)
            dy = (y0[sel, None] + sub[None] - centre[idx[sel], 1, None])[:, :, None]  # (m, P*ss, 1)
            inside = _inside(kind, dx, dy, half[idx[sel], None, None])                 # (m, P*ss, P*ss)
            cov[sel] = inside.reshape(len(sel), P, ss, P, ss).mean((2, 4))
        rows = y0[:, None] + np.arange(P)
        cols = x0[:, None] + np.arange(P)
        out[idx[:, None, None], rows[:, :, None], cols[:, None, :]] = cov
    return out


def _draw_objects(rng: np.random.Generator, n: int, k: np.ndarray, pairs: str) -> np.ndarray:
    """Joint classes (n, 3) of distinct (colour, kind) pairs; 0 in unused slots."""
    holdout = np.array([joint_class(*p) - 1 for p in HOLDOUT_PAIRS])
    keys = rng.random((n, len(PAIRS)))
    if pairs == "train":
        keys[:, holdout] = 2.0  # sorted last, never among the first three
    elif pairs == "holdout":
        chosen = holdout[rng.integers(0, len(holdout), n)]
        keys[np.arange(n), chosen] = -1.0  # sorted first
    order = np.argsort(keys, axis=1)[:, :MAX_SHAPES] + 1
    if pairs == "holdout":  # move the held-out pair to a random one of the image's k slots
        slot = (rng.random(n) * k).astype(int)
        first = order[:, 0].copy()
        order[:, 0] = order[np.arange(n), slot]
        order[np.arange(n), slot] = first
    return np.where(np.arange(MAX_SHAPES)[None] < k[:, None], order, 0)


def make_shapes(n: int, image_size: int = 32, seed: int = 0, min_shapes: int = 1, max_shapes: int = 3,
                pairs: str = "train") -> ShapesData:
    """``n`` captioned shape images of ``image_size`` pixels, deterministic from ``seed`` (and ``n``).

    Each image has between ``min_shapes`` and ``max_shapes`` (1..3) shapes, uniformly. ``pairs``:
    ``"train"`` never uses a pair of :data:`HOLDOUT_PAIRS`, ``"holdout"`` puts at least one in every image,
    ``"all"`` uses every pair. See the module docstring for the captions, layout and masks.
    Lesson: 07_cross_attention.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 16 or image_size % 8:
        raise ValueError(f"image_size must be an int >= 16 and a multiple of 8 (16, 24, 32, 64, ...), "
                         f"got {image_size!r}")
    if not (1 <= min_shapes <= max_shapes <= MAX_SHAPES):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {MAX_SHAPES}, got min_shapes={min_shapes}, "
                         f"max_shapes={max_shapes}")
    if pairs not in ("train", "holdout", "all"):
        raise ValueError(f"pairs must be 'train', 'holdout' or 'all', got {pairs!r}")
    n, S = int(n), int(image_size)
    rng = np.random.default_rng(seed)
    k = rng.integers(min_shapes, max_shapes + 1, n)
    rel = rng.integers(0, len(RELATIONS), n)
    pos = rng.integers(0, len(POSITIONS), n)
    joint = _draw_objects(rng, n, k, pairs)  # (n, 3)
    half, centre = _place(rng, k, rel, pos, S)

    colours = np.array([COLOURS[c] for c in COLOURS], np.float32) * 2 - 1  # (C, 3) in [-1, 1]
    background = np.array(BACKGROUND, np.float32) * 2 - 1
    images = np.broadcast_to(background[None, :, None, None], (n, 3, S, S)).copy()
    masks = np.zeros((n, S, S), np.int64)
    for j in range(MAX_SHAPES):
        rows = np.flatnonzero(k > j)
        kinds = (joint[rows, j] - 1) % len(SHAPE_KINDS)
        cov = _coverage(kinds, half[rows, j], centre[rows, j], S)  # (m, S, S)
        colour = colours[(joint[rows, j] - 1) // len(SHAPE_KINDS)]  # (m, 3)
        images[rows] += cov[:, None] * (colour - background)[:, :, None, None]
        masks[rows] = np.where(cov >= 0.5, joint[rows, j, None, None], masks[rows])

    boxes = np.concatenate([centre - half[..., None], centre + half[..., None]], -1) / S  # (n, 3, 4)
    layout = np.zeros((n, max_shapes, 5), np.float32)
    layout[:, :, 0] = joint[:, :max_shapes]
    layout[:, :, 1:] = boxes[:, :max_shapes] * (joint[:, :max_shapes, None] > 0)
    objects = [[PAIRS[j - 1] for j in row if j > 0] for row in joint.tolist()]
    relations = [RELATIONS[r] if kk >= 2 else None for r, kk in zip(rel.tolist(), k.tolist())]
    positions = [POSITIONS[p] if kk == 1 else None for p, kk in zip(pos.tolist(), k.tolist())]
    captions = [make_caption(o, r, p) for o, r, p in zip(objects, relations, positions)]
    return ShapesData(torch.from_numpy(images).clamp_(-1, 1), torch.from_numpy(joint[:, 0] - 1), "shapes",
                      class_names(), captions, torch.from_numpy(layout), torch.from_numpy(masks),
                      objects, relations, positions)


def shapes_dataset(image_size: int = 32, split: str = "train", n: Optional[int] = None) -> ShapesData:
    """The fixed shapes splits: ``train`` (10,000 images by default) and ``test`` (1,000) use the train
    pairs, ``holdout`` (1,000) puts a held-out pair into every image; each split has its own seed.

    Cached in-process: calls with the same arguments return the SAME object, so do not change it in place
    (use ``.subset(...)`` or clone the tensors). Lesson: 07_cross_attention.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; valid: {', '.join(SPLITS)}")
    return _cached_split(image_size, split, SPLITS[split][0] if n is None else n)


@functools.lru_cache(maxsize=16)
def _cached_split(image_size: int, split: str, n: int) -> ShapesData:
    _, seed, pairs = SPLITS[split]  # one cache key per (size, split, n), however the caller spelled them
    return make_shapes(n, image_size, seed=seed, pairs=pairs)
