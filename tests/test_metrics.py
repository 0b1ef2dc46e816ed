"""The sample-quality measure: the shipped digit classifier, the Fréchet distance through torchmetrics
(checked against the formula computed with numpy/scipy), the confident share and the split-half floor."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from diffusion_course import metrics
from diffusion_course.data import get_dataset

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_digit_classifier(32)


@pytest.fixture(scope="module")
def test_set():
    return get_dataset("digits", image_size=32, split="test")


def noise(n, size=32, seed=0):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


class Identity(nn.Module):
    """A feature extractor that hands its (N, d) input on: the FD of random Gaussian 'features'."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.double()


def frechet_numpy(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), written out independently of torchmetrics."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b)
    root = root[0] if isinstance(root, tuple) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root).real)


def test_shipped_classifier_loads_from_safetensors_and_is_accurate(classifier, test_set):
    folder = metrics.ASSETS / "digit_classifier_32"
    assert (folder / "model.safetensors").stat().st_size < 1_000_000
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["image_size"] == 32 and config["training"]["test_accuracy"] >= 0.95
    assert "train-classifier --image-size 32" in (folder / "COMMAND.txt").read_text()
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    acc = metrics.classifier_accuracy(classifier, test_set.images, test_set.labels)
    print(f"test accuracy {acc:.4f} on {len(test_set)} test digits")
    assert acc >= 0.95
    assert acc == pytest.approx(config["training"]["test_accuracy"], abs=1e-6)  # the recorded number


def test_the_32_classifier_judges_16x16_digits_through_a_resize(test_set):
    small = get_dataset("digits", image_size=16, split="test")
    clf16 = metrics.load_digit_classifier(16)
    assert clf16.input_size == 16 and clf16.image_size == 32
    assert metrics.classifier_accuracy(clf16, small.images, small.labels) >= 0.95
    assert clf16.features(small.images[:4]).shape == (4, clf16.feature_dim)


def test_fd_of_a_set_with_itself_is_zero(classifier, test_set):
    fd = metrics.frechet_distance(test_set.images, test_set.images, metrics.ClassifierFeatures(classifier))
    scale = metrics.ClassifierFeatures(classifier)(test_set.images).var(0).sum().item()
    assert abs(fd) < 1e-6 * scale + 1e-6, (fd, scale)


def test_fd_grows_with_the_noise_level(classifier, test_set):
    x = test_set.images
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    extractor = metrics.ClassifierFeatures(classifier)
    fds = [metrics.frechet_distance((x[:180] + s * eps[:180]).clamp(-1, 1), x[180:], extractor)
           for s in (0.0, 0.2, 0.5, 1.0)]
    print("FD of the first 180 test digits, noised by 0, 0.2, 0.5, 1, against the other 179:",
          [round(f, 3) for f in fds])
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


@pytest.mark.parametrize("d,n,m", [(5, 400, 300), (16, 100, 250)])
def test_fd_matches_the_formula_computed_with_numpy_and_scipy(d, n, m):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.5
    b = rng.standard_normal((m, d)) * rng.uniform(0.5, 2.0, d)
    ours = metrics.frechet_distance(torch.from_numpy(b), torch.from_numpy(a), Identity(d))
    assert ours == pytest.approx(frechet_numpy(a, b), rel=1e-6, abs=1e-8)


def test_confident_share_is_high_on_real_digits_and_low_on_noise(classifier, test_set):
    train = get_dataset("digits", image_size=32, split="train")
    real = metrics.sample_quality(test_set.images, train.images, classifier, reference_name="digits train split")
    print(metrics.format_quality(real))
    assert real["confident_share"] > 0.8
    assert (real["n_samples"], real["n_reference"], real["reference"]) == (359, len(train), "digits train split")
    assert sum(real["class_histogram"]) == 359 and sum(real["reference_class_histogram"]) == len(train)
    assert min(real["class_histogram"]) > 20  # every class present, as in the data
    fake = metrics.sample_quality(noise(300), test_set.images, classifier, reference_name="digits test split")
    print(metrics.format_quality(fake))
    assert fake["confident_share"] < 0.1
    assert fake["fd"] > 10 * real["fd"]


def test_split_half_floor_is_small_but_positive(classifier, test_set):
    floor = metrics.split_half_floor(test_set.images, classifier, repeats=3)
    noisy = metrics.sample_quality(noise(len(test_set)), test_set.images, classifier)["fd"]
    print(f"split-half floor {floor['fd']:.3f} +- {floor['fd_std']:.3f} ({floor['n_half']} vs {floor['n_half']})")
    assert floor["n_half"] == len(test_set) // 2 and floor["repeats"] == 3
    assert 0 < floor["fd"] < 0.05 * noisy


