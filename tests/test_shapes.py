"""The captioned shapes data set: determinism, shapes and ranges, captions that are true of the layout,
masks that agree with the boxes, the held-out pairs, and clear errors."""
import numpy as np
import pytest
import torch

from diffusion_course import shapes
from diffusion_course.data import OFFLINE_IMAGE_SETS, get_dataset


@pytest.fixture(scope="module")
def data():
    return shapes.make_shapes(300, 32, seed=3)


def centres(row):
    """Box centres (x, y) of the used rows of one image's layout."""
    return [((r[1] + r[3]) / 2, (r[2] + r[4]) / 2) for r in row.tolist() if r[0] > 0]


def test_determinism_and_seeds():
    a, b = shapes.make_shapes(40, 24, seed=5), shapes.make_shapes(40, 24, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and a.captions == b.captions
    c = shapes.make_shapes(40, 24, seed=6)
    assert not torch.equal(a.images, c.images) and a.captions != c.captions


@pytest.mark.parametrize("size", [16, 24, 32, 64])
def test_shapes_dtypes_ranges(size):
    d = shapes.make_shapes(30, size, seed=1)
    assert d.images.shape == (30, 3, size, size) and d.images.dtype == torch.float32
    assert d.images.min() >= -1 and d.images.max() <= 1
    assert d.masks.shape == (30, size, size) and d.masks.dtype == torch.long
    assert d.layout.shape == (30, 3, 5) and d.layout.dtype == torch.float32
    assert d.labels.dtype == torch.long and d.labels.min() >= 0 and d.labels.max() < len(shapes.PAIRS)
    assert d.shape == (3, size, size) and len(d) == 30 and d.name == "shapes"
    boxes = d.layout[..., 1:][d.layout[..., 0] > 0]
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # every object is visible: its class appears in the mask
    for i in range(30):
        assert set(d.masks[i].unique().tolist()) - {0} == {int(j) for j in d.layout[i, :, 0] if j > 0}


def test_labels_classes_and_helpers(data):
    assert shapes.class_names()[0] == "red circle" and len(shapes.class_names()) == 24
    assert shapes.joint_class("red", "circle") == 1 and shapes.pair_of(24) == ("cyan", "diamond")
    for i in range(len(data)):
        first = data.objects[i][0]
        assert data.labels[i].item() == shapes.joint_class(*first) - 1
        assert data.classes[data.labels[i]] == " ".join(first)
        assert [shapes.pair_of(int(j)) for j in data.layout[i, :, 0] if j > 0] == data.objects[i]
    image, label = data[0]
    assert image.shape == (3, 32, 32) and label == data.labels[0]


def test_captions_use_the_vocabulary_and_agree_with_the_layout(data):
    vocab = shapes.caption_vocabulary()
    assert vocab == sorted(set(vocab)) and {"red", "circle", "above", "left", "of", "middle"} <= set(vocab)
    counts = np.bincount([len(o) for o in data.objects], minlength=4)
    assert counts[1] > 50 and counts[2] > 50 and counts[3] > 50
    for cap, objs, rel, pos, row in zip(data.captions, data.objects, data.relations, data.positions, data.layout):
        assert cap == cap.strip().lower() and "  " not in cap and set(cap.split()) <= set(vocab)
        assert cap == shapes.make_caption(objs, rel, pos)
        c = centres(row)
        if len(objs) == 1:
            assert rel is None and shapes.grid_cell(*c[0]) == pos
            # the centre keeps clear of the cell borders: a small shift stays in the cell
            for dx, dy in ((0.04, 0), (-0.04, 0), (0, 0.04), (0, -0.04)):
                assert shapes.grid_cell(c[0][0] + dx, c[0][1] + dy) == pos
        else:
            assert pos is None and shapes.relation_holds(rel, c[0], c[1], margin=3.5 / 32)
            assert not any(shapes.relation_holds(r, c[0], c[1]) for r in shapes.RELATIONS if r != rel)


def test_masks_agree_with_boxes_and_objects_do_not_overlap(data):
    S = 32
    for i in range(len(data)):
        rows = [r for r in data.layout[i].tolist() if r[0] > 0]
        assert len({r[0] for r in rows}) == len(rows)  # distinct (colour, kind) pairs
        for r in rows:
            ys, xs = np.nonzero(data.masks[i].numpy() == int(r[0]))
            assert len(xs) >= 8
            # a mask pixel (covering [x, x+1)) is at least half covered, so it meets the box
            assert xs.min() + 1 > r[1] * S and xs.max() < r[3] * S and ys.min() + 1 > r[2] * S and ys.max() < r[4] * S
            # and the mask fills the box's middle
            cx, cy = int((r[1] + r[3]) / 2 * S), int((r[2] + r[4]) / 2 * S)
            assert data.masks[i, cy, cx] == int(r[0])
        for a in range(len(rows)):
            for b in range(a):
                ra, rb = rows[a], rows[b]
                apart_x = ra[1] >= rb[3] + 1.9 / S or rb[1] >= ra[3] + 1.9 / S
                apart_y = ra[2] >= rb[4] + 1.9 / S or rb[2] >= ra[4] + 1.9 / S
                assert apart_x or apart_y


def test_anti_aliased_edges_and_colours(data):
    img = data.images[0]
    background = torch.tensor(shapes.BACKGROUND) * 2 - 1
    colour = torch.tensor(shapes.COLOURS[data.objects[0][0][0]]) * 2 - 1
    # pixels strictly between the background and the colour exist (smooth edges)
    t = ((img - background[:, None, None]) / (colour - background)[:, None, None]).mean(0)
    edge = (t > 0.1) & (t < 0.9) & (data.masks[0] == shapes.joint_class(*data.objects[0][0]))
    assert edge.sum() > 0
    assert torch.allclose(img[:, 0, 0], background)


def test_held_out_pairs():
    held = set(shapes.HOLDOUT_PAIRS)
    train = shapes.make_shapes(300, 32, seed=11, pairs="train")
    assert all(not (set(o) & held) for o in train.objects)
    hold = shapes.make_shapes(300, 32, seed=11, pairs="holdout")
    assert all(set(o) & held for o in hold.objects)
    positions = {next(k for k, p in enumerate(o) if p in held) for o in hold.objects if len(o) == 3}
    assert positions == {0, 1, 2}  # the held-out pair is not always first
    both = shapes.make_shapes(300, 32, seed=11, pairs="all")
    assert any(set(o) & held for o in both.objects) and any(not (set(o) & held) for o in both.objects)


def test_min_max_shapes_and_subset():
    d = shapes.make_shapes(50, 32, seed=2, min_shapes=2, max_shapes=2)
    assert all(len(o) == 2 for o in d.objects) and d.layout.shape == (50, 2, 5)
    one = shapes.make_shapes(20, 32, seed=2, max_shapes=1)
    assert all(len(o) == 1 and p is not None for o, p in zip(one.objects, one.positions))
    sub = d.subset([3, 1])
    assert sub.captions == [d.captions[3], d.captions[1]] and torch.equal(sub.images[0], d.images[3])
    assert len(d.subset(d.labels == d.labels[0])) == int((d.labels == d.labels[0]).sum())
    assert "50 images" in repr(d) and d.captions[0] in repr(d)


def test_splits_are_cached_and_in_get_dataset():
    assert "shapes" in OFFLINE_IMAGE_SETS
    a = get_dataset("shapes", 32, split="test", n=64)
    assert a is shapes.shapes_dataset(32, "test", 64)
    assert a.images.shape == (64, 3, 32, 32)
    h = shapes.shapes_dataset(32, "holdout", 64)
    assert not torch.equal(a.images, h.images)
    assert not torch.equal(a.images, shapes.shapes_dataset(32, "train", 64).images)
    assert all(set(o) & set(shapes.HOLDOUT_PAIRS) for o in h.objects)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be"), (dict(n=4, image_size=20), "multiple of 8"), (dict(n=4, image_size=8), ">= 16"),
    (dict(n=4, min_shapes=0), "min_shapes"), (dict(n=4, max_shapes=4), "max_shapes"),
    (dict(n=4, min_shapes=3, max_shapes=2), "min_shapes"), (dict(n=4, pairs="test"), "pairs must be"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shapes.make_shapes(**kwargs)


def test_more_errors():
    with pytest.raises(ValueError, match="unknown shapes split"):
        shapes.shapes_dataset(32, "validation")
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.joint_class("orange", "circle")
    with pytest.raises(ValueError, match="unknown relation"):
        shapes.relation_holds("near", (0, 0), (1, 1))
    with pytest.raises(ValueError, match="position"):
        shapes.make_caption([("red", "circle")])
