"""The super-resolution degradation pipeline (lesson 09_stablesr): shapes, ranges, seeding, the stages, each
operation's effect, and the configuration's validation."""
import json
import math
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from diffusion_course.degradations import (STAGE_NAMES, DegradationConfig, blur_kernels, degradation_stages,
                                           degrade, upsample)

# everything off: no visible blur, no stage-1 resize, no noise, the mildest JPEG, no second stage
GENTLE = DegradationConfig(blur_sigma=(0.01, 0.01), resize_range=(1.0, 1.0), noise_sigma=(0.0, 0.0),
                           jpeg_quality=(100.0, 100.0), second_order=0.0)


def _images(b=4, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


def _smooth(b, c, size=64, seed=0):
    """Smooth random images: 8 x 8 random values enlarged bilinearly, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, c, 8, 8, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _high_frequency_energy(x):
    """Mean squared difference of neighbouring pixels: large for noise, small for smooth images."""
    return ((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean()


@pytest.mark.parametrize("c, h, w, scale", [(3, 32, 32, 4), (1, 32, 32, 4), (3, 24, 40, 2), (1, 16, 8, 8),
                                            (3, 12, 12, 1), (2, 16, 16, 4), (4, 8, 8, 4)])
def test_output_shape_dtype_and_range(c, h, w, scale):
    hr = _images(3, c, h, w)
    lr = degrade(hr, DegradationConfig(scale=scale, noise_sigma=(0.2, 0.3)), seed=1)
    assert lr.shape == (3, c, h // scale, w // scale)
    assert lr.dtype == hr.dtype
    assert torch.isfinite(lr).all() and lr.min() >= -1 and lr.max() <= 1


def test_float64_input_gives_float64_output():
    lr = degrade(_images().double(), seed=0)
    assert lr.dtype == torch.float64 and lr.shape == (4, 3, 8, 8)


def test_same_seed_is_bit_identical_and_different_seeds_differ():
    hr = _images()
    assert torch.equal(degrade(hr, seed=3), degrade(hr, seed=3))
    assert not torch.equal(degrade(hr, seed=3), degrade(hr, seed=4))
    assert torch.equal(degrade(hr, generator=torch.Generator().manual_seed(3)), degrade(hr, seed=3))
    assert torch.equal(degrade(hr), degrade(hr, seed=0))  # neither given: seed 0


def test_the_global_random_state_is_untouched():
    hr = _images()
    state = torch.random.get_rng_state()
    degrade(hr, seed=5)
    degrade(hr, generator=torch.Generator().manual_seed(5))
    degradation_stages(hr, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_generator_advances_between_calls():
    hr = _images()
    g = torch.Generator().manual_seed(0)
    first, second = degrade(hr, generator=g), degrade(hr, generator=g)
    assert not torch.equal(first, second)
    g.manual_seed(0)
    assert torch.equal(degrade(hr, generator=g), first)


def test_samples_of_a_batch_are_degraded_independently():
    hr = _images(1).repeat(8, 1, 1, 1)  # eight copies of one image get eight different degradations
    lr = degrade(hr, seed=0)
    assert all(not torch.equal(lr[0], lr[i]) for i in range(1, 8))


def test_generator_and_seed_are_checked():
    hr = _images()
    with pytest.raises(ValueError, match="either generator or seed"):
        degrade(hr, generator=torch.Generator(), seed=1)
    with pytest.raises(ValueError, match="seed"):
        degrade(hr, seed=-1)


def test_stages_are_ordered_shaped_and_end_in_degrade():
    hr = _images(3, 3, 32, 32)
    config = DegradationConfig(second_order=0.0)  # the stages force the second stage on anyway
    stages = degradation_stages(hr, config, seed=7)
    assert tuple(stages) == STAGE_NAMES == ("high resolution", "blur 1", "resize 1", "noise 1", "JPEG 1",
                                            "blur 2", "resize 2", "noise 2", "JPEG 2", "low resolution")
    for name in STAGE_NAMES[:6]:
        assert stages[name].shape == (3, 3, 32, 32), name
    for name in STAGE_NAMES[6:]:
        assert stages[name].shape == (3, 3, 8, 8), name
    assert torch.equal(stages["high resolution"], hr)
    assert torch.equal(stages["low resolution"], degrade(hr, replace(config, second_order=1.0), seed=7))
    assert not torch.equal(stages["noise 2"], stages["resize 2"])  # stage 2 really ran
    assert not torch.equal(stages["low resolution"], degrade(hr, config, seed=7))


def test_gentle_settings_give_a_plain_antialiased_downsample():
    """With everything switched off, the result is one of the three plain downsamples (area, anti-aliased
    bilinear or bicubic: the mode is drawn per sample). What is left is JPEG at quality 100: for grey images
    it changes pixels by at most 2.2e-4 (measured), so 1e-3, an eighth of one 8-bit grey level (2 / 255),
    is the bound; colour images also lose chroma detail to JPEG's 4:2:0 subsampling, measured at 0.04-0.05
    on these smooth images, so 0.1 is the bound there."""
    for c, bound in [(1, 1e-3), (3, 0.1)]:
        hr = _smooth(16, c)
        grey = _smooth(16, 1).repeat(1, c, 1, 1)
        for images, tol in [(hr, bound), (grey, 1e-3)]:
            lr = degrade(images, GENTLE, seed=0)
            plain = [F.interpolate(images, size=(16, 16), mode="area")] + [
                F.interpolate(images, size=(16, 16), mode=m, align_corners=False, antialias=True)
                for m in ("bilinear", "bicubic")]
            error = torch.stack([(lr - p).abs().amax(dim=(1, 2, 3)) for p in plain]).min(dim=0).values
            assert error.max() < tol, (c, error.max())


def test_blur_kernels_sum_to_one_and_are_point_symmetric():
    config = DegradationConfig(blur_kernel=9, blur_sigma=(0.5, 3.0))
    k = blur_kernels(32, config, torch.Generator().manual_seed(0))
    assert k.shape == (32, 9, 9) and k.dtype == torch.float32 and (k >= 0).all()
    assert torch.allclose(k.sum(dim=(-2, -1)), torch.ones(32), atol=1e-6)
    assert torch.equal(k, torch.flip(k, dims=(-2, -1)))  # a Gaussian is unchanged by a 180-degree turn
    assert not torch.allclose(k, k.transpose(-2, -1), atol=1e-4)  # but turned and stretched: anisotropic
    assert (k[:, 4, 4] == k.amax(dim=(-2, -1))).all()  # peak in the centre


def test_a_tiny_blur_kernel_is_a_delta():
    k = blur_kernels(4, replace(GENTLE, blur_kernel=5), torch.Generator().manual_seed(0))
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    assert torch.allclose(k, delta.expand(4, 5, 5))


def test_noise_raises_the_high_frequency_energy():
    """Same seed, so the same draws; only the noise level differs. On grey images JPEG at quality 100 keeps the
    noise, which adds 2 * 0.1^2 per axis to the squared neighbour differences: 0.04 in all (measured 0.0403).
    Colour images lose part of it to JPEG's chroma subsampling, but the energy still more than doubles."""
    for c in (1, 3):
        hr = _smooth(8, c)
        quiet = _high_frequency_energy(degrade(hr, replace(GENTLE, scale=1), seed=0))
        noisy = _high_frequency_energy(degrade(hr, replace(GENTLE, scale=1, noise_sigma=(0.1, 0.1)), seed=0))
        assert noisy > 2 * quiet, c
        if c == 1:
            assert abs((noisy - quiet).item() - 0.04) < 0.004


def test_strong_jpeg_changes_the_image_more_than_mild_jpeg():
    hr = _smooth(8, 3, size=32) + 0.1 * _images(8, 3, 32, 32)  # some detail for the quantiser to remove
    error = {}
    for quality in (10.0, 95.0):
        config = replace(GENTLE, scale=1, jpeg_quality=(quality, quality))
        error[quality] = (degrade(hr.clamp(-1, 1), config, seed=0) - hr.clamp(-1, 1)).abs().mean()
    assert error[10.0] > 2 * error[95.0]


def test_jpeg_of_an_odd_size_image_keeps_its_size_and_content():
    hr = _smooth(2, 3, size=40)[..., :37, :21]  # neither side a multiple of 16
    lr = degrade(hr, replace(GENTLE, scale=1, jpeg_quality=(90.0, 90.0)), seed=0)
    assert lr.shape == hr.shape and (lr - hr).abs().mean() < 0.05


def test_a_batch_of_64_is_fast():
    hr = _images(64, 3, 32, 32)
    degrade(hr, seed=0)  # warm up
    start = time.perf_counter()
    degrade(hr, seed=1)
    assert time.perf_counter() - start < 1.0


def test_upsample_is_the_bicubic_baseline():
    lr = degrade(_images(), seed=0)
    up = upsample(lr)
    assert up.shape == (4, 3, 32, 32) and up.min() >= -1 and up.max() <= 1
    assert torch.allclose(up, F.interpolate(lr, scale_factor=4, mode="bicubic").clamp(-1, 1))
    assert upsample(lr, 2, mode="nearest").shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="mode"):
        upsample(lr, mode="lanczos")
    with pytest.raises(ValueError, match="B, C, h, w"):
        upsample(lr[0])


