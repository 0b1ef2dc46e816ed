"""What lessons 05 and 06 added to the package: the rate-distortion bookkeeping (vae.rate_distortion), the
PatchGAN's geometry (computed, and measured from gradients) and AETrainer's hook for the autoencoder's loss."""
import math

import pytest
import torch

from diffusion_course import vae
from diffusion_course.ae_training import AETrainConfig, AETrainer
from diffusion_course.autoencoder import AutoencoderConfig
from diffusion_course.losses import (AutoencoderLoss, PatchDiscriminator, logit_input_gradient,
                                     measure_patchgan_geometry, patchgan_geometry)

torch.set_num_threads(min(2, torch.get_num_threads()))


# -- rate and distortion -------------------------------------------------------------------------------------------

def test_rate_distortion_by_hand_and_against_evaluate_vae():
    mu = torch.tensor([[1.0, 0.0, 0.2], [-1.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(0.5)]])
    x = torch.zeros(2, 2, 2, 2)
    x_hat = torch.ones(2, 2, 2, 2) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    rd = vae.rate_distortion(mu, logvar, x, x_hat)
    kl_dim2 = 0.5 * (0.04 + 1 - 1 - 0) / 2 + 0.5 * (0.5 - 1 - math.log(0.5)) / 2
    assert torch.allclose(rd["kl_per_dim"], torch.tensor([0.5, 0.0, kl_dim2]))
    assert rd["rate_nats"] == pytest.approx(0.5 + kl_dim2)
    assert rd["rate_bits"] == pytest.approx((0.5 + kl_dim2) / math.log(2))
    assert rd["bits_per_value"] == pytest.approx(rd["rate_bits"] / 8)
    assert rd["active_dims"] == 2 and isinstance(rd["active_dims"], int)
    assert vae.rate_distortion(mu, logvar, x, x_hat, active_threshold=0.1)["active_dims"] == 1
    assert rd["distortion"] == pytest.approx((8 * 1 + 8 * 4) / 2) and rd["distortion_per_value"] == pytest.approx(2.5)

    torch.manual_seed(0)
    model = vae.VAE(vae.VAEConfig(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), latent_dim=5,
                                  norm_groups=4))
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    ev = vae.evaluate_vae(model, images)
    m, lv = vae.encode_all(model, images)
    with torch.no_grad():
        rd = vae.rate_distortion(m, lv, images, model.decode(m))
    assert rd["rate_nats"] == pytest.approx(ev["rate"], rel=1e-5) and rd["active_dims"] == ev["active_dims"]
    assert rd["distortion"] == pytest.approx(ev["distortion"], rel=1e-5)
    assert torch.allclose(rd["kl_per_dim"], ev["kl_per_dim"])


def test_rate_distortion_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        vae.rate_distortion(torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="one code per image"):
        vae.rate_distortion(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2))


# -- the PatchGAN's geometry ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, layers", [(64, 3), (64, 2), (32, 1), (70, 3), (100, 4), (24, 3), (256, 3)])
def test_patchgan_geometry_matches_the_module_and_its_gradients(size, layers):
    geo = patchgan_geometry(size, layers)
    assert measure_patchgan_geometry(size, layers) == geo
    disc = PatchDiscriminator(3, 4, layers)
    assert disc(torch.randn(2, 3, size, size)).shape[-1] == geo.grid == disc.output_size(size)
    # on a random discriminator: the gradient of an interior logit is nonzero exactly on its window
    canvas = max(size, 2 * geo.receptive_field + 2 * geo.jump)
    i = disc.output_size(canvas) // 2
    grad = logit_input_gradient(disc, torch.randn(1, 3, canvas, canvas), i, i)
    rows = (grad > 0).any(1).nonzero().flatten()
    assert rows.min().item() == geo.first + i * geo.jump
    assert rows.max().item() - rows.min().item() + 1 == geo.receptive_field


