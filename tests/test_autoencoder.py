"""The latent-diffusion autoencoder (lesson 06): shapes at every f, the KL and VQ identities, the
straight-through gradient, the losses (hinge, adaptive weight, PatchGAN, perceptual), training, resume,
export and the shipped checkpoint."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import data, vae
from diffusion_course.ae_training import (AETrainConfig, AETrainer, export_autoencoder, load_autoencoder)
from diffusion_course.autoencoder import (Autoencoder, AutoencoderConfig, DiagonalGaussian, VectorQuantizer,
                                          latent_scale_factor, nearest_code)
from diffusion_course.losses import (AutoencoderLoss, PatchDiscriminator, PerceptualLoss, adaptive_weight,
                                     disc_factor, hinge_d_loss, pixel_loss, vanilla_d_loss)

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny(f=4, reg="kl", size=16, channels=1, **kw):
    return AutoencoderConfig.for_factor(f, in_channels=channels, image_size=size, channels=8, latent_channels=3,
                                        regularizer=reg, n_embed=16, norm_groups=4, **kw)


@pytest.fixture(scope="module")
def perceptual():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PerceptualLoss(layers=("relu1_2", "relu2_2"))


@pytest.mark.parametrize("reg", ["kl", "vq"])
@pytest.mark.parametrize("f", [4, 8, 16])
def test_shapes_at_every_factor(f, reg):
    S = 2 * f
    cfg = tiny(f, reg, size=S, channels=3)
    model = Autoencoder(cfg)
    x = torch.randn(2, 3, S, S)
    out = model(x)
    assert cfg.downsampling_factor == f and cfg.latent_shape == (3, 2, 2)
    assert out.z.shape == (2, 3, 2, 2) and out.x_rec.shape == x.shape and out.reg_loss.shape == (2,)
    assert model.encode(x).shape == out.z.shape and model.decode(out.z).shape == x.shape
    assert cfg.compression_ratio == pytest.approx(3 * S * S / (3 * 2 * 2))
    out.x_rec.square().mean().add(out.reg_loss.mean()).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_clear_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        AutoencoderConfig.for_factor(8, image_size=20)
    with pytest.raises(ValueError, match="power of two"):
        AutoencoderConfig.for_factor(6)
    with pytest.raises(ValueError, match="regularizer"):
        AutoencoderConfig(regularizer="gan")
    with pytest.raises(ValueError, match="norm_groups"):
        AutoencoderConfig(channels=12, norm_groups=8)
    model = Autoencoder(tiny())
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(2, 1, 18, 18))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="no Gaussian posterior"):
        Autoencoder(tiny(reg="vq")).posterior(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="too small"):
        PatchDiscriminator(1, 8, 3)(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown VGG16 layers"):
        PerceptualLoss(layers=("relu9",))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g)
    post = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, 1)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    want = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(post.kl(), want, atol=1e-5)
    draws = torch.stack([post.sample(torch.Generator().manual_seed(s)) for s in range(4000)])
    assert torch.allclose(draws.mean(0), mean, atol=0.1) and torch.allclose(draws.std(0), post.std, rtol=0.1)


def test_nearest_code_against_brute_force_and_perplexity():
    g = torch.Generator().manual_seed(1)
    z, codebook = torch.randn(2, 3, 5, 5, generator=g), torch.randn(7, 3, generator=g)
    brute = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 3), codebook).argmin(1).reshape(2, 5, 5)
    assert torch.equal(nearest_code(z, codebook), brute)
    vq = VectorQuantizer(4, 2, data_init=False)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0], [1, 0], [0, 1], [1, 1]]))
    uniform = vq.codebook.weight.t().reshape(1, 2, 2, 2)    # each code once
    q = vq(uniform.clone())
    assert torch.equal(q.indices.flatten(), torch.arange(4))
    assert q.perplexity.item() == pytest.approx(4.0) and q.usage.item() == 1.0
    q = vq(torch.zeros(1, 2, 2, 2) + 0.1)                   # all nearest to code 0
    assert q.perplexity.item() == pytest.approx(1.0) and q.usage.item() == 0.25
    assert torch.allclose(q.codebook_loss, torch.tensor([4 * 2 * 0.01]))


def test_straight_through_gradient_and_which_loss_moves_what():
    vq = VectorQuantizer(8, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = vq(z)
    assert torch.allclose(q.z_q.detach(), vq.lookup(q.indices), atol=1e-6)  # the value is the code
    upstream = torch.randn_like(z)
    (gz,) = torch.autograd.grad((q.z_q * upstream).sum(), z)
    assert torch.equal(gz, upstream)                           # the gradient passes straight through
    gz_c, gw_c = torch.autograd.grad(q.codebook_loss.sum(), [z, vq.codebook.weight], allow_unused=True)
    assert gz_c is None and gw_c.abs().sum() > 0                # the codebook loss moves only the codes
    gz_m, gw_m = torch.autograd.grad(q.commitment_loss.sum(), [z, vq.codebook.weight], allow_unused=True)
    assert gw_m is None and gz_m.abs().sum() > 0                # the commitment loss moves only the encoder


def test_the_codebook_starts_on_the_data_in_training_only():
    z = torch.randn(2, 3, 4, 4)
    vq = VectorQuantizer(8, 3).eval()
    before = vq.codebook.weight.clone()
    vq(z)
    assert torch.equal(vq.codebook.weight, before) and not vq.initialized    # eval: untouched
    vq.train()
    q = vq(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
    assert vq.initialized and "initialized" in vq.state_dict()
    assert all((rows == code).all(1).any() for code in vq.codebook.weight)  # every code is an encoder output
    assert q.usage.item() == 1.0                                            # so every code is used at first
    assert q.commitment_loss.min() >= 0


def test_the_quantiser_belongs_to_the_decoder():
    model = Autoencoder(tiny(reg="vq")).eval()
    x = torch.randn(2, 1, 16, 16)
    z = model.encode(x)
    codes = model.decoder.quantizer.codebook.weight
    assert not torch.equal(z, codes[nearest_code(z, codes)].permute(0, 3, 1, 2))   # continuous, not a code
    assert torch.allclose(model.decode(z), model(x).x_rec)
    assert model.encoder.net[-1].out_channels == 3 and not any("quantizer" in n for n, _ in model.encoder.named_parameters())


def test_hinge_and_vanilla_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3))
    want = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones(3))
                  + F.binary_cross_entropy_with_logits(fake, torch.zeros(3)))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(want.item(), rel=1e-6)
    x, y = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert pixel_loss(x, y).tolist() == [4.0, 4.0] and pixel_loss(x, 2 * y, "l2").tolist() == [16.0, 16.0]
    assert disc_factor(9, 10) == 0.0 and disc_factor(10, 10) == 1.0


def test_adaptive_weight_against_a_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    h, target, d = torch.randn(5, 4), torch.randn(5, 3), torch.randn(3)
    out = h @ w.t()
    rec, g = (out - target).pow(2).sum(), -(out @ d).mean()
    grad_rec = 2 * (out - target).t() @ h               # d rec / d w, by hand
    grad_g = -(d[:, None] * h.mean(0)[None])            # d g / d w, by hand
    want = grad_rec.norm() / (grad_g.norm() + 1e-4)
    got = adaptive_weight(rec, g, w)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and not got.requires_grad
    assert adaptive_weight(rec, 0 * g, w).item() == 1e4                # clamped when the GAN gradient vanishes


@pytest.mark.parametrize("size, layers", [(64, 3), (32, 2), (32, 3), (48, 2)])
def test_patch_discriminator_output_shape(size, layers):
    disc = PatchDiscriminator(3, 8, layers)
    out = disc(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, disc.output_size(size), disc.output_size(size))
    assert disc.output_size(size) == size // 2 ** layers - 2


def test_perceptual_loss_is_frozen_and_honest(perceptual):
    assert perceptual.source.startswith(("random", "ImageNet", "VGG16 weights"))
    assert not any(p.requires_grad for p in perceptual.parameters())
    perceptual.train()
    assert not perceptual.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = x.clone().requires_grad_(True)
    assert torch.allclose(perceptual(x, y), torch.zeros(2), atol=1e-6)
    d = perceptual(x, (y + 0.3 * torch.randn_like(x)))
    d.sum().backward()
    assert (d > 0).all() and y.grad.abs().sum() > 0                    # gradients reach the image, not the net
    assert perceptual(x[:, :1], x[:, :1]).shape == (2,)                # grey images work too


def test_autoencoder_loss_before_and_after_the_discriminator_starts(perceptual):
    model = Autoencoder(tiny(size=16))
    loss_fn = AutoencoderLoss(1, perceptual_weight=0.5, perceptual=perceptual, disc_start=5, disc_layers=1,
                              disc_channels=8)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    out = model(x)
    early, logs = loss_fn.autoencoder_loss(x, out, 4, model.decoder.last_layer, "kl")
    rec = (pixel_loss(x, out.x_rec) + 0.5 * 256 * perceptual(x, out.x_rec)).mean()
    assert early.item() == pytest.approx((rec + 1e-6 * out.reg_loss.mean()).item(), rel=1e-5)
    assert logs["g"] == 0.0 and loss_fn.discriminator_loss(x, out.x_rec, 4).item() == 0.0
    late, logs = loss_fn.autoencoder_loss(x, out, 5, model.decoder.last_layer, "kl")
    assert logs["d_weight"] > 0 and late.item() != pytest.approx(early.item())
    assert loss_fn.discriminator_loss(x, out.x_rec, 5).item() > 0
    with torch.no_grad():                                   # no gradients to measure lambda with: lambda = 1
        _, logs = loss_fn.autoencoder_loss(x, model(x), 5, model.decoder.last_layer, "kl")
    assert logs["d_weight"] == pytest.approx(0.5)


def _trainer(out=None, steps=6, reg="kl"):
    cfg = AETrainConfig(dataset="digits", image_size=16, batch_size=4, steps=steps, disc_start=2, disc_layers=1,
                        checkpoint_every=0, out=out, progress=False, device="cpu")
    return AETrainer(cfg, tiny(reg=reg))


@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_training_resumes_exactly(tmp_path, reg):
    full = _trainer(reg=reg)
    full.train()
    half = _trainer(str(tmp_path), reg=reg)
    half.train(3)
    half.save()
    resumed = _trainer(reg=reg)
    resumed.load(tmp_path)
    assert resumed.step == 3
    resumed.train()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.history == resumed.history
    if reg == "vq":
        assert all(1 <= p <= 16 for p in full.history["perplexity"])


def test_a_mismatched_checkpoint_is_refused_and_nan_stops(tmp_path):
    run = _trainer(str(tmp_path), steps=1)
    run.train()
    other = AETrainer(AETrainConfig(dataset="digits", image_size=16, batch_size=4, lr=1e-3, progress=False,
                                    device="cpu"), tiny())
    with pytest.raises(ValueError, match="train.lr"):
        other.load(tmp_path)
    bad = _trainer()
    with torch.no_grad():
        bad.model.decoder.last_layer.fill_(float("nan"))
    before = bad.model.encoder.net[0].weight.clone()
    with pytest.raises(FloatingPointError, match="before the weights changed"):
        bad.train_step()
    assert torch.equal(before, bad.model.encoder.net[0].weight)


def test_export_load_and_the_latent_scale_factor(tmp_path):
    run = _trainer(str(tmp_path / "run"), steps=2)
    run.train()
    export_autoencoder(tmp_path / "run", tmp_path / "asset", command="python -m diffusion_course train-autoencoder")
    model, config = load_autoencoder(tmp_path / "asset", device="cpu")
    assert config["step"] == 2 and config["command"].startswith("python -m diffusion_course train-autoencoder")
    x = data.get_dataset("digits", image_size=16).images
    z = model.encode(x) * config["scale_factor"]
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    assert latent_scale_factor(model, x) == pytest.approx(config["scale_factor"], rel=1e-5)
    with pytest.raises(ValueError, match="available: ae_digits32_f4"):
        load_autoencoder("no_such_autoencoder")
    with pytest.raises(ValueError, match="holds no autoencoder"):
        load_autoencoder("ddpm_digits16")               # a DDPM model is not an autoencoder


def test_the_shipped_digit_autoencoder_reconstructs_test_digits():
    model, config = load_autoencoder("ae_digits32_f4", device="cpu")
    assert "train-autoencoder" in config["command"] and config["autoencoder"]["regularizer"] == "kl"
    x = data.get_dataset("digits", image_size=32, split="test").images[:64]
    z = model.encode(x)
    assert z.shape == (64, 4, 8, 8)
    q = vae.reconstruction_quality(x, model.decode(z))
    assert q["psnr"] > 32 and q["ssim"] > 0.95
    assert 0.2 < (z * config["scale_factor"]).std().item() < 5 and math.isfinite(config["scale_factor"])


def test_the_command_line_trains_resumes_and_exports(tmp_path):
    from diffusion_course.__main__ import main

    args = ["train-autoencoder", "--dataset", "digits", "--image-size", "16", "--factor", "4", "--channels", "8",
            "--latent-channels", "2", "--norm-groups", "4", "--batch-size", "4", "--steps", "2", "--disc-start", "1",
            "--disc-layers", "1", "--no-progress", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert main(["train-autoencoder", "--resume", str(tmp_path / "run"), "--steps", "3", "--no-progress"]) == 0
    assert main(["export-autoencoder", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "a")]) == 0
    with pytest.raises(SystemExit, match="--name"):
        main(["export-autoencoder", "--checkpoint", str(tmp_path / "run")])
    model, config = load_autoencoder(tmp_path / "a", device="cpu")
    assert config["step"] == 3 and config["autoencoder"]["latent_channels"] == 2


def test_perceptual_loss_offline_paths(monkeypatch, tmp_path):
    import torchvision.models

    real_vgg16 = torchvision.models.vgg16

    def offline_vgg16(weights=None):
        if weights is not None:
            raise OSError("no network")
        return real_vgg16(weights=None)

    monkeypatch.setattr(torchvision.models, "vgg16", offline_vgg16)
    monkeypatch.setattr("diffusion_course.losses._vgg16_checkpoint", lambda: tmp_path / "absent.pth")
    with pytest.warns(UserWarning, match="random weights"):
        loss = PerceptualLoss(layers=("relu1_2",), download=True)
    assert loss.source.startswith("random") and "OSError: no network" in loss.source
    with pytest.warns(UserWarning, match="random weights"):
        assert PerceptualLoss(layers=("relu1_2",)).source.startswith("random weights (seed 0)")
    with pytest.raises(FileNotFoundError, match="no VGG16 weights file"):
        PerceptualLoss(weights_path=tmp_path / "missing.safetensors")


@pytest.mark.filterwarnings("ignore:PerceptualLoss. no ImageNet VGG16 weights:UserWarning")
def test_perceptual_loss_random_weights_are_the_seeded_vgg16s_and_each_instance_owns_them(tmp_path, monkeypatch):
    import torchvision.models

    monkeypatch.setattr("diffusion_course.losses._vgg16_checkpoint", lambda: tmp_path / "absent.pth")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = torchvision.models.vgg16(weights=None).features
    a, b = PerceptualLoss(), PerceptualLoss(layers=("relu1_2", "relu2_2"))
    for name, v in a.features.state_dict().items():
        assert torch.equal(v, reference.state_dict()[name]), name
    assert len(b.features) == 9 and torch.equal(b.features[0].weight, reference[0].weight)
    with torch.no_grad():
        a.features[0].weight.add_(1.0)  # one instance's weights are its own
    assert torch.equal(b.features[0].weight, reference[0].weight)
    assert torch.equal(PerceptualLoss().features[0].weight, reference[0].weight)
    other = PerceptualLoss(seed=1)
    assert not torch.equal(other.features[0].weight, reference[0].weight)
    # a weights file: the features of a whole VGG16 state dict are loaded
    state = {f"features.{k}": v + 0.5 for k, v in reference.state_dict().items()}
    torch.save({**state, "classifier.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    loaded = PerceptualLoss(weights_path=tmp_path / "vgg.pth")
    assert torch.equal(loaded.features[0].weight, reference[0].weight + 0.5)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        PerceptualLoss(weights_path=tmp_path / "other.pth")
