"""The shapes segmenter that scores images against their captions: the shipped one reads real shapes,
the parser recovers objects from a mask, wrong captions are rejected, training lowers the loss, and
loading fails clearly."""
import json
import math

import pytest
import torch

from diffusion_course import classifier as C
from diffusion_course import shapes

torch.set_num_threads(min(2, torch.get_num_threads()))


class Oracle:
    """A stand-in segmenter that 'predicts' the true masks, to test the scoring logic on its own."""

    def __init__(self, data):
        self.masks = {id(data.images): data.masks}

    def predict(self, images, batch_size=256):
        return self.masks[id(images)]


@pytest.fixture(scope="module")
def segmenter():
    return C.load_shape_classifier()


@pytest.fixture(scope="module")
def test_data():
    return shapes.shapes_dataset(32, "test").subset(slice(0, 300))


def swapped(relation):
    return {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[relation]


def test_shipped_classifier_reads_real_shapes(segmenter, test_data):
    folder = C.ASSETS / C.DEFAULT_ASSET
    assert (folder / "model.safetensors").stat().st_size < 400_000
    saved = json.loads((folder / "config.json").read_text())
    assert saved["shape_segmenter"]["image_size"] == 32 and saved["training"]["test_adherence"] >= 0.98
    assert "train-shape-classifier --image-size 32" in (folder / "COMMAND.txt").read_text()
    assert not segmenter.training and not any(p.requires_grad for p in segmenter.parameters())
    result = C.adherence_of(segmenter, None, test_data)
    print({k: result[k] for k in ("adherence", "objects_right", "relation_right", "position_right")})
    assert result["adherence"] >= 0.95 and result["n"] == 300
    assert result["all_correct"].shape == (300,) and result["all_correct"].dtype == torch.bool
    acc = C.pixel_accuracy(segmenter, test_data)
    assert acc["pixel_accuracy"] >= 0.97 and acc["foreground_accuracy"] >= 0.9


def test_shipped_classifier_knows_the_held_out_pairs(segmenter):
    hold = shapes.shapes_dataset(32, "holdout").subset(slice(0, 200))
    assert C.adherence_of(segmenter, None, hold)["adherence"] >= 0.95


def test_parse_objects_recovers_the_objects_of_a_true_mask(test_data):
    for i in range(60):
        found = C.parse_objects(test_data.masks[i])
        assert sorted((o["colour"], o["kind"]) for o in found) == sorted(test_data.objects[i])
        for row in test_data.layout[i].tolist():
            if row[0] == 0:
                continue
            o = next(o for o in found if o["joint"] == int(row[0]))
            assert abs(o["centre"][0] - (row[1] + row[3]) / 2) < 1.5 / 32
            assert abs(o["centre"][1] - (row[2] + row[4]) / 2) < 1.5 / 32
            assert o["pixels"] == int((test_data.masks[i] == int(row[0])).sum())


def test_parse_objects_drops_specks_and_splits_regions():
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[2:10, 2:10] = 5
    mask[28:30, 4:6] = 7            # 4 pixels: below min_pixels (8)
    mask[12:20, 20:28] = 9
    found = C.parse_objects(mask)
    assert [o["joint"] for o in found] == [5, 9] and found[0]["centre"] == (6 / 32, 6 / 32)
    assert len(C.parse_objects(mask, min_pixels=3)) == 3
    labels = C.connected_components(mask[None] > 0)[0]
    assert len(labels.unique()) == 4  # background and three regions


def test_caption_adherence_logic_with_true_masks(test_data):
    oracle = Oracle(test_data)
    right = C.adherence_of(oracle, None, test_data)
    assert right["adherence"] == 1.0 and right["relation_right"] == 1.0 and right["position_right"] == 1.0
    rel = [swapped(r) if r else None for r in test_data.relations]
    wrong = C.caption_adherence(oracle, test_data.images, test_data.objects, rel, test_data.positions)
    assert wrong["relation_right"] == 0.0 and wrong["objects_right"] == 1.0
    assert wrong["all_correct"].tolist() == [r is None for r in test_data.relations]
    pos = [shapes.POSITIONS[(shapes.POSITIONS.index(p) + 4) % 9] if p else None for p in test_data.positions]
    wrong = C.caption_adherence(oracle, test_data.images, test_data.objects, test_data.relations, pos)
    assert wrong["position_right"] == 0.0 and wrong["relation_right"] == 1.0


def recoloured(objects):
    """Each caption with its first object's colour changed to one that is not in the image."""
    out = []
    for objs in objects:
        used = {c for c, _ in objs}
        new = next(c for c in shapes.COLOURS if c not in used)
        out.append([(new, objs[0][1])] + list(objs[1:]))
    return out


def test_shipped_classifier_rejects_wrong_captions(segmenter, test_data):
    data = test_data.subset(slice(0, 150))
    rel = [swapped(r) if r else None for r in data.relations]
    wrong = C.caption_adherence(segmenter, data.images, data.objects, rel, data.positions)
    assert wrong["relation_right"] == 0.0
    wrong = C.caption_adherence(segmenter, data.images, recoloured(data.objects), data.relations, data.positions)
    assert wrong["objects_right"] == 0.0 and wrong["adherence"] == 0.0
    blank = torch.full_like(data.images, -0.84)  # the background alone: nothing is found
    assert C.adherence_of(segmenter, blank, data)["objects_right"] == 0.0


def test_tiny_training_lowers_the_loss_and_round_trips(tmp_path):
    model, info = C.train_shape_classifier(32, steps=24, batch_size=16, seed=1, progress=False)
    assert info["loss_last"] < 0.8 * info["loss_first"]
    assert not model.training
    C.save_shape_classifier(model, tmp_path / "seg", command="python -m diffusion_course test", metrics=info)
    loaded = C.load_shape_classifier(tmp_path / "seg")
    x = shapes.make_shapes(8, 32, seed=4).images
    with torch.no_grad():
        model.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                               for k, v in model.state_dict().items()})
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert "python -m diffusion_course test" in (tmp_path / "seg" / "COMMAND.txt").read_text()


