import socket

import numpy as np

import pytest
import torch

from diffusion_course import data


def test_digits_real_and_scaled():
    train, test = data.digits(16, "train"), data.digits(16, "test")
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == torch.float32
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert train.images.min() == -1 and train.images.max() > 0.9  # background black, strokes bright
    assert set(train.labels.tolist()) == set(range(10))
    native = data.get_dataset("digits")
    assert native.shape == (1, 8, 8)
    # train and test do not overlap
    all_ = data.digits(8, "all").images.reshape(1797, -1)
    tr, te = data.digits(8, "train").images.reshape(-1, 64), data.digits(8, "test").images.reshape(-1, 64)
    assert len(all_) == len(tr) + len(te)


def test_faces_are_the_face_half_of_lfw_subset():
    f = data.get_dataset("faces", image_size=24)
    assert f.images.shape == (80, 1, 24, 24)
    assert data.faces(25, "test").images.shape == (20, 1, 25, 25)
    assert -1 <= f.images.min() < f.images.max() <= 1


def test_photo_patches_train_and_test_are_disjoint_regions():
    tr = data.photo_patches(32, n=16, split="train", seed=0)
    te = data.photo_patches(32, n=16, split="test", seed=0)
    assert tr.images.shape == (16, 3, 32, 32) and te.images.shape == (16, 3, 32, 32)
    assert not torch.equal(tr.images, te.images)
    assert torch.equal(tr.images, data.photo_patches(32, n=16, split="train", seed=0).images)
    with pytest.raises(ValueError, match="too large"):
        data.photo_patches(400, n=1, split="test")


@pytest.mark.parametrize("name", data.TOY_2D)
def test_toy_2d(name):
    x = data.toy_2d(name, 500, seed=1)
    assert x.shape == (500, 2) and x.dtype == torch.float32
    assert 0.2 < x.std().item() < 2.5 and x.abs().max() < 5
    assert torch.equal(x, data.toy_2d(name, 500, seed=1))


def test_random_batches():
    x = torch.arange(10).float()[:, None]
    y = torch.arange(10)
    it = data.random_batches(x, 4, y, generator=torch.Generator().manual_seed(0))
    xb, yb = next(it)
    assert xb.shape == (4, 1) and torch.equal(xb[:, 0].long(), yb) and len(set(yb.tolist())) == 4


def test_photos_for_super_resolution_are_shrunk_crops_from_disjoint_regions():
    tr = data.get_dataset("photos", 16, "train", n=8)
    te = data.photos(16, n=8, split="test")
    assert tr.images.shape == (8, 3, 16, 16) and te.images.shape == (8, 3, 16, 16)
    crops = data.photo_patches(32, n=8, split="train")  # the same draws, at twice the size
    assert torch.allclose(tr.images, data.resize(crops.images, 16)) and torch.equal(tr.labels, crops.labels)
    assert tr.images.min() >= -1 and tr.images.max() <= 1
    assert not torch.allclose(tr.images, te.images)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="digits, faces, photo_patches, photos, shapes, mnist"):
        data.get_dataset("imagenet")
    with pytest.raises(ValueError, match="toy_2d"):
        data.get_dataset("moons")
    with pytest.raises(ValueError, match="valid names"):
        data.toy_2d("spiral")
    with pytest.raises(ValueError, match="split"):
        data.digits(8, "validation")


def test_online_set_without_network_fails_plainly(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_COURSE_DATA", str(tmp_path))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(data.DatasetUnavailable, match="Offline, use one of digits, faces, photo_patches"):
        data.get_dataset("mnist", image_size=16)
    assert data.data_root() == tmp_path


def test_resize_and_range():
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    assert data.resize(x, 16).shape == (1, 1, 16, 16)
    assert data.resize(x, 8) is x
    with pytest.raises(ValueError, match="positive int"):
        data.resize(x, 0)
    assert torch.allclose(data.to_unit_range(torch.tensor([0.0, 8.0, 16.0]), 0, 16), torch.tensor([-1.0, 0.0, 1.0]))


def test_image_folder_crops_and_splits_by_file(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for k in range(5):
        Image.fromarray(rng.integers(0, 256, (40 + k, 50, 3), dtype=np.uint8)).save(tmp_path / f"im{k}.png")
    Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "a_tiny.png")  # too small: skipped
    train = data.get_dataset(f"folder:{tmp_path}", 16, "train", n=12)
    test = data.get_dataset(f"folder:{tmp_path}", 16, "test", n=3)
    assert train.images.shape == (12, 3, 16, 16) and test.images.shape == (3, 3, 16, 16)
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert torch.equal(train.images, data.image_folder(str(tmp_path), 16, n=12).images)  # seeded
    with pytest.raises(ValueError, match="no image folder"):
        data.get_dataset(f"folder:{tmp_path / 'missing'}", 16)
    with pytest.raises(ValueError, match="no image of at least 64x64"):
        data.get_dataset(f"folder:{tmp_path}", 64)
