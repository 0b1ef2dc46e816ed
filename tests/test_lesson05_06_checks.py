"""The checkers of lessons 05 and 06 that return more than one tensor (Exercises 5.4, 6.4 and 6.5) accept the
reference, hand it back for a stub, reject plausible mistakes with a reason that names the part, and leave the
learner's random state alone; every checker of the two lessons has a nudge of its own."""
import math

import pytest
import torch

from diffusion_course import checks
from diffusion_course.checks import ExerciseFailed, lesson05, lesson06
from diffusion_course.checks import _runner
from diffusion_course.losses import adaptive_weight, patchgan_geometry, pixel_loss

APART = lesson05.CHECKS_APART + lesson06.CHECKS_APART


@pytest.fixture(autouse=True)
def fresh_hints():
    _runner.reset_hints()
    yield
    _runner.reset_hints()


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise: stub")


# -- Exercise 5.4 --------------------------------------------------------------------------------------------------

def rd_with(**changes):
    """The reference bookkeeping with some entries computed the wrong way."""
    def fn(mu, logvar, x, x_hat, active_threshold=0.01):
        out = lesson05.ref_rate_distortion(mu, logvar, x, x_hat, active_threshold)
        kl = checks.ref_kl_to_standard_normal(mu, logvar)
        err = (x - x_hat).pow(2).flatten(1).sum(1)
        wrong = {
            "bits_times_ln2": dict(rate_bits=out["rate_nats"] * math.log(2)),
            "summed_over_images": dict(rate_nats=kl.sum().item()),
            "kl_per_dim_summed": dict(kl_per_dim=kl.sum(0)),
            "threshold_ignored": dict(active_dims=int((kl.mean(0) > 0.01).sum())),
            "per_pixel_without_channels": dict(distortion_per_value=err.mean().item() / (x.shape[-1] * x.shape[-2])),
            "distortion_mean_over_pixels": dict(distortion=err.mean().item() / x[0].numel()),
            "missing_key": {},
        }[changes["mistake"]]
        out.update(wrong)
        if changes["mistake"] == "missing_key":
            del out["bits_per_value"]
        return out
    return fn


@pytest.mark.parametrize("mistake, where", [
    ("bits_times_ln2", "'rate_bits'"), ("summed_over_images", "'rate_nats'"), ("kl_per_dim_summed", "'kl_per_dim'"),
    ("threshold_ignored", "'active_dims'"), ("per_pixel_without_channels", "'distortion_per_value'"),
    ("distortion_mean_over_pixels", "'distortion'"), ("missing_key", "'bits_per_value'")])
def test_rate_distortion_checker_names_the_wrong_entry(mistake, where):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 5.4: .*{where}.*Nudge"):
        checks.check_rate_distortion(rd_with(mistake=mistake))


# -- Exercise 6.4 --------------------------------------------------------------------------------------------------

def generator_loss(sign=1.0, gan_before_start=False, unweighted_reg=False, no_perceptual=False,
                   perceptual_once=False, detached_reg=False, as_number=False, no_adaptive=False, no_logs=False):
    """The learner's autoencoder loss, right by default, with one mistake switched on."""
    def fn(ae_loss, x, out, step, last_layer, regularizer):
        rec = pixel_loss(x, out.x_rec, ae_loss.pixel)
        if ae_loss.perceptual is not None and not no_perceptual:
            rec = rec + ae_loss.perceptual_weight * (1 if perceptual_once else x[0].numel()) * ae_loss.perceptual(
                x, out.x_rec)
        rec = rec.mean()
        reg = out.reg_loss.mean()
        weight = 1.0 if unweighted_reg else (ae_loss.kl_weight if regularizer == "kl" else ae_loss.codebook_weight)
        total = rec + weight * (reg.detach() if detached_reg else reg)
        logs = {"rec": rec.item(), "reg": reg.item(), "g": 0.0, "d_weight": 0.0}
        if ae_loss.discriminator is not None and (gan_before_start or step >= ae_loss.disc_start):
            g = -ae_loss.discriminator(out.x_rec).mean()
            lam = torch.tensor(1.0) if no_adaptive else adaptive_weight(rec, g, last_layer)
            total = total + sign * ae_loss.disc_weight * lam * g
            logs.update(g=g.item(), d_weight=(ae_loss.disc_weight * lam).item())
        if no_logs:
            logs = {"rec": logs["rec"]}
        return (total.item() if as_number else total), logs
    return fn


def test_generator_step_checker_accepts_a_learner_version_and_every_case_is_covered(capsys):
    mine = generator_loss()
    assert checks.check_autoencoder_loss(mine) is mine
    assert "Exercise 6.4: correct on 6" in capsys.readouterr().out
    cases = lesson06._GENERATOR_STEP_CASES
    assert {c[1] for c in cases} == {"kl", "vq"}
    assert any(c[2] < c[3] and c[5] > 0 for c in cases) and any(c[2] >= c[3] and c[5] > 0 for c in cases)
    assert {c[4] > 0 for c in cases} == {True, False} and any(c[5] == 0 for c in cases)


@pytest.mark.parametrize("mistake, message", [
    (dict(sign=-1.0), "wrong sign"),
    (dict(gan_before_start=True), "before disc_start"),
    (dict(unweighted_reg=True), "regulariser without its weight"),
    (dict(no_perceptual=True), "perceptual term left out"),
    (dict(perceptual_once=True), "once per image"),
    (dict(no_adaptive=True), "without the adaptive weight"),
    (dict(detached_reg=True), "gradient of the total at the encoder"),
    (dict(as_number=True), "expected a tensor"),
    (dict(no_logs=True), "logs must be a dict with the keys"),
])
def test_generator_step_checker_rejects_mistakes_with_a_reason(mistake, message):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 6.4: .*{message}"):
        checks.check_autoencoder_loss(generator_loss(**mistake))