def test_segmenter_shapes_and_input_errors():
    model = C.ShapeSegmenter(C.SegmenterConfig(channels=(8, 8, 8)))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, shapes.NUM_CLASSES, 32, 32)
    assert model.predict(torch.zeros(3, 3, 16, 16)).shape == (3, 32, 32)  # resized to its own size
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(torch.full((1, 3, 32, 32), 200.0))
    with pytest.raises(ValueError, match="divisible"):
        C.SegmenterConfig(channels=(6, 8, 8))
    with pytest.raises(ValueError, match="one caption"):
        C.caption_adherence(model, torch.zeros(2, 3, 32, 32), [[("red", "circle")]], [None], ["top"])


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-shape-classifier"):
        C.load_shape_classifier(tmp_path / "nothing")
    small = C.ShapeSegmenter(C.SegmenterConfig(channels=(8, 8, 8)))
    folder = C.save_shape_classifier(small, tmp_path / "small")
    saved = json.loads((folder / "config.json").read_text())
    saved["shape_segmenter"]["channels"] = [16, 32, 48]
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="different configuration"):
        C.load_shape_classifier(folder)
    (folder / "config.json").write_text(json.dumps({"unet": {}}))
    with pytest.raises(ValueError, match="another kind"):
        C.load_shape_classifier(folder)


def test_object_error_names_what_is_wrong_with_the_shapes_found():
    def found(*pairs):
        return [{"colour": c, "kind": k, "centre": (0.5, 0.5), "pixels": 50} for c, k in pairs]

    want = [("red", "circle"), ("blue", "square")]
    cases = {
        "right": found(("blue", "square"), ("red", "circle")),           # order does not matter
        "count": found(("red", "circle")),
        "binding": found(("red", "square"), ("blue", "circle")),         # colours and kinds right, paired wrongly
        "colour": found(("red", "circle"), ("green", "square")),
        "kind": found(("red", "circle"), ("blue", "triangle")),
        "colour and kind": found(("red", "circle"), ("green", "triangle")),
    }
    assert set(cases) == set(C.OBJECT_ERRORS)
    for expected, f in cases.items():
        assert C.object_error(f, want) == expected, expected
    assert C.object_error(found(("red", "circle"), ("red", "circle"), ("blue", "square")), want) == "count"
    # a repeated pair in the caption is a multiset: one red circle too few is not "right"
    assert C.object_error(found(("red", "circle"), ("blue", "square")), want + [("red", "circle")]) == "count"


def test_opposite_relations_pair_up_and_unknown_ones_are_refused():
    for r in shapes.RELATIONS:
        assert shapes.opposite_relation(shapes.opposite_relation(r)) == r != shapes.opposite_relation(r)
    assert shapes.opposite_relation(None) is None
    with pytest.raises(ValueError, match="unknown relation"):
        shapes.opposite_relation("beside")


def test_shape_diagnosis_on_true_masks_and_on_wrong_captions(test_data):
    oracle = Oracle(test_data)
    right = C.shape_diagnosis(oracle, test_data.images, test_data)
    assert right["errors"]["right"] == 1.0 and sum(right["errors"].values()) == pytest.approx(1.0)
    with_relation = sum(r is not None for r in test_data.relations)
    assert right["n_relation_if_right"] == with_relation > 0
    assert right["relation_if_right"] == 1.0 and right["opposite_if_right"] == 0.0
    # the same images judged against captions whose first colour is changed: no shapes right, nothing judged
    recol = shapes.ShapesData(**{**vars(test_data), "objects": recoloured(test_data.objects)})
    wrong = C.shape_diagnosis(oracle, test_data.images, recol)
    assert wrong["errors"]["right"] == 0.0 and wrong["errors"]["colour"] == 1.0
    assert wrong["n_relation_if_right"] == 0 and math.isnan(wrong["relation_if_right"])
