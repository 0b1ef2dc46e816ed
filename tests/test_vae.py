"""The VAE of lesson 05: shapes, the closed-form KL, the reparameterisation, the loss reductions, the plain
autoencoder mode, errors and a short training run."""
import math

import pytest
import torch

from diffusion_course import ddpm, vae
from diffusion_course.vae import VAE, VAEConfig


def small(**kw):
    base = dict(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_dim=4,
                norm_groups=4)
    base.update(kw)
    return VAEConfig(**base)


@pytest.mark.parametrize("kw, latent_shape", [
    (dict(), (4,)),
    (dict(latent_dim=2, num_res_blocks=2), (2,)),
    (dict(in_channels=3, image_size=12, latent_dim=7), (7,)),
    (dict(image_size=16, channel_mult=(1, 2, 2)), (4,)),
    (dict(latent_dim=None, latent_channels=3), (3, 4, 4)),
    (dict(latent_dim=None, latent_channels=2, image_size=16, channel_mult=(1, 1, 2)), (2, 4, 4)),
    (dict(channel_mult=(1,), latent_dim=None, latent_channels=1), (1, 8, 8)),
])
def test_shapes_for_several_configs(kw, latent_shape):
    torch.manual_seed(0)
    cfg = small(**kw)
    model = VAE(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    out = model(x)
    assert cfg.latent_shape == latent_shape
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3,) + latent_shape
    assert out.x_hat.shape == x.shape
    assert model.sample(5).shape == (5,) + x.shape[1:]
    assert model.reconstruct(x).shape == x.shape
    assert model.interpolate(x[0], x[1], steps=6).shape == (6,) + x.shape[1:]
    assert cfg.compression_ratio == pytest.approx(x[0].numel() / math.prod(latent_shape))


def test_kl_closed_form_matches_torch_distributions_and_normal_kl():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(64, 8, generator=g, dtype=torch.float64), 2 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    kl = vae.kl_to_standard_normal(mu, logvar)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p))
    torch.testing.assert_close(kl, ddpm.normal_kl(mu, logvar, torch.zeros(()), torch.zeros(())))
    assert (kl >= 0).all()
    assert vae.kl_to_standard_normal(torch.zeros(3), torch.zeros(3)).abs().max() == 0  # q = p


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    logvar = torch.tensor([0.0, -2.0, 1.0], dtype=torch.float64)
    n = 200_000
    z = vae.reparameterize(mu.expand(n, 3), logvar.expand(n, 3), torch.randn(n, 3, generator=g, dtype=torch.float64))
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    log_ratio = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(1)  # (n,)
    estimate, stderr = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    exact = vae.kl_to_standard_normal(mu, logvar).sum()
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_reparameterization_gradients_flow_to_mu_and_logvar():
    mu = torch.tensor([0.3, -0.7], requires_grad=True)
    logvar = torch.tensor([0.2, -1.0], requires_grad=True)
    eps = torch.tensor([1.5, -0.5], requires_grad=True)
    z = vae.reparameterize(mu, logvar, eps.detach())
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(2))                                # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps.detach())  # dz/dlogvar
    assert eps.grad is None


def test_reparameterization_samples_have_the_right_moments_and_generator_repeats():
    mu, logvar = torch.full((100_000,), 1.5), torch.full((100_000,), math.log(0.25))
    z = vae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert abs(z.mean() - 1.5) < 0.01 and abs(z.std() - 0.5) < 0.01
    again = vae.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    with pytest.raises(ValueError, match="same shape"):
        vae.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


def test_loss_reductions_are_as_documented():
    g = torch.Generator().manual_seed(2)
    x, x_hat = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    mu, logvar = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    out = vae.vae_loss(x, x_hat, mu, logvar, kl_weight=0.3)
    recon = sum(((x[b] - x_hat[b]) ** 2).sum() for b in range(5)) / 5   # summed over pixels, mean over batch
    kl_el = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)
    kl = sum(kl_el[b].sum() for b in range(5)) / 5                        # summed over dims, mean over batch
    torch.testing.assert_close(out.recon, recon)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.loss, recon + 0.3 * kl)
    torch.testing.assert_close(out.kl_per_dim, kl_el.mean(0))
    assert out.loss.ndim == 0
    # a spatial latent: kl_per_dim is one value per channel, summed over positions
    mu_s, logvar_s = torch.randn(5, 3, 2, 2, generator=g), torch.randn(5, 3, 2, 2, generator=g)
    out_s = vae.vae_loss(x, x_hat, mu_s, logvar_s, kl_weight=1.0)
    torch.testing.assert_close(out_s.kl_per_dim, vae.kl_to_standard_normal(mu_s, logvar_s).sum((2, 3)).mean(0))
    # the per-image totals do not change when the batch is duplicated (means, not sums, over the batch)
    out2 = vae.vae_loss(torch.cat([x, x]), torch.cat([x_hat, x_hat]), torch.cat([mu, mu]), torch.cat([logvar, logvar]), 0.3)
    torch.testing.assert_close(out2.loss, out.loss)


