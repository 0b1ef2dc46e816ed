"""Numbers a reader can check against the papers: the schedules' abar_t and beta_tilde_t at a few steps, and
the size of the DDPM CIFAR-10 U-Net.

Every schedule value is compared twice: with an independent float64 NumPy computation written here from the
papers' definitions (not by calling the package), and with a rounded literal a reader can verify by hand
(the hand reasoning is in each test's docstring). Array index i holds the lecture's step t = i + 1
(see ``diffusion_course.schedules``).
"""
import math

import numpy as np
import pytest
import torch

from diffusion_course.ddpm import GaussianDiffusion
from diffusion_course.nn import UNet, UNetConfig
from diffusion_course.schedules import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py

T = 1000


# ----------------------------------------------------------------------------------------------
# Independent NumPy references (float64), straight from the papers
# ----------------------------------------------------------------------------------------------

def numpy_linear_betas() -> np.ndarray:
    """Ho et al. 2020, section 4: beta_1 = 1e-4 rising linearly to beta_T = 0.02, T = 1000."""
    return np.linspace(1e-4, 0.02, T)


def numpy_alpha_bar(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s), as a sum of logs (log1p keeps the small betas exact)."""
    return np.exp(np.cumsum(np.log1p(-betas)))


def numpy_one_minus_alpha_bar(betas: np.ndarray) -> np.ndarray:
    """1 - abar_t without cancellation: -expm1(sum of log(1 - beta_s)). Near t = 1, where abar_t is
    1 - 1e-4, the naive 1 - abar_t keeps only about 12 of float64's 16 digits."""
    return -np.expm1(np.cumsum(np.log1p(-betas)))


def numpy_beta_tilde(betas: np.ndarray) -> np.ndarray:
    """Ho et al. 2020, eq. (7): beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t for t > 1; beta_tilde_1 = 0
    (abar_0 = 1)."""
    one_minus = numpy_one_minus_alpha_bar(betas)
    out = np.zeros_like(betas)
    out[1:] = betas[1:] * one_minus[:-1] / one_minus[1:]
    return out


