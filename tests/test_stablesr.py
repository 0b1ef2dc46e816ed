"""StableSR (lesson 09): the frozen prior steered by a time-aware encoder and SFT layers, the SR3-style
baseline, their training, export and loading."""
import json

import pytest
import torch

from diffusion_course import pretrained
from diffusion_course.ddpm import GaussianDiffusion
from diffusion_course.degradations import DegradationConfig, degrade
from diffusion_course.nn import UNet, UNetConfig
from diffusion_course.sr_training import SRTrainConfig, SRTrainer, export_sr
from diffusion_course.stablesr import (ConcatSR, StableSR, build_concat_sr, build_sr, build_stablesr,
                                       encoder_config_for, load_sr, load_trainable, sr_config, sr_from_config)

PRIOR = dict(image_size=16, in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(2,), num_heads=2, norm_groups=8)


def _unzero(net):
    for p in net.parameters():
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return net


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    """A tiny pixel prior written as an asset folder, as `export` writes one."""
    torch.manual_seed(0)
    unet = _unzero(UNet(UNetConfig(**PRIOR)))
    folder = tmp_path_factory.mktemp("prior")
    config = {"train": {"schedule": "linear", "T": 50, "clip_x0": True}, "unet": unet.config.to_dict(), "step": 0}
    pretrained.write_asset(folder, unet.state_dict(), config, "made by a test")
    return folder


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_stablesr_starts_as_the_prior_exactly(prior_dir):
    torch.manual_seed(0)
    model = build_sr(prior_dir, "stablesr", {"model_channels": 8, "out_channels": 16, "norm_groups": 4}, sft_hidden=8, device="cpu")
    prior = pretrained.load_pretrained(prior_dir, "cpu")[0]
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    c_lr = model.lr_input(degrade(_images(2), DegradationConfig(scale=4), seed=1))
    assert c_lr.shape == (2, 3, 16, 16)
    feats = model.struct_cond(c_lr, t)
    assert list(feats) == ["16", "8"] and feats["16"].shape == (2, 16, 16, 16) and feats["8"].shape == (2, 16, 8, 8)
    assert torch.equal(model.eps(x_t, t, c_lr), prior(x_t, t))  # every SFT layer is the identity at the start
    assert torch.equal(model.prior_eps(x_t, t), prior(x_t, t))