def test_model_loss_uses_the_given_eps_and_the_config_weight():
    torch.manual_seed(3)
    model = VAE(small(kl_weight=0.7))
    x = torch.randn(4, 1, 8, 8)
    eps = torch.randn(4, 4)
    out = model(x, eps=eps)
    torch.testing.assert_close(out.z, out.mu + torch.exp(0.5 * out.logvar) * eps)
    want = vae.vae_loss(x, out.x_hat, out.mu, out.logvar, 0.7)
    got = model.loss(x, eps=eps)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(model.loss(x, kl_weight=0.0, eps=eps).loss, want.recon)


def test_plain_autoencoder_mode_has_zero_kl_and_is_deterministic():
    torch.manual_seed(4)
    ae = VAE(small(variational=False, kl_weight=5.0))
    x = torch.randn(4, 1, 8, 8)
    a, b = ae(x), ae(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.z, a.mu)
    out = ae.loss(x)
    assert out.kl.item() == 0.0
    torch.testing.assert_close(out.loss, out.recon)
    torch.testing.assert_close(out.recon, vae.reconstruction_error(x, a.x_hat).mean())
    # the VAE with the same weights draws a different z every call
    vae_model = VAE(small())
    vae_model.load_state_dict(ae.state_dict())
    assert not torch.equal(vae_model(x).z, vae_model(x).z)
    assert torch.equal(vae_model.reconstruct(x), ae.reconstruct(x))  # D(mu) is shared


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="in_channels"):
        VAE(small())(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="8x8"):
        VAE(small())(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="down-sampling"):
        VAEConfig(image_size=18, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="down-sampling"):
        VAEConfig(image_size=2, channel_mult=(1, 1, 1))
    with pytest.raises(ValueError, match="latent_dim"):
        VAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="num_res_blocks"):
        VAEConfig(num_res_blocks=0)
    with pytest.raises(ValueError, match="kl_weight"):
        VAEConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="latents"):
        VAE(small()).decode(torch.randn(2, 5))
    with pytest.raises(ValueError, match="GroupNorm"):
        VAE(small(channels=6, norm_groups=4))


def test_training_reduces_the_loss_and_records_history():
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    images = torch.tanh(torch.randn(32, 1, 8, 8, generator=g))
    model = VAE(small(kl_weight=0.1))
    before = model.loss(images, eps=torch.zeros(32, 4)).loss.item()
    hist = vae.train_vae(model, images, steps=60, batch_size=16, lr=3e-3, generator=g, progress=False)
    after = model.loss(images, eps=torch.zeros(32, 4)).loss.item()
    assert after < 0.7 * before, (before, after)
    assert len(hist["loss"]) == len(hist["recon"]) == len(hist["kl"]) == 60
    assert hist["kl_per_dim"].shape == (60, 4)
    torch.testing.assert_close(hist["kl_per_dim"].sum(1), torch.tensor(hist["kl"]), rtol=1e-5, atol=1e-5)
    assert not model.training


def test_training_is_repeatable_with_a_generator():
    images = torch.tanh(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(6)))
    runs = []
    for _ in range(2):
        torch.manual_seed(6)
        model = VAE(small())
        runs.append(vae.train_vae(model, images, 5, batch_size=8, generator=torch.Generator().manual_seed(7),
                                  progress=False)["loss"])
    assert runs[0] == runs[1]


def test_nan_loss_stops_training():
    model = VAE(small())
    images = torch.randn(8, 1, 8, 8)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN|nan"):
        vae.train_vae(model, images, steps=3, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="steps"):
        vae.train_vae(model, images, steps=0, progress=False)


def test_evaluation_and_quality_metrics():
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    perfect = vae.reconstruction_quality(x, x)
    assert perfect["ssim"] == pytest.approx(1.0) and math.isinf(perfect["psnr"])
    noisy = x + 0.1 * torch.randn_like(x)
    q = vae.reconstruction_quality(x, noisy)
    mse = ((x - noisy.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    assert q["psnr"] == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), rel=1e-4)  # data range 2
    assert 0 < q["ssim"] < 1
    assert vae.reconstruction_quality(torch.zeros(2, 3, 5, 5), torch.zeros(2, 3, 5, 5))["ssim"] == pytest.approx(1.0)
    torch.manual_seed(8)
    model = VAE(small())
    images = torch.randn(10, 1, 8, 8).clamp(-1, 1)
    ev = vae.evaluate_vae(model, images, batch_size=4)
    mu, logvar = vae.encode_all(model, images, batch_size=3)
    assert ev["rate"] == pytest.approx(vae.kl_to_standard_normal(mu, logvar).sum(1).mean().item(), rel=1e-5)
    assert ev["distortion"] == pytest.approx(vae.reconstruction_error(images, model.reconstruct(images)).mean().item(), rel=1e-5)
    assert ev["kl_per_dim"].shape == (4,) and 0 <= ev["active_dims"] <= 4
    ae = VAE(small(variational=False))
    assert vae.evaluate_vae(ae, images)["rate"] == 0.0
