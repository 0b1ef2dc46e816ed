"""Sample quality without a download: a small digit classifier trained by this package, the Fréchet
distance in its feature space, and the share of samples it recognises with confidence.

Taught in lesson 04_unet, where the U-Net's samples are first judged by a number and not only by eye.

The Fréchet distance between two sets of images is the one of FID (Heusel et al., 2017),

    FD = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2)),

with mu, Sigma the mean and covariance of the features of the real (r) and generated (g) images. FID uses
an Inception network trained on ImageNet; here the features are the penultimate layer of
:class:`DigitClassifier`, trained on the train split of the offline ``digits`` (so numbers are comparable
only with numbers from the same classifier). The distance itself comes from torchmetrics'
``FrechetInceptionDistance`` with the classifier as a custom feature extractor.

FD is biased upwards at small sample sizes: even two halves of the real data are not at 0.
:func:`split_half_floor` measures that floor; always quote FD with its sample counts and reference split.

The trained classifier ships in ``diffusion_course/assets/digit_classifier_32`` (safetensors weights,
``config.json`` and ``COMMAND.txt``, the command that made it and its test accuracy). Make a new one with
``python -m diffusion_course train-classifier --image-size 32 --out DIR``.
"""
from __future__ import annotations

import json
import math
import shlex
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import get_dataset, resize

ASSETS = Path(__file__).resolve().parent / "assets"
NUM_CLASSES = 10


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------