def test_only_encoder_and_sft_train_and_the_prior_stays_bit_identical(prior_dir):
    torch.manual_seed(0)
    model = build_sr(prior_dir, "stablesr", {"model_channels": 8, "out_channels": 16, "norm_groups": 4}, sft_hidden=8, device="cpu")
    before = {k: v.clone() for k, v in model.unet.prior_state_dict().items()}
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.encoder.parameters()} | {id(p) for p in model.unet.sft_parameters()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    hr = _images(4)
    lr = degrade(hr, DegradationConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss = model.loss(hr, lr, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.unet.prior_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    c_lr = model.lr_input(lr[:2])
    assert not torch.allclose(model.eps(x_t, t, c_lr), model.prior_eps(x_t, t))  # it is steered now


def test_time_agnostic_encoder_sees_fixed_t(prior_dir):
    torch.manual_seed(0)
    aware = build_sr(prior_dir, "stablesr", {"model_channels": 8, "out_channels": 16, "norm_groups": 4}, sft_hidden=8, device="cpu")
    agnostic = build_sr(prior_dir, "stablesr", {"model_channels": 8, "out_channels": 16, "norm_groups": 4}, sft_hidden=8,
                        time_aware=False, fixed_t=7, device="cpu")
    _unzero(aware.encoder)  # zero-initialised residual branches would hide t at the start
    agnostic.encoder.load_state_dict(aware.encoder.state_dict())
    c_lr = torch.randn(2, 3, 16, 16)
    f1, f2 = agnostic.struct_cond(c_lr, torch.tensor([1, 2])), agnostic.struct_cond(c_lr, torch.tensor([30, 49]))
    assert all(torch.equal(f1[k], f2[k]) for k in f1)
    f3 = aware.struct_cond(c_lr, torch.tensor([7, 7]))
    assert all(torch.equal(f1[k], f3[k]) for k in f1)
    g1, g2 = aware.struct_cond(c_lr, torch.tensor([1, 2])), aware.struct_cond(c_lr, torch.tensor([30, 49]))
    assert not torch.allclose(g1["16"], g2["16"])


def test_concat_baseline_reads_the_lr_image(prior_dir):
    torch.manual_seed(0)
    model = build_sr(prior_dir, "concat", device="cpu")
    assert isinstance(model, ConcatSR) and model.unet.config.in_channels == 6
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.unet.parameters()}
    _unzero(model.unet)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    assert not torch.allclose(model.eps(x_t, t, torch.zeros(2, 3, 16, 16)), model.eps(x_t, t, torch.ones(2, 3, 16, 16)))
    out = model.sample(degrade(_images(2), DegradationConfig(), seed=0), steps=3,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1


def test_sample_is_seeded_and_steered(prior_dir):
    torch.manual_seed(0)
    model = build_sr(prior_dir, "stablesr", {"model_channels": 8, "out_channels": 16, "norm_groups": 4}, sft_hidden=8, device="cpu")
    for p in model.unet.sft_parameters():
        torch.nn.init.normal_(p, std=0.05)
    lr = degrade(_images(2), DegradationConfig(), seed=0)
    a = model.sample(lr, steps=4, generator=torch.Generator().manual_seed(3))
    b = model.sample(lr, steps=4, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    c = model.sample(-lr, steps=4, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, c)
    assert model.sample(lr, sampler="ddpm", generator=torch.Generator().manual_seed(3)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(lr, sampler="euler")


def test_clear_errors(prior_dir):
    prior = pretrained.load_pretrained(prior_dir, "cpu")[0]
    diffusion = GaussianDiffusion("linear", 50)
    enc = encoder_config_for(prior.config, model_channels=8, out_channels=16, norm_groups=4)
    with pytest.raises(ValueError, match="one level per U-Net level"):
        encoder_config_for(prior.config, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="fixed_t"):
        build_stablesr(prior, diffusion, enc, fixed_t=50)
    with pytest.raises(ValueError, match="already has SFT"):
        build_stablesr(UNet(UNetConfig(**PRIOR, sft_channels=8)), diffusion, enc)
    with pytest.raises(ValueError, match="in_channels must be"):
        ConcatSR(UNet(UNetConfig(**PRIOR)), diffusion)
    with pytest.raises(ValueError, match="kind must be"):
        build_sr(prior_dir, "sr3")
    with pytest.raises(ValueError, match="no shipped prior"):
        build_sr("no_such_prior")
    model = build_concat_sr(prior.config, diffusion)
    with pytest.raises(ValueError, match="does not match"):
        model.loss(_images(2), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="do not fit"):
        load_trainable(model, {"unet.nothing": torch.zeros(1)})


def test_trainer_resume_export_and_load(prior_dir, tmp_path):
    data = _images(16, seed=1)
    common = dict(prior=str(prior_dir), encoder_channels=8, encoder_out=16, sft_hidden=8, batch_size=4, steps=4,
                  checkpoint_every=2, sample_every=0, n_samples=2, sample_steps=2, progress=False, device="cpu")
    state = torch.random.get_rng_state()
    straight = SRTrainer(SRTrainConfig(**common, out=str(tmp_path / "a")), data, data[:2])
    groups = straight.optimizer.param_groups
    assert [g["name"] for g in groups] == ["time-aware encoder", "SFT layers"]
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in straight.model.trainable_parameters()}
    assert not in_groups & {id(p) for n, p in straight.model.unet.named_parameters() if ".sft." not in n}
    straight.train()
    assert torch.equal(torch.random.get_rng_state(), state)  # the trainer leaves the global RNG alone
    assert (tmp_path / "a" / "samples").is_dir()
    prior_weights = pretrained.load_pretrained(prior_dir, "cpu")[0].state_dict()
    assert all(torch.equal(prior_weights[k], v) for k, v in straight.model.unet.prior_state_dict().items())
    # stop at step 2 and resume: the same weights as training straight through
    half = SRTrainer(SRTrainConfig(**{**common, "steps": 2}, out=str(tmp_path / "b")), data, data[:2])
    half.train()
    resumed = SRTrainer(SRTrainConfig(**common, out=str(tmp_path / "b")), data, data[:2])
    resumed.load(tmp_path / "b")
    resumed.train()
    a, b = straight.model.trainable_state_dict(), resumed.model.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.loss_history == resumed.loss_history
    with pytest.raises(ValueError, match="different configuration"):
        SRTrainer(SRTrainConfig(**{**common, "lr": 5e-4}), data, data[:2]).load(tmp_path / "b")
    # export ships the EMA of the trained parts only, and names the prior
    asset = export_sr(tmp_path / "a", tmp_path / "asset", "a test")
    config = json.loads((asset / "config.json").read_text())
    assert config["sr"]["prior_sha256"] == pretrained.asset_sha256(prior_dir) and config["step"] == 4
    model, cfg = load_sr(asset, "cpu")
    assert isinstance(model, StableSR) and cfg["command"].startswith("a test")
    for k, v in model.trainable_state_dict().items():
        assert torch.allclose(v, straight.ema[k].half().float())
    with pytest.raises(ValueError, match="super-resolution model"):
        pretrained.load_pretrained(asset)


def test_sr_from_config_refuses_a_changed_prior(prior_dir, tmp_path):
    model = build_sr(prior_dir, "stablesr", {"model_channels": 8, "out_channels": 16, "norm_groups": 4}, sft_hidden=8, device="cpu")
    config = sr_config(model, prior_dir)
    again = sr_from_config(config, "cpu")
    assert again.unet.config == model.unet.config and again.encoder.config == model.encoder.config
    config["sr"]["prior_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="not the one"):
        sr_from_config(config, "cpu")


def test_train_config_validation():
    with pytest.raises(ValueError, match="kind"):
        SRTrainConfig(kind="sr3")
    with pytest.raises(ValueError, match="batch_size"):
        SRTrainConfig(batch_size=0)
    with pytest.raises(ValueError):
        SRTrainConfig(degradation={"second_order": 2.0})
    c = SRTrainConfig(encoder_mult=(1, 2), degradation={"second_order": 0.0})
    assert SRTrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_sr_scores():
    from diffusion_course.stablesr import sr_scores
    hr = _images(4)
    perfect = sr_scores(hr, hr)
    assert perfect["psnr"] > 100 and abs(perfect["ssim"] - 1) < 1e-6
    noisy = (hr + 0.1 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    s = sr_scores(noisy, hr, perceptual=lambda a, b: (a - b).abs().flatten(1).mean(1))  # any (B,) distance
    mse = (noisy - hr).pow(2).flatten(1).mean(1)
    assert abs(s["psnr"] - float((10 * torch.log10(4 / mse)).mean())) < 1e-4
    assert s["ssim"] < 1 and s["perceptual"] > 0
    with pytest.raises(ValueError, match="differ in shape"):
        sr_scores(hr[:, :, :8], hr)


def test_shipped_sr_models_load_on_their_shipped_prior():
    names = pretrained.available("sr")
    assert {"sr_photos32", "sr_photos32_agnostic", "sr_photos32_concat"} <= set(names)
    for name in names:
        model, config = load_sr(name, "cpu")
        assert "python -m diffusion_course train-sr" in config["command"], f"{name} does not record its command"
        assert config["sr"]["prior"] in pretrained.available("unet") + pretrained.available("ldm")
        assert not any(p.requires_grad for p in model.parameters())
        lr = torch.zeros(1, 3, 8, 8)
        assert model.sample(lr, steps=2, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 32, 32)
    assert load_sr("sr_photos32", "cpu")[0].time_aware and not load_sr("sr_photos32_agnostic", "cpu")[0].time_aware


def test_sampling_from_the_noised_lr_image(prior_dir):
    torch.manual_seed(0)
    model = build_sr(prior_dir, "concat", device="cpu")
    _unzero(model.unet)
    lr = degrade(_images(2), DegradationConfig(), seed=0)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a, b = model.sample(lr, steps=3, generator=g(), start_t=10), model.sample(lr, steps=3, generator=g(), start_t=10)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, model.sample(lr, steps=3, generator=g(), start_t=40))
    # starting at step 0 is one DDIM step from the barely noised LR image to x_0
    c_lr = model.lr_input(lr)
    one = model.sample(lr, steps=1, generator=g(), start_t=0)
    x = model.diffusion.q_sample(c_lr, 0, model.diffusion._randn(c_lr.shape, like=c_lr, generator=g()))
    want = model.decode(model.diffusion.ddim_step(lambda x, t: model.eps(x, t, c_lr), x, 0, -1))
    assert torch.allclose(one, want)
    from diffusion_course.stablesr import start_grid
    assert start_grid(10, 3) == [10, 5, 0] and start_grid(2, 5) == [2, 1, 0] and start_grid(0, 1) == [0]
    with pytest.raises(ValueError, match="start_t must be"):
        model.sample(lr, start_t=50)
    with pytest.raises(ValueError, match="DDIM sampler"):
        model.sample(lr, sampler="ddpm", start_t=5)


def test_ilvr_holds_the_low_frequencies_to_the_lr_image(prior_dir):
    from diffusion_course.stablesr import wavelet_split
    torch.manual_seed(0)
    model = build_sr(prior_dir, "concat", device="cpu")
    _unzero(model.unet)
    lr = degrade(_images(2), DegradationConfig(), seed=0)
    c_lr = model.lr_input(lr)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    eps = lambda x, t: model.eps(x, t, c_lr)  # noqa: E731
    d = model.diffusion
    # by hand: start at step 10; DDIM to 5 and to 0, each time swapping in the low band of a fresh draw of
    # q(y_s | c_LR); DDIM to x_0 and swap in the low band of c_LR itself
    gen = g()
    x = d.q_sample(c_lr, 10, d._randn(c_lr.shape, like=c_lr, generator=gen))
    for t, s in ((10, 5), (5, 0)):
        x = d.ddim_step(eps, x, t, s)
        y = d.q_sample(c_lr, s, d._randn(c_lr.shape, like=c_lr, generator=gen))
        x = wavelet_split(x, 2)[0] + wavelet_split(y, 2)[1]
    x = d.ddim_step(eps, x, 0, -1)
    want = model.decode(wavelet_split(x, 2)[0] + wavelet_split(c_lr, 2)[1])
    got = model.sample(lr, steps=3, generator=g(), start_t=10, ilvr=2)
    assert torch.allclose(got, want, atol=1e-6)
    plain = model.sample(lr, steps=3, generator=g(), start_t=10)
    assert not torch.allclose(got, plain, atol=1e-3)
    # from pure noise (or a given x_T): seeded, and x_T is used
    z = torch.randn(c_lr.shape, generator=torch.Generator().manual_seed(1))
    a = model.sample(lr, steps=3, x_T=z, ilvr=1, generator=g())
    assert torch.equal(a, model.sample(lr, steps=3, x_T=z, ilvr=1, generator=g()))
    assert not torch.equal(a, model.sample(lr, steps=3, x_T=-z, ilvr=1, generator=g()))
    assert model.sample(lr, steps=2, ilvr=2, generator=g()).shape == (2, 3, 16, 16)
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="ilvr is a number of wavelet levels"):
            model.sample(lr, steps=2, ilvr=bad)
    with pytest.raises(ValueError, match="DDIM sampler"):
        model.sample(lr, sampler="ddpm", ilvr=2)
    with pytest.raises(ValueError, match="not both"):
        model.sample(lr, start_t=5, x_T=z)


def test_ilvr_swap_is_the_high_band_of_x_plus_the_low_band_of_the_noised_lr_image():
    from diffusion_course.stablesr import ilvr_swap, wavelet_split
    d = GaussianDiffusion("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x, c_lr, noise = (torch.randn(2, 3, 16, 16, generator=g) for _ in range(3))
    ab = float(d.alpha_bar[500])
    want = wavelet_split(x, 2)[0] + wavelet_split(ab ** 0.5 * c_lr + (1 - ab) ** 0.5 * noise, 2)[1]
    assert torch.allclose(ilvr_swap(x, c_lr, 500, 2, d, noise), want, atol=1e-6)
    last = ilvr_swap(x, c_lr, -1, 1, d)  # at x_0 the LR image itself, no noise
    assert torch.allclose(last, wavelet_split(x, 1)[0] + wavelet_split(c_lr, 1)[1], atol=1e-6)
    assert torch.allclose(ilvr_swap(x, x, 300, 3, d, torch.zeros_like(x)) - x,
                          wavelet_split(x * (float(d.alpha_bar[300]) ** 0.5 - 1), 3)[1], atol=1e-5)
    with pytest.raises(ValueError, match="needs the noise"):
        ilvr_swap(x, c_lr, 10, 2, d)
    with pytest.raises(ValueError, match="differ in shape"):
        ilvr_swap(x, c_lr[:, :, :8], -1, 2, d)


def test_per_image_scores_average_to_sr_scores():
    from diffusion_course.stablesr import per_image_scores, sr_scores
    hr = _images(4)
    noisy = (hr + torch.linspace(0.02, 0.3, 4).view(4, 1, 1, 1) * torch.randn(hr.shape, generator=torch.Generator(
        ).manual_seed(0))).clamp(-1, 1)
    dist = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731
    each, mean = per_image_scores(noisy, hr, dist), sr_scores(noisy, hr, dist)
    for key in ("psnr", "ssim", "perceptual"):
        assert each[key].shape == (4,)
        assert abs(float(each[key].mean()) - mean[key]) < 1e-5
    assert (each["psnr"].diff() < 0).all() and (each["perceptual"].diff() > 0).all()  # more noise, worse
    assert float(per_image_scores(hr[:1], hr[:1])["ssim"][0]) == pytest.approx(1.0, abs=1e-6)


def test_color_fix_takes_the_reference_statistics():
    from diffusion_course.stablesr import color_fix
    g = torch.Generator().manual_seed(0)
    sr = torch.randn(2, 3, 8, 8, generator=g) * 0.3 + 0.2
    ref = torch.randn(2, 3, 8, 8, generator=g) * 0.1 - 0.3
    out = color_fix(sr, ref)
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), atol=1e-5)
    assert torch.allclose(out.std((2, 3)), ref.std((2, 3)), atol=1e-4)
    # the structure is the sr image's: a per-channel affine map of it
    z = lambda x: (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(z(out), z(sr), atol=1e-4)
    with pytest.raises(ValueError, match="differ in shape"):
        color_fix(sr, ref[:, :, :4])
    with pytest.raises(ValueError, match="'adain' or 'wavelet'"):
        color_fix(sr, ref, method="histogram")


def test_wavelet_split_bands_add_up_and_separate_frequencies():
    from diffusion_course.stablesr import wavelet_split
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    high, low = wavelet_split(x, 2)
    assert torch.allclose(high + low, x, atol=1e-12)
    # the blur keeps a constant image and the mean of an image without borders' influence
    flat = torch.full((1, 3, 16, 16), 0.7, dtype=torch.float64)
    assert torch.allclose(wavelet_split(flat, 3)[1], flat, atol=1e-12)
    # by hand, one level at an interior pixel: the 3x3 binomial weights
    k = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]], dtype=torch.float64) / 16
    assert torch.allclose(wavelet_split(x, 1)[1][0, 0, 5, 7], (x[0, 0, 4:7, 6:9] * k).sum())
    # level 2's taps are 2 pixels apart, applied to level 1's output
    low1 = wavelet_split(x, 1)[1]
    assert torch.allclose(low[0, 1, 10, 12], (low1[0, 1, 8:13:2, 10:15:2] * k).sum())
    # a checkerboard (period 2) is all high frequency; a slow ramp far from the borders all low
    i = torch.arange(32, dtype=torch.float64)
    checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).expand(1, 1, 32, 32)
    assert wavelet_split(checker, 1)[1][..., 4:-4, 4:-4].abs().max() < 1e-12
    ramp = (i[None, :] / 31).expand(1, 1, 32, 32)
    assert wavelet_split(ramp, 2)[0][..., 6:-6, 6:-6].abs().max() < 1e-12
    with pytest.raises(ValueError, match="levels must be >= 1"):
        wavelet_split(x, 0)


def test_wavelet_color_fix_takes_low_frequencies_from_the_reference():
    from diffusion_course.stablesr import color_fix, wavelet_split
    g = torch.Generator().manual_seed(1)
    sr = torch.randn(2, 3, 16, 16, generator=g).mul(0.2)
    ref = torch.randn(2, 3, 16, 16, generator=g).mul(0.2)
    out = color_fix(sr, ref, method="wavelet", levels=2)
    assert torch.allclose(out, wavelet_split(sr, 2)[0] + wavelet_split(ref, 2)[1], atol=1e-6)
    # the reference itself as the sample: nothing to change
    assert torch.allclose(color_fix(ref, ref, method="wavelet"), ref.clamp(-1, 1), atol=1e-6)
    assert not torch.allclose(out, sr, atol=1e-2) and not torch.allclose(out, ref, atol=1e-2)