def test_patchgan_geometry_known_values_and_errors():
    assert patchgan_geometry(256, 3) == (30, 70, 8, -23)      # pix2pix's 70x70 PatchGAN
    assert patchgan_geometry(64, 2) == (14, 34, 4, -11)
    with pytest.raises(ValueError, match="n_layers"):
        patchgan_geometry(64, 0)


def test_measuring_leaves_the_random_state_and_the_discriminator_mode_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    measure_patchgan_geometry(64, 2)
    assert torch.equal(torch.get_rng_state(), state)
    disc = PatchDiscriminator(1, 4, 1).train()
    logit_input_gradient(disc, torch.randn(1, 1, 16, 16), 2, 2)
    assert disc.training


def test_too_small_images_get_a_clear_error_before_the_convolutions_fail():
    for layers in (1, 2, 3):
        side = 3 * 2 ** layers                                  # the smallest side that gives one logit
        assert PatchDiscriminator(1, 4, layers)(torch.randn(1, 1, side, side)).shape[-1] == 1
        with pytest.raises(ValueError, match="too small"):
            PatchDiscriminator(1, 4, layers)(torch.randn(1, 1, side - 1, side - 1))


# -- AETrainer's autoencoder_loss_fn -------------------------------------------------------------------------------

def _trainer(reg="kl", **kw):
    cfg = AETrainConfig(dataset="digits", image_size=16, batch_size=4, steps=5, disc_start=2, disc_layers=1,
                        progress=False, device="cpu")
    ae = AutoencoderConfig.for_factor(4, in_channels=1, image_size=16, channels=8, latent_channels=3, regularizer=reg,
                                      n_embed=16, norm_groups=4)
    return AETrainer(cfg, ae, **kw)


@pytest.mark.parametrize("reg", ["kl", "vq"])
def test_the_package_loss_passed_as_the_hook_trains_exactly_like_the_default(reg):
    default = _trainer(reg)              # built and trained one after the other: each seeds the global generator
    default.train()
    hooked = _trainer(reg, autoencoder_loss_fn=AutoencoderLoss.autoencoder_loss)
    hooked.train()
    for key, values in default.history.items():
        assert values == pytest.approx(hooked.history[key], rel=1e-6, abs=1e-6), key
    assert default.history["d_weight"][-1] > 0                      # the GAN term was on at the end
    for a, b in zip(default.model.state_dict().values(), hooked.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_hook_is_called_with_the_loss_module_first_and_its_loss_is_the_one_trained():
    calls = []

    def doubled(ae_loss, x, out, step, last_layer, regularizer):
        calls.append((type(ae_loss).__name__, tuple(x.shape), step, tuple(last_layer.shape), regularizer))
        loss, logs = ae_loss.autoencoder_loss(x, out, step, last_layer, regularizer)
        return 2 * loss, logs

    trainer = _trainer(autoencoder_loss_fn=doubled)
    trainer.train(3)
    assert [c[2] for c in calls] == [0, 1, 2] and calls[0][0] == "AutoencoderLoss" and calls[0][4] == "kl"
    assert calls[0][1] == (4, 1, 16, 16) and calls[0][3] == tuple(trainer.model.decoder.last_layer.shape)
    assert trainer.history["loss"][0] == pytest.approx(2 * (trainer.history["rec"][0] + 1e-6 * trainer.history["reg"][0]),
                                                       rel=1e-5)


def test_a_hook_that_returns_the_wrong_things_is_refused_clearly():
    def no_logs(ae_loss, x, out, step, last_layer, regularizer):
        return ae_loss.autoencoder_loss(x, out, step, last_layer, regularizer)[0], {"rec": 1.0}

    with pytest.raises(TypeError, match="missing"):
        _trainer(autoencoder_loss_fn=no_logs).train(1)

    def detached(ae_loss, x, out, step, last_layer, regularizer):
        loss, logs = ae_loss.autoencoder_loss(x, out, step, last_layer, regularizer)
        return loss.detach(), logs

    with pytest.raises(TypeError, match="keeps its graph"):
        _trainer(autoencoder_loss_fn=detached).train(1)
    with pytest.raises(TypeError, match="must be a function"):
        _trainer(autoencoder_loss_fn="rec + kl")