class DigitClassifier(nn.Module):
    """A small CNN for the 10 digit classes: ``(B, 1, S, S)`` images in [-1, 1] -> logits ``(B, 10)``.

    Three stages of conv 3x3 -> BatchNorm -> SiLU -> max-pool 2, a global average pool, then
    ``Linear -> SiLU`` to ``feature_dim`` (the features of :meth:`features`, used for the Fréchet
    distance) and a linear head. ``image_size`` is the side it was trained at; ``input_size`` (by default
    the same) is the side it accepts, resized to ``image_size`` when they differ, which lets the 32x32
    classifier judge 16x16 samples. Lesson: 04_unet.
    """

    def __init__(self, image_size: int = 32, channels: Sequence[int] = (16, 32, 64), feature_dim: int = 64,
                 num_classes: int = NUM_CLASSES, input_size: Optional[int] = None) -> None:
        super().__init__()
        if image_size < 2 ** len(channels):
            raise ValueError(f"image_size {image_size} is too small for {len(channels)} pooling stages; "
                             f"use at least {2 ** len(channels)}")
        self.image_size, self.input_size = int(image_size), int(input_size or image_size)
        self.channels, self.feature_dim, self.num_classes = tuple(int(c) for c in channels), feature_dim, num_classes
        layers, c_in = [], 1
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, feature_dim)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> Dict[str, Any]:
        """The constructor's arguments as a JSON-friendly dict (without ``input_size``). Lesson: 04_unet."""
        return dict(image_size=self.image_size, channels=list(self.channels), feature_dim=self.feature_dim,
                    num_classes=self.num_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Check a batch ``(B, 1, input_size, input_size)`` in [-1, 1]; clamp it to [-1, 1] and resize it to
        ``image_size``. Lesson: 04_unet."""
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 1:
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"the digit classifier expects grey images (B, 1, H, W), got {got}; "
                             "for a single image use x[None], for (B, H, W) use x[:, None]")
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"the digit classifier takes {self.input_size}x{self.input_size} images, got "
                             f"{tuple(x.shape[-2:])}; use load_digit_classifier(image_size={x.shape[-1]}) or "
                             f"data.resize(x, {self.input_size})")
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError("the images contain NaN or inf (did sampling diverge?)")
        if x.numel() and (x.min() < -1.5 or x.max() > 1.5):
            raise ValueError(f"images must be scaled to [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                             "for [0, 255] images use data.to_unit_range(x, 0, 255)")
        x = x.clamp(-1.0, 1.0)  # as the images would be saved or shown
        return resize(x, self.image_size) if self.input_size != self.image_size else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``(B, feature_dim)`` of images ``(B, 1, S, S)``. Lesson: 04_unet."""
        h = self.body(self.prepare(x)).mean(dim=(2, 3))  # global average pool: (B, channels[-1])
        return F.silu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Class probabilities ``(B, 10)`` in eval mode, batch by batch. Lesson: 04_unet."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [F.softmax(self(x[i:i + batch_size].to(dev)), dim=1).cpu() for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)


# ----------------------------------------------------------------------------------------------
# Training, saving, loading
# ----------------------------------------------------------------------------------------------

def random_affine(x: torch.Tensor, generator: torch.Generator, degrees: float = 12.0, scale: float = 0.1,
                  shift: float = 0.1) -> torch.Tensor:
    """Augment images ``(B, 1, S, S)`` in [-1, 1] by a random rotation (+-``degrees``), zoom (1 +- ``scale``)
    and shift (+-``shift`` of the half-width), filling with the background value -1. Lesson: 04_unet."""
    B = x.shape[0]
    u = lambda: torch.rand(B, generator=generator) * 2 - 1  # noqa: E731, uniform in [-1, 1)
    angle, zoom = u() * math.radians(degrees), 1 + u() * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, u() * shift], 1), torch.stack([sin, cos, u() * shift], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding of x + 1 is background -1


def outlier_images(n: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` images ``(n, 1, S, S)`` in [-1, 1] that are no digit: white noise (Gaussian or uniform), smooth
    noise (coarse noise upsampled) and flat grey, a quarter each. Training pushes the classifier's answer on
    them towards the uniform distribution (outlier exposure, Hendrycks et al. 2019), so that it is not
    confident about noise. Lesson: 04_unet."""
    k = -(-n // 4)
    shape = (k, 1, image_size, image_size)
    scale = lambda: 0.3 + 1.2 * torch.rand(k, 1, 1, 1, generator=generator)  # noqa: E731
    white = torch.randn(shape, generator=generator) * scale()
    uniform = (torch.rand(shape, generator=generator) * 2 - 1) * scale()
    coarse = []
    for side in (2, 4, 8, 16):
        coarse.append(resize(torch.randn(k, 1, side, side, generator=generator), image_size) if side < image_size
                      else torch.randn(k, 1, image_size, image_size, generator=generator))
    pick = torch.randint(0, len(coarse), (k,), generator=generator)
    smooth = torch.stack([coarse[j][i] for i, j in enumerate(pick.tolist())]) * scale()
    flat = (torch.rand(k, 1, 1, 1, generator=generator) * 2 - 1).expand(shape)
    flat = flat + 0.05 * torch.randn(shape, generator=generator)
    out = torch.cat([white, uniform, smooth, flat])
    return out[torch.randperm(len(out), generator=generator)[:n]].clamp(-1.0, 1.0)


@torch.no_grad()
def classifier_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` whose most probable class is the label. Lesson: 04_unet."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}")
    return (classifier.predict_proba(images).argmax(1) == labels.cpu()).float().mean().item()


def train_digit_classifier(image_size: int = 32, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3,
                           weight_decay: float = 1e-4, outliers: float = 0.25, seed: int = 0,
                           device: Optional[str] = None, log: Optional[Callable[[str], None]] = print) -> tuple:
    """Train a :class:`DigitClassifier` on the ``digits`` train split (AdamW, one-cycle learning rate,
    :func:`random_affine` augmentation); each batch also carries ``outliers`` x batch_size
    :func:`outlier_images`, whose target is the uniform distribution. Returns ``(classifier in eval mode,
    info)`` where ``info`` holds the settings and the accuracy on the train and test splits. Lesson: 04_unet."""
    from .utils import seed_everything

    gen = seed_everything(seed)
    dev = torch.device(device or "cpu")
    train, test = get_dataset("digits", image_size=image_size, split="train"), \
        get_dataset("digits", image_size=image_size, split="test")
    model = DigitClassifier(image_size).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    n_out = int(round(outliers * batch_size))
    for epoch in range(epochs):
        model.train()
        order, total = torch.randperm(len(train), generator=gen), 0.0
        for i in range(0, len(train), batch_size):
            idx = order[i:i + batch_size]
            x = torch.cat([random_affine(train.images[idx], gen), outlier_images(n_out, image_size, gen)])
            logits = model(x.to(dev))  # one batch, so BatchNorm sees digits and outliers alike
            loss = F.cross_entropy(logits[:len(idx)], train.labels[idx].to(dev))
            if n_out:  # cross-entropy to the uniform distribution over the classes
                loss = loss - 0.5 * F.log_softmax(logits[len(idx):], dim=1).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the classifier's loss became {loss.item()} in epoch {epoch}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log and (epoch % 10 == 9 or epoch == epochs - 1):
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(train):.4f}, "
                f"test accuracy {classifier_accuracy(model, test.images, test.labels):.4f}")
    model.eval()
    info = dict(data="digits", image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, outliers=outliers, seed=seed, device=str(dev), torch=torch.__version__,
                n_train=len(train), n_test=len(test),
                train_accuracy=classifier_accuracy(model, train.images, train.labels),
                test_accuracy=classifier_accuracy(model, test.images, test.labels))
    return model.cpu(), info