def numpy_cosine_betas(s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. (17): abar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2);
    beta_t = 1 - abar(t) / abar(t - 1), clipped at 0.999 "to prevent singularities at the end"."""
    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2

    t = np.arange(1, T + 1, dtype=np.float64)
    return np.minimum(1 - f(t) / f(t - 1), max_beta)


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def linear():
    return GaussianDiffusion("linear", T)


def test_numpy_reference_itself_matches_the_hand_formulas():
    """The reference is checked too, so that a slip in it cannot hide a slip in the package.
    At t = 2: beta_tilde_2 = beta_2 (1 - abar_1) / (1 - abar_2) = beta_2 beta_1 / (beta_1 + beta_2 - beta_1 beta_2),
    with beta_2 = 1e-4 + 0.0199 / 999."""
    b1, b2 = 1e-4, 1e-4 + 0.0199 / 999
    assert numpy_beta_tilde(numpy_linear_betas())[1] == pytest.approx(b2 * b1 / (b1 + b2 - b1 * b2), rel=1e-14)
    # the clip acts on the last step only; before it, abar_t is f(t) / f(0) itself
    betas = numpy_cosine_betas()
    assert betas[-1] == 0.999 and (betas[:-1] < 0.999).all()
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert numpy_alpha_bar(betas)[499] == pytest.approx(f(500) / f(0), rel=1e-13)


def test_linear_alpha_bar_at_t_500_and_t_1000(linear):
    """abar_500 (index 499) and abar_1000 (index 999) of DDPM's linear schedule.

    By hand: log abar_t = sum log(1 - beta_s) ~ -sum beta_s - sum beta_s^2 / 2. For t = T the betas average
    0.01005, so sum beta = 10.05, and sum beta^2 / 2 ~ 1000 (0.02^2 / 3) / 2 = 0.067: abar_T ~ exp(-10.117)
    ~ 4.04e-5. For t = 500, sum beta = 0.05 + 0.0199 (499 * 500 / 2) / 999 = 2.535 and sum beta^2 / 2 ~ 0.008:
    abar_500 ~ exp(-2.543) ~ 0.0786. (The dropped cubic term, sum beta^3 / 3, is under 1e-3.)
    """
    reference = numpy_alpha_bar(numpy_linear_betas())
    assert linear.alpha_bar.dtype == torch.float64
    for i in (499, 999):
        assert float(linear.alpha_bar[i]) == pytest.approx(reference[i], rel=1e-12), f"index {i}"
    assert float(linear.alpha_bar[499]) == pytest.approx(0.0786, rel=1e-3)
    assert float(linear.alpha_bar[999]) == pytest.approx(4.04e-5, rel=2e-3)
    # the same numbers through the Schedule class, which the lessons use
    assert torch.equal(Schedule.from_name("linear", T).alpha_bar, linear.alpha_bar)


def test_linear_posterior_variance_beta_tilde(linear):
    """beta_tilde_t at t = 2, 488 and 1000 (indices 1, 487, 999).

    By hand: beta_tilde_2 ~ beta_1 beta_2 / (beta_1 + beta_2) = 1e-4 * 1.1992e-4 / 2.1992e-4 ~ 5.453e-5 (the
    harmonic mean halved: the posterior knows x_0 and x_2). Late in the chain abar_t is tiny, so
    (1 - abar_{t-1}) / (1 - abar_t) ~ 1 and beta_tilde_t ~ beta_t: beta_488 = 1e-4 + 487 * 0.0199 / 999 =
    0.009801, beta_tilde_488 a hair below it (0.009792), and beta_tilde_1000 ~ beta_1000 = 0.02 to 1e-6.
    Index 0 (t = 1) is exactly 0: q(x_0 | x_1, x_0) is a point mass.
    """
    reference = numpy_beta_tilde(numpy_linear_betas())
    assert float(linear.beta_tilde[0]) == 0.0
    for i in (1, 487, 999):
        # rel 1e-10, not 1e-12: at t = 2 the package forms 1 - abar_t by subtraction (see the reference)
        assert float(linear.beta_tilde[i]) == pytest.approx(reference[i], rel=1e-10), f"index {i}"
    assert float(linear.beta_tilde[1]) == pytest.approx(5.453e-5, rel=1e-3)
    assert float(linear.beta_tilde[487]) == pytest.approx(0.009792, rel=1e-3)
    assert float(linear.beta_tilde[487]) < float(linear.betas[487]) == pytest.approx(0.009801, rel=1e-4)
    assert float(linear.beta_tilde[999]) == pytest.approx(0.02, abs=1e-6)


def test_cosine_alpha_bar_at_t_500():
    """abar_500 (index 499) of the cosine schedule (s = 0.008, betas clipped at 0.999).

    By hand: abar(500) = f(500) / f(0) with f(t) = cos^2((t / T + s) / (1 + s) * pi / 2). The angle at t = 500 is
    (0.508 / 1.008) * pi / 2 = 0.503968 * pi / 2 = pi / 4 + delta, delta = 0.003968 * pi / 2 = 0.006233, and
    cos^2(pi / 4 + delta) = (1 - sin 2 delta) / 2 = 0.493767; f(0) = cos^2(0.012468) = 0.999845, so
    abar_500 ~ 0.49384: the cosine schedule keeps half the signal variance at mid-chain, where the linear one
    keeps 8 %.
    """
    reference = numpy_alpha_bar(numpy_cosine_betas())
    for alpha_bar in (Schedule.from_name("cosine", T).alpha_bar, GaussianDiffusion("cosine", T).alpha_bar):
        assert float(alpha_bar[499]) == pytest.approx(reference[499], rel=1e-12)
        assert float(alpha_bar[499]) == pytest.approx(0.49384, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# The DDPM CIFAR-10 U-Net: 35.7 M parameters
# ----------------------------------------------------------------------------------------------

def conv3(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + c_out


def linear_layer(c_in: int, c_out: int, bias: bool = True) -> int:
    return c_in * c_out + (c_out if bias else 0)


def residual_block(c_in: int, c_out: int, emb: int) -> int:
    """GroupNorm, 3x3 conv, time projection, GroupNorm, 3x3 conv, and a 1x1 conv skip when the width changes."""
    skip = linear_layer(c_in, c_out) if c_in != c_out else 0
    return 2 * c_in + conv3(c_in, c_out) + linear_layer(emb, c_out) + 2 * c_out + conv3(c_out, c_out) + skip


def attention_block(c: int) -> int:
    """GroupNorm, bias-free q, k, v projections, and the output projection (with bias)."""
    return 2 * c + 3 * linear_layer(c, c, bias=False) + linear_layer(c, c)


DDPM_CIFAR10 = dict(image_size=32, in_channels=3, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attention_resolutions=(2,), dropout=0.1, num_heads=1, norm_groups=32, scale_shift=False)


def test_ddpm_cifar10_unet_has_the_papers_35_7_million_parameters():
    """Ho et al. 2020 (appendix B) report 35.7 M parameters for their CIFAR-10 model: 128 base channels,
    multipliers (1, 2, 2, 2), two residual blocks per level, self-attention at 16 x 16 (down-sampling rate 2,
    the package's encoding of attention_resolutions), dropout 0.1, one head.

    The package builds 35,741,699, counted part by part below:

        time embedding  Linear(128, 512) + Linear(512, 512)                          328,704
        conv_in, out    3x3 conv 3 -> 128; GroupNorm(128) + 3x3 conv 128 -> 3          7,299
        22 residual blocks (8 encoder, 2 middle, 12 decoder)                      30,730,240
        6 attention blocks over 256 channels (2 encoder, 1 middle, 3 decoder)      1,577,472
        3 down-sampling and 3 up-sampling 3x3 convs                               3,097,984

    The paper's 35.7 M is given to three digits, so any count in [35.65 M, 35.75 M) is that number; the test
    asks for exactly that (|n - 35.7 M| <= 0.05 M, 0.14 %). The residual difference from the authors' own
    network is known to the parameter: their attention block computes q, k and v with biases (NIN layers),
    ours without (a bias on k cancels in the softmax and one on v folds into the output projection's bias,
    as the attention weights sum to 1; only the one on q adds anything), which is 3 x 256
    biases in each of the 6 attention blocks, 4,608 in all: 35,741,699 + 4,608 = 35,746,307, the count
    reported for the conversion of the authors' CIFAR-10 weights (google/ddpm-cifar10-32). As the totals then
    agree exactly, everything else (the time-embedding MLP, the GroupNorms, the 1x1 skip convolutions, the
    resampling convolutions) is the same size in both. The number of heads does not change the size.
    """
    model = UNet(UNetConfig(**DDPM_CIFAR10))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) <= 0.05e6, f"{n:,} parameters do not round to the paper's 35.7 M"

    # part by part, from the formulas above
    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    kinds = {"ResidualBlock": "residual", "AttentionBlock": "attention",
             "Downsample": "resample", "Upsample": "resample"}
    parts = {"time_embed": size(model.time_embed), "conv_in+out": size(model.conv_in) + size(model.out),
             "residual": 0, "attention": 0, "resample": 0}
    for module in model.modules():
        if type(module).__name__ in kinds:
            parts[kinds[type(module).__name__]] += size(module)
    assert sum(parts.values()) == n, "a parameter outside the counted parts"

    emb = 4 * 128
    encoder = [(128, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 256), (256, 256), (256, 256)]
    middle = [(256, 256)] * 2
    # decoder, deepest level first: each block eats a skip connection (widths of the encoder's outputs)
    decoder = [(512, 256)] * 3 + [(512, 256)] * 3 + [(512, 256), (512, 256), (384, 256)] + \
              [(384, 128), (256, 128), (256, 128)]
    expected = {
        "time_embed": linear_layer(128, emb) + linear_layer(emb, emb),
        "conv_in+out": conv3(3, 128) + 2 * 128 + conv3(128, 3),
        "residual": sum(residual_block(a, b, emb) for a, b in encoder + middle + decoder),
        "attention": 6 * attention_block(256),
        "resample": conv3(128, 128) + 2 * conv3(256, 256) + 3 * conv3(256, 256),
    }
    assert parts == expected
    assert n == 35_741_699
    assert n + 6 * 3 * 256 == 35_746_307  # with the authors' q, k, v biases
