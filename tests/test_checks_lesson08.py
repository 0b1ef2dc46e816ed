"""Lesson 08's checkers accept the reference, hand back the reference for a stub, reject plausible mistakes
(naming them) and leave the learner's random state alone. Most tests here read the full hint, so they run
with ``set_hints("full")``; one checks the tiers."""
import pytest
import torch

from diffusion_course import checks
from diffusion_course.checks import ExerciseFailed, lesson08
from diffusion_course.ldm import inpaint_combine


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise: stub")


pytestmark = pytest.mark.usefixtures("full_hints")


def _ab(diffusion, t, z):
    return diffusion.alpha_bar[t].to(z.dtype).reshape(-1, 1, 1, 1)


def _mse(a, b):
    return ((a - b) ** 2).mean()


def _known(diffusion, z_known, t_prev, noise):
    return z_known if t_prev < 0 else diffusion.q_sample(z_known, t_prev, noise)


def good_encode(autoencoder, x, scale_factor):
    return autoencoder.encode(x) * scale_factor


def good_decode(autoencoder, z, scale_factor):
    return autoencoder.decode(z * (1.0 / scale_factor))


def good_l_cond(denoiser, diffusion, z0, cond, t, noise):
    """Written as a learner would: abar cast to float32 before the square roots."""
    ab = _ab(diffusion, t, z0)
    return _mse(noise, denoiser(ab.sqrt() * z0 + (1 - ab).sqrt() * noise, t, cond))


WRONG_ENCODE = [
    (lambda autoencoder, x, scale_factor: autoencoder.encode(x), "left out on encode"),
    (lambda autoencoder, x, scale_factor: autoencoder.encode(x) / scale_factor, "encode divides"),
]
WRONG_DECODE = [
    (lambda autoencoder, z, scale_factor: autoencoder.decode(z), "not undone on decode"),
    (lambda autoencoder, z, scale_factor: autoencoder.decode(z * scale_factor), "decode multiplies"),
]
WRONG_L_COND = [
    (lambda denoiser, diffusion, z0, cond, t, noise: _mse(noise, denoiser(z0, t, cond=cond)), "on z0 instead of z_t"),
    (lambda denoiser, diffusion, z0, cond, t, noise: _mse(noise, denoiser(
        _ab(diffusion, t, z0) * z0 + (1 - _ab(diffusion, t, z0)) * noise, t, cond=cond)), "without the square roots"),
    (lambda denoiser, diffusion, z0, cond, t, noise: _mse(noise, denoiser(diffusion.q_sample(z0, t, noise), t)),
     "the condition y never reaches the denoiser"),
    (lambda denoiser, diffusion, z0, cond, t, noise: _mse(noise, denoiser(
        diffusion.q_sample(z0, t + 1, noise), t, cond=cond)), "at t \\+ 1"),
    (lambda denoiser, diffusion, z0, cond, t, noise: _mse(z0, denoiser(
        diffusion.q_sample(z0, t, noise), t, cond=cond)), "with z0 instead of the noise"),
    (lambda denoiser, diffusion, z0, cond, t, noise: _mse(noise, denoiser(
        diffusion.q_sample(z0, t, noise), t, cond=cond)).detach(), "carries no gradient"),
]
WRONG_COMBINE = [
    (lambda diffusion, z_generated, z_known, keep, t_prev, noise: keep * z_known + (1 - keep) * z_generated,
     "clean z_known is blended"),
    (lambda diffusion, z_generated, z_known, keep, t_prev, noise:
     (1 - keep) * _known(diffusion, z_known, t_prev, noise) + keep * z_generated, "mask is inverted"),
    (lambda diffusion, z_generated, z_known, keep, t_prev, noise:
     inpaint_combine(diffusion, z_generated, z_known, keep, t_prev + 1, noise), "t_prev \\+ 1"),
    (lambda diffusion, z_generated, z_known, keep, t_prev, noise:
     keep * diffusion.q_sample(z_known, t_prev % diffusion.T, noise) + (1 - keep) * z_generated, "noised at t_prev = -1"),
    (lambda diffusion, z_generated, z_known, keep, t_prev, noise:
     keep * diffusion.q_sample(z_known, t_prev, noise) + (1 - keep) * z_generated, "t must lie in"),  # crashes at -1
]


def test_latent_codec_accepts_the_reference_and_a_learner_version(capsys):
    refs = (lesson08.ref_encode_to_latent, lesson08.ref_decode_from_latent)
    assert checks.check_latent_codec(*refs) == refs
    assert checks.check_latent_codec(good_encode, good_decode) == (good_encode, good_decode)
    out = capsys.readouterr().out
    assert "Exercise 8.1 (encode_to_latent): correct" in out and "Exercise 8.1 (decode_from_latent): correct" in out


def test_latent_codec_hands_back_the_reference_for_each_stub(capsys):
    refs = (lesson08.ref_encode_to_latent, lesson08.ref_decode_from_latent)
    assert checks.check_latent_codec(stub, stub) == refs
    assert checks.check_latent_codec(good_encode, stub) == (good_encode, refs[1])
    assert checks.check_latent_codec(stub, good_decode) == (refs[0], good_decode)
    assert "not implemented yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, what", WRONG_ENCODE, ids=[w for _, w in WRONG_ENCODE])