def test_real_data_floor_uses_equal_sample_counts_and_sits_far_below_noise(classifier, test_set):
    train = get_dataset("digits", image_size=32, split="train").images
    floor = metrics.real_data_floor(train, test_set.images, classifier, n=200, repeats=3)
    noisy = metrics.sample_quality(noise(200), test_set.images, classifier)
    print(f"floor with 200 real training digits: FD {floor['fd']:.3f} +- {floor['fd_std']:.3f}")
    assert (floor["n_samples"], floor["n_reference"], floor["repeats"]) == (200, len(test_set), 3)
    assert 0 < floor["fd"] < 0.05 * noisy["fd"] and floor["fd_std"] > 0
    assert floor["confident_share"] > 0.8 > noisy["confident_share"]
    again = metrics.real_data_floor(train, test_set.images, classifier, n=200, repeats=3)
    assert again["fd"] == floor["fd"]                        # seeded subsets
    with pytest.raises(ValueError, match="n must lie"):
        metrics.real_data_floor(train, test_set.images, classifier, n=len(train) + 1)
    with pytest.raises(ValueError, match="repeats"):
        metrics.real_data_floor(train, test_set.images, classifier, n=10, repeats=0)


def test_clear_errors_for_bad_input(classifier, test_set):
    x = test_set.images
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.sample_quality(x[:1], x, classifier)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(x, x[:1], metrics.ClassifierFeatures(classifier))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        metrics.sample_quality(x[:, 0], x[:, 0], classifier)
    with pytest.raises(ValueError, match="32x32"):
        metrics.sample_quality(x[:, :, :28, :28], x[:, :, :28, :28], classifier)
    with pytest.raises(ValueError, match="resize"):
        metrics.sample_quality(x[:, :, :28, :28], x, classifier)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        classifier.features((x + 1) * 127.5)
    with pytest.raises(ValueError, match="NaN"):
        classifier.features(torch.full((2, 1, 32, 32), float("nan")))
    with pytest.raises(TypeError, match="num_features"):
        metrics.frechet_distance(x, x, nn.Identity())
    with pytest.raises(ValueError, match="4 reference images"):
        metrics.split_half_floor(x[:3], classifier)


def test_save_and_load_round_trip_and_a_mismatched_checkpoint(tmp_path, test_set):
    torch.manual_seed(0)
    clf = metrics.DigitClassifier(16, channels=(8, 8, 8), feature_dim=12).eval()
    metrics.save_digit_classifier(clf, tmp_path / "c", {"note": "untrained"}, command="python -m x")
    back = metrics.load_digit_classifier(16, path=tmp_path / "c")
    x = get_dataset("digits", image_size=16, split="test").images[:8]
    assert torch.equal(back(x), clf(x))
    assert (tmp_path / "c" / "COMMAND.txt").read_text().startswith("python -m x")
    assert not list((tmp_path / "c").glob("*.tmp"))
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["model"]["feature_dim"] = 13
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different configuration"):
        metrics.load_digit_classifier(16, path=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        metrics.load_digit_classifier(16, path=tmp_path / "missing")


def test_augmentation_and_outliers_keep_shape_and_range():
    g = torch.Generator().manual_seed(0)
    x = get_dataset("digits", image_size=16, split="train").images[:32]
    y = metrics.random_affine(x, g)
    assert y.shape == x.shape and y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5
    assert torch.allclose(metrics.random_affine(-torch.ones(4, 1, 16, 16), g), -torch.ones(4, 1, 16, 16))
    out = metrics.outlier_images(10, 16, g)
    assert out.shape == (10, 1, 16, 16) and out.min() >= -1 and out.max() <= 1


def test_one_epoch_of_training_learns_something_and_the_command_is_registered():
    model, info = metrics.train_digit_classifier(image_size=8, epochs=1, log=None)  # the native 8x8: fast
    print(info)
    assert info["test_accuracy"] > 0.5 and info["n_test"] == 359 and not model.training
    from diffusion_course.__main__ import make_parser

    args = make_parser().parse_args(["train-classifier", "--image-size", "16", "--out", "x"])
    assert args.func is metrics._train_cli and args.image_size == 16


def test_frechet_terms_split_the_fd_into_a_shift_and_a_spread():
    rng = np.random.default_rng(7)
    d = 6
    a = rng.standard_normal((400, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((300, d)) * rng.uniform(0.5, 2.0, d)
    terms = metrics.frechet_terms(torch.from_numpy(b), torch.from_numpy(a), Identity(d))
    assert terms["fd"] == pytest.approx(frechet_numpy(a, b), rel=1e-6)        # the same FD, by another route
    assert terms["mean_term"] == pytest.approx(float(((a.mean(0) - b.mean(0)) ** 2).sum()), rel=1e-10)
    assert terms["cov_term"] > 0
    shifted = metrics.frechet_terms(torch.from_numpy(a + 3.0), torch.from_numpy(a), Identity(d))
    assert shifted["mean_term"] == pytest.approx(9.0 * d) and abs(shifted["cov_term"]) < 1e-6  # a pure shift
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_terms(torch.from_numpy(a[:1]), torch.from_numpy(a), Identity(d))