def test_generator_step_checker_rejects_a_detached_total_and_a_lambda_with_a_graph():
    def detached(ae_loss, x, out, step, last_layer, regularizer):
        total, logs = lesson06.ref_autoencoder_loss(ae_loss, x, out, step, last_layer, regularizer)
        return total.detach(), logs

    with pytest.raises(ExerciseFailed, match="has no graph"):
        checks.check_autoencoder_loss(detached)

    def lam_with_graph(ae_loss, x, out, step, last_layer, regularizer):
        rec = pixel_loss(x, out.x_rec, ae_loss.pixel)
        if ae_loss.perceptual is not None:
            rec = rec + ae_loss.perceptual_weight * x[0].numel() * ae_loss.perceptual(x, out.x_rec)
        rec = rec.mean()
        w = ae_loss.kl_weight if regularizer == "kl" else ae_loss.codebook_weight
        total, logs = rec + w * out.reg_loss.mean(), {"rec": rec.item(), "reg": out.reg_loss.mean().item(),
                                                      "g": 0.0, "d_weight": 0.0}
        if ae_loss.discriminator is not None and step >= ae_loss.disc_start:
            g = -ae_loss.discriminator(out.x_rec).mean()
            g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True, create_graph=True)[0]
            g_adv = torch.autograd.grad(g, last_layer, retain_graph=True, create_graph=True)[0]
            lam = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4) * ae_loss.disc_weight   # not detached
            total = total + lam * g
            logs.update(g=g.item(), d_weight=lam.item())
        return total, logs

    with pytest.raises(ExerciseFailed, match="gradient of the total at the decoder's last layer"):
        checks.check_autoencoder_loss(lam_with_graph)


# -- Exercise 6.5 --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, field", [
    (lambda image_size, n_layers: (image_size / 2 ** n_layers - 2,) + tuple(patchgan_geometry(image_size, n_layers))[1:],
     "grid"),                                                                             # not an integer division
    (lambda image_size, n_layers: (image_size // 2 ** n_layers - 2, 1 + 3 * (n_layers + 2), 2 ** n_layers,
                                   -(n_layers + 2)), "receptive_field"),                  # kernels added, no jumps
    (lambda image_size, n_layers: tuple(patchgan_geometry(image_size, n_layers))[:3] + (0,), "first"),  # no padding
    (lambda image_size, n_layers: tuple(patchgan_geometry(image_size, n_layers))[:2] + (2 ** (n_layers + 2),
                                                                                         patchgan_geometry(image_size, n_layers).first),
     "jump"),                                                                             # stride-1 layers counted
    (lambda image_size, n_layers: tuple(patchgan_geometry(image_size, n_layers))[:3], "four integers"),
])
def test_patchgan_geometry_checker_names_the_wrong_number(wrong, field):
    with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 6.5: .*{field}"):
        checks.check_patchgan_geometry(wrong)


def test_patchgan_geometry_checker_takes_a_namedtuple_and_hands_back_the_package_function_for_a_stub(capsys):
    assert checks.check_patchgan_geometry(patchgan_geometry) is patchgan_geometry
    got = checks.check_patchgan_geometry(stub)
    assert "not implemented yet" in capsys.readouterr().out
    assert tuple(got(64, 3)) == (6, 70, 8, -23)


# -- every checker apart -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exercise, check, reference", APART, ids=[c[0] for c in APART])
def test_checker_accepts_its_reference_and_hands_it_back_for_a_stub(exercise, check, reference, capsys):
    assert check(reference) is reference
    assert f"Exercise {exercise}: correct" in capsys.readouterr().out
    fallback = check(stub)
    assert "not implemented yet" in capsys.readouterr().out
    assert fallback is reference or exercise == "6.5"


@pytest.mark.parametrize("exercise, check, reference", APART, ids=[c[0] for c in APART])
def test_checker_leaves_the_learners_random_state_alone(exercise, check, reference):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    check(reference)
    assert torch.equal(torch.get_rng_state(), state)


WRONG_ONE = {  # one plausible mistake per checker of the two lessons, to see its nudge
    "5.1": lambda mu, logvar, eps: mu + torch.exp(logvar) * eps,
    "5.2": lambda mu, logvar: mu ** 2 + torch.exp(logvar) - 1 - logvar,
    "5.3": lambda x, x_hat, mu, logvar, kl_weight: ((x - x_hat) ** 2).mean(),
    "5.4": rd_with(mistake="bits_times_ln2"),
    "6.1": lambda z, codebook: checks.ref_vq_quantize(z, codebook).detach(),
    "6.2": lambda logits_real, logits_fake: (1 - logits_real).mean() + (1 + logits_fake).mean(),
    "6.3": lambda rec_loss, g_loss, last_layer: checks.ref_adaptive_weight(g_loss, rec_loss, last_layer),
    "6.4": generator_loss(sign=-1.0),
    "6.5": lambda image_size, n_layers: (1, 1, 1, 0),
}
ALL = lesson05.CHECKS + lesson06.CHECKS + APART


@pytest.mark.parametrize("exercise, check, reference", ALL, ids=[c[0] for c in ALL])
def test_every_checker_nudges_first_and_gives_the_full_hint_second(exercise, check, reference):
    with pytest.raises(ExerciseFailed) as first:
        check(WRONG_ONE[exercise])
    text = str(first.value)
    assert "Nudge:" in text and _runner.GENERIC_NUDGE not in text and "Hint:" not in text
    with pytest.raises(ExerciseFailed, match="Hint:"):
        check(WRONG_ONE[exercise])