def test_latent_codec_rejects_a_wrong_encode(wrong, what):
    with pytest.raises(ExerciseFailed, match=f"(?s)(?=.*Exercise 8.1 \\(encode_to_latent\\): )"
                                             f"(?=.*Hint: encode_to_latent is wrong)(?=.*{what})"):
        checks.check_latent_codec(wrong, lesson08.ref_decode_from_latent)


@pytest.mark.parametrize("wrong, what", WRONG_DECODE, ids=[w for _, w in WRONG_DECODE])
def test_latent_codec_rejects_a_wrong_decode(wrong, what):
    with pytest.raises(ExerciseFailed, match=f"(?s)(?=.*Exercise 8.1 \\(decode_from_latent\\): )"
                                             f"(?=.*Hint: decode_from_latent is wrong)(?=.*{what})"):
        checks.check_latent_codec(lesson08.ref_encode_to_latent, wrong)


def test_l_cond_accepts_the_reference_and_a_learner_version(capsys):
    assert checks.check_l_cond(lesson08.ref_l_cond) is lesson08.ref_l_cond
    assert checks.check_l_cond(good_l_cond) is good_l_cond
    assert capsys.readouterr().out.count("Exercise 8.2: correct") == 2


def test_l_cond_hands_back_the_reference_for_a_stub(capsys):
    assert checks.check_l_cond(stub) is lesson08.ref_l_cond
    assert "not implemented yet" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, what", WRONG_L_COND, ids=[w for _, w in WRONG_L_COND])
def test_l_cond_rejects_plausible_mistakes(wrong, what):
    with pytest.raises(ExerciseFailed, match=f"(?s)(?=.*Exercise 8.2: )(?=.*on case 1 )(?=.*Hint: )(?=.*{what})"):
        checks.check_l_cond(wrong)


def test_inpaint_combine_accepts_the_reference_and_hands_it_back_for_a_stub(capsys):
    assert checks.check_inpaint_combine(lesson08.ref_inpaint_combine) is lesson08.ref_inpaint_combine
    assert checks.check_inpaint_combine(inpaint_combine) is inpaint_combine
    assert checks.check_inpaint_combine(stub) is lesson08.ref_inpaint_combine
    out = capsys.readouterr().out
    assert out.count("Exercise 8.3: correct") == 2 and "not implemented yet" in out


@pytest.mark.parametrize("wrong, what", WRONG_COMBINE, ids=[w for _, w in WRONG_COMBINE])
def test_inpaint_combine_rejects_plausible_mistakes(wrong, what):
    with pytest.raises(ExerciseFailed, match=f"(?s)(?=.*Exercise 8.3: )(?=.*t_prev = )(?=.*Hint: )(?=.*{what})"):
        checks.check_inpaint_combine(wrong)


def test_a_first_failure_names_the_mistake_with_a_nudge_and_the_second_gives_the_hint():
    checks.reset_hints()  # tiered
    wrong = WRONG_COMBINE[0][0]
    with pytest.raises(ExerciseFailed) as first:
        checks.check_inpaint_combine(wrong)
    text = str(first.value)
    assert "clean z_known is blended" in text and "Nudge: the known region" in text and "Hint:" not in text
    with pytest.raises(ExerciseFailed) as second:
        checks.check_inpaint_combine(wrong)
    assert "clean z_known is blended" in str(second.value) and "Hint: first noise the known latent" in str(second.value)


def test_a_detached_loss_fails_with_its_own_reason_on_the_first_case():
    with pytest.raises(ExerciseFailed, match="(?s)Exercise 8.2: the loss carries no gradient.*on case 1 ") as failed:
        checks.check_l_cond(WRONG_L_COND[-1][0])
    assert isinstance(failed.value.__cause__, checks.CaseRejected)


def _draws_noise(fn):
    def learner(*args, **kwargs):
        torch.randn(3)  # a learner's function that uses the global generator
        return fn(*args, **kwargs)
    return learner


@pytest.mark.parametrize("call", [
    lambda: checks.check_latent_codec(_draws_noise(lesson08.ref_encode_to_latent), lesson08.ref_decode_from_latent),
    lambda: checks.check_l_cond(_draws_noise(lesson08.ref_l_cond)),
    lambda: checks.check_inpaint_combine(_draws_noise(lesson08.ref_inpaint_combine)),
    lambda: checks.check_l_cond(WRONG_L_COND[0][0]),
], ids=["8.1", "8.2", "8.3", "8.2-failing"])
def test_checkers_leave_the_random_state_alone(call):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    try:
        call()
    except ExerciseFailed:
        pass
    assert torch.equal(torch.get_rng_state(), before)


def test_lesson08_checks_list_its_exercises():
    assert [c[0] for c in lesson08.CHECKS] == ["8.1", "8.2", "8.3"]
    assert all(getattr(checks, c[1].__name__) is c[1] for c in lesson08.CHECKS)