def test_bad_image_shapes_are_errors():
    with pytest.raises(ValueError, match=r"30x32 is not divisible by scale 4.*28x32"):
        degrade(_images(2, 3, 30, 32))
    with pytest.raises(ValueError, match="B, C, H, W"):
        degrade(_images()[0])
    with pytest.raises(ValueError, match="float"):
        degrade(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_config_round_trip():
    config = DegradationConfig(scale=2, blur_kernel=5, blur_sigma=[0.3, 1.0], jpeg_quality=[30, 60],
                               second_order=1)
    assert config.blur_sigma == (0.3, 1.0) and config.jpeg_quality == (30.0, 60.0)
    assert DegradationConfig.from_dict(config.to_dict()) == config
    assert DegradationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown degradation configuration keys"):
        DegradationConfig.from_dict({**config.to_dict(), "sharpen": 1.0})


@pytest.mark.parametrize("changes, message", [
    (dict(scale=0), "scale must be an int >= 1"),
    (dict(scale=2.0), "scale must be an int"),
    (dict(blur_kernel=6), "blur_kernel must be an odd int"),
    (dict(blur_kernel=0), "blur_kernel must be an odd int"),
    (dict(blur_sigma=(1.5, 0.2)), r"blur_sigma has low > high.*\(0.2, 1.5\)"),
    (dict(blur_sigma=(0.0, 1.0)), "blur_sigma.*above 0"),
    (dict(resize_range=(-0.5, 1.0)), "resize_range.*above 0"),
    (dict(resize_range=(1.0, 0.5)), "resize_range has low > high"),
    (dict(noise_sigma=(-0.1, 0.1)), "noise_sigma.*at least 0"),
    (dict(noise_sigma=(0.0, math.inf)), "noise_sigma.*finite"),
    (dict(jpeg_quality=(0.0, 90.0)), "jpeg_quality.*at least 1 and at most 100"),
    (dict(jpeg_quality=(50.0, 101.0)), "jpeg_quality.*at least 1 and at most 100"),
    (dict(jpeg_quality=(95.0, 50.0)), "jpeg_quality has low > high"),
    (dict(second_order=1.5), r"second_order.*\[0, 1\]"),
    (dict(second_order=-0.1), r"second_order.*\[0, 1\]"),
    (dict(noise_sigma=(0.1,)), "noise_sigma must be a pair"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        DegradationConfig(**changes)