def save_digit_classifier(classifier: DigitClassifier, out_dir: Union[str, Path],
                          info: Optional[Dict[str, Any]] = None, command: Optional[str] = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` (the architecture, plus ``info``) and, when ``command``
    is given, ``COMMAND.txt`` into ``out_dir``, each file atomically. Lesson: 04_unet."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    config = {"model": classifier.config(), "training": info or {}}
    atomic_write(out / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    if command is not None:
        lines = [command, ""] + [f"{k}: {v}" for k, v in (info or {}).items()]
        atomic_write(out / "COMMAND.txt", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    return out


def load_digit_classifier(image_size: int = 32, path: Optional[Union[str, Path]] = None,
                          device: Optional[Union[str, torch.device]] = None) -> DigitClassifier:
    """The trained classifier (eval mode, gradients off) for ``image_size`` x ``image_size`` inputs.

    Reads ``path`` (a folder written by :func:`save_digit_classifier`), by default the shipped
    ``assets/digit_classifier_{image_size}``, falling back to ``digit_classifier_32`` with inputs resized
    to 32. Weights come from safetensors (no pickle). Lesson: 04_unet.
    """
    from safetensors.torch import load_file

    if path is None:
        path = ASSETS / f"digit_classifier_{image_size}"
        if not path.is_dir():
            path = ASSETS / "digit_classifier_32"
    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"no classifier in {path} (model.safetensors + config.json); train one with "
                                f"`python -m diffusion_course train-classifier --image-size 32 --out {path}`")
    config = json.loads((path / "config.json").read_text())["model"]
    model = DigitClassifier(**config, input_size=image_size)
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    except RuntimeError as e:
        raise ValueError(f"the weights in {path} do not fit the configuration in its config.json "
                         f"({config}); the checkpoint comes from a different configuration") from e
    model.requires_grad_(False)
    return model.to(device or "cpu").eval()


# ----------------------------------------------------------------------------------------------
# Fréchet distance and sample quality
# ----------------------------------------------------------------------------------------------

class ClassifierFeatures(nn.Module):
    """The feature extractor handed to torchmetrics: images ``(B, 1, S, S)`` -> the classifier's
    penultimate features ``(B, feature_dim)`` in float64, always in eval mode and without gradients.
    Lesson: 04_unet."""

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.feature_dim  # torchmetrics reads this instead of probing

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        """Stay in eval mode whatever is asked (BatchNorm must use its running statistics). Lesson: 04_unet."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).double()


def _check_sets(a: torch.Tensor, b: torch.Tensor, names: Sequence[str] = ("generated", "reference")) -> None:
    for name, x in zip(names, (a, b)):
        if not torch.is_tensor(x) or x.ndim < 2:
            raise ValueError(f"the {name} set must be a tensor (N, ...) of N samples, got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if x.shape[0] < 2:
            raise ValueError(f"the Fréchet distance needs at least 2 samples per set (a covariance); the {name} "
                             f"set has {x.shape[0]}. Use hundreds for a stable number")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"the {names[0]} samples have shape {tuple(a.shape[1:])} but the {names[1]} samples "
                         f"have {tuple(b.shape[1:])}; resize one set (data.resize)")


def frechet_distance(generated: torch.Tensor, reference: torch.Tensor, extractor: nn.Module,
                     batch_size: int = 512) -> float:
    """The Fréchet distance between ``generated`` and ``reference`` (tensors ``(N, ...)``, N >= 2 each) in the
    feature space of ``extractor``, a module mapping a batch to ``(B, d)`` with an int attribute
    ``num_features`` = d (e.g. :class:`ClassifierFeatures`), computed by torchmetrics'
    ``FrechetInceptionDistance``. Lesson: 04_unet."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_sets(generated, reference)
    d = getattr(extractor, "num_features", None)
    if not isinstance(d, int):
        raise TypeError("the extractor needs an int attribute num_features (its feature dimension)")
    if min(len(generated), len(reference)) <= d:
        warnings.warn(f"fewer samples ({len(generated)} generated, {len(reference)} reference) than feature "
                      f"dimensions + 1 ({d + 1}): a covariance is singular and FD is strongly biased", stacklevel=2)
    dev = next(extractor.parameters(), torch.empty(0)).device
    # normalize stays False: images reach the extractor untouched (torchmetrics 1.3 turned them into bytes)
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=True).to(dev)
    for x, real in ((reference, True), (generated, False)):
        for i in range(0, len(x), batch_size):
            metric.update(x[i:i + batch_size].to(dev), real=real)
    return float(metric.compute())


def frechet_terms(generated: torch.Tensor, reference: torch.Tensor, extractor: nn.Module,
                  batch_size: int = 512) -> Dict[str, float]:
    """The Fréchet distance split into its two parts, in float64 from the features of ``extractor`` (as
    :func:`frechet_distance`)::

        FD = |mu_g - mu_r|^2 + tr(C_g + C_r - 2 (C_g C_r)^(1/2)),

    returned as ``mean_term`` (where the feature averages differ: a systematic shift of every sample), ``cov_term``
    (how the spreads differ) and their sum ``fd``. tr((C_g C_r)^(1/2)) is computed as the sum of the square roots of
    the eigenvalues of C_r^(1/2) C_g C_r^(1/2), which are those of C_g C_r. Lesson: 04_unet."""
    _check_sets(generated, reference)
    dev = next(extractor.parameters(), torch.empty(0)).device

    def stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = torch.cat([extractor(x[i:i + batch_size].to(dev)).double().cpu() for i in range(0, len(x), batch_size)])
        return f.mean(0), torch.cov(f.T)

    (mu_g, c_g), (mu_r, c_r) = stats(generated), stats(reference)
    w, v = torch.linalg.eigh(c_r)
    root_r = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_r @ c_g @ root_r).clamp(min=0).sqrt().sum()
    mean_term = (mu_g - mu_r).pow(2).sum().item()
    cov_term = (c_g.trace() + c_r.trace() - 2 * cross).item()
    return dict(fd=mean_term + cov_term, mean_term=mean_term, cov_term=cov_term)


def sample_quality(images: torch.Tensor, reference_images: torch.Tensor, classifier: DigitClassifier,
                   reference_name: str = "reference", threshold: float = 0.9) -> Dict[str, Any]:
    """Judge generated digits ``(N, 1, S, S)`` in [-1, 1] against real ones ``(M, 1, S, S)``.

    Returns ``fd`` (Fréchet distance in the classifier's feature space), ``confident_share`` (share of
    samples given some class with probability >= ``threshold``), ``class_histogram`` (how many samples fall
    in each predicted class, 0..9) and ``reference_class_histogram``, ``n_samples``, ``n_reference``,
    ``reference`` (``reference_name``, e.g. "digits test split") and ``threshold``. Print it with
    :func:`format_quality`. Lesson: 04_unet.
    """
    _check_sets(images, reference_images)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    fd = frechet_distance(images, reference_images, ClassifierFeatures(classifier))
    probs, ref_probs = classifier.predict_proba(images), classifier.predict_proba(reference_images)
    hist = lambda p: torch.bincount(p.argmax(1), minlength=classifier.num_classes).tolist()  # noqa: E731
    return dict(fd=fd, confident_share=(probs.max(1).values >= threshold).float().mean().item(),
                class_histogram=hist(probs), reference_class_histogram=hist(ref_probs),
                n_samples=len(images), n_reference=len(reference_images), reference=reference_name,
                threshold=threshold)


def split_half_floor(reference_images: torch.Tensor, classifier: DigitClassifier, seed: int = 0,
                     repeats: int = 5) -> Dict[str, Any]:
    """The data's own Fréchet distance between two random halves of ``reference_images`` (mean and std
    over ``repeats`` random splits): the floor that a perfect generator would reach with ``n_half``
    samples against ``n_half`` reference images. Lesson: 04_unet."""
    n = len(reference_images) // 2
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if n < 2:
        raise ValueError(f"need at least 4 reference images for two halves, got {len(reference_images)}")
    gen = torch.Generator().manual_seed(seed)
    extractor = ClassifierFeatures(classifier)
    fds = []
    for _ in range(repeats):
        order = torch.randperm(len(reference_images), generator=gen)
        fds.append(frechet_distance(reference_images[order[:n]], reference_images[order[n:2 * n]], extractor))
    t = torch.tensor(fds, dtype=torch.float64)
    return dict(fd=t.mean().item(), fd_std=t.std().item() if repeats > 1 else 0.0, n_half=n, repeats=repeats,
                n_reference=len(reference_images))


def real_data_floor(real_images: torch.Tensor, reference_images: torch.Tensor, classifier: DigitClassifier,
                    n: int, repeats: int = 3, seed: int = 0, threshold: float = 0.9) -> Dict[str, Any]:
    """What a perfect generator would score: :func:`sample_quality` of ``n`` *real* images (random subsets of
    ``real_images``, e.g. the training split, one per repeat) against ``reference_images`` (e.g. the test
    split), with the same sample counts as a generated set of ``n``. Returns ``fd``, ``fd_std``,
    ``confident_share``, ``n_samples``, ``n_reference`` and ``repeats``. Lesson: 04_unet."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if not 2 <= n <= len(real_images):
        raise ValueError(f"n must lie in [2, {len(real_images)}] (the real images available), got {n}")
    gen = torch.Generator().manual_seed(seed)
    runs = [sample_quality(real_images[torch.randperm(len(real_images), generator=gen)[:n]], reference_images,
                           classifier, threshold=threshold) for _ in range(repeats)]
    fds = torch.tensor([r["fd"] for r in runs], dtype=torch.float64)
    return dict(fd=fds.mean().item(), fd_std=fds.std().item() if repeats > 1 else 0.0,
                confident_share=sum(r["confident_share"] for r in runs) / repeats, n_samples=n,
                n_reference=len(reference_images), repeats=repeats)


def format_quality(result: Dict[str, Any]) -> str:
    """One line for a :func:`sample_quality` result, with its sample counts and reference. Lesson: 04_unet."""
    return (f"FD {result['fd']:.3f} ({result['n_samples']} samples vs {result['n_reference']} images of "
            f"{result['reference']}); confident (p >= {result['threshold']}): {result['confident_share']:.1%}; "
            f"classes {result['class_histogram']}")


# ----------------------------------------------------------------------------------------------
# Command line: python -m diffusion_course train-classifier
# ----------------------------------------------------------------------------------------------

def _train_cli(args) -> int:
    model, info = train_digit_classifier(args.image_size, args.epochs, args.batch_size, args.lr,
                                         args.weight_decay, args.outliers, args.seed, args.device)
    test = get_dataset("digits", image_size=args.image_size, split="test")
    train = get_dataset("digits", image_size=args.image_size, split="train")
    q = sample_quality(test.images, train.images, model, reference_name="digits train split")
    floor = split_half_floor(test.images, model)
    info.update(fd_test_vs_train=round(q["fd"], 4), confident_share_test=round(q["confident_share"], 4),
                split_half_floor_test=round(floor["fd"], 4), split_half_n=floor["n_half"])
    command = ("python -m diffusion_course train-classifier " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(getattr(args, k)))}"
        for k in ("image_size", "epochs", "batch_size", "lr", "weight_decay", "outliers", "seed", "device", "out")
        if getattr(args, k) is not None))
    n_right = round(info["test_accuracy"] * info["n_test"])
    command += (f"\n# every option spelled out; test accuracy {info['test_accuracy']:.4f} "
                f"({n_right}/{info['n_test']} digits of the test split)")
    out = save_digit_classifier(model, args.out, info, command)
    print(f"test accuracy {info['test_accuracy']:.4f} on the {info['n_test']} test digits "
          f"(train {info['train_accuracy']:.4f}); {format_quality(q)}")
    print(f"split-half floor of the test split: FD {floor['fd']:.3f} +- {floor['fd_std']:.3f} "
          f"({floor['n_half']} vs {floor['n_half']}); saved to {out}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``train-classifier`` to the command line. Lesson: 04_unet."""
    p = subparsers.add_parser("train-classifier", help="train the digit classifier behind the sample-quality FD")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--outliers", type=float, default=0.25, help="noise images per digit image in a batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cpu (repeatable)")
    p.add_argument("--out", required=True, help="output folder, e.g. diffusion_course/assets/digit_classifier_32")
    p.set_defaults(func=_train_cli)
