"""The score view (diffusion_course.score, lesson 03): the conversions eps <-> score and Tweedie's formula against
autograd on Gaussians whose densities are known exactly, Langevin dynamics against the stationary law it must reach,
annealed Langevin sampling of Gaussian data with its exact score, bad input, and the checker of Exercise 3.4.

For data x_0 ~ N(mu, s^2 I) every marginal is Gaussian, q(x_t) = N(sqrt(abar_t) mu, v_t I) with
v_t = abar_t s^2 + 1 - abar_t, so its score is -(x_t - sqrt(abar_t) mu) / v_t, the optimal noise prediction is
eps(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / v_t, and the posterior mean is
E[x_0 | x_t] = mu + sqrt(abar_t) s^2 (x_t - sqrt(abar_t) mu) / v_t.
"""
import math

import pytest
import torch

from diffusion_course import checks, ddpm, score
from diffusion_course.checks import ExerciseFailed
from diffusion_course.checks import _runner

MU = torch.tensor([0.8, -0.4], dtype=torch.float64)
S = 0.3


def gaussian_log_density(x, mean, var):
    """log N(x; mean, var I) summed over the last axis, (B,)."""
    d = x.shape[-1]
    return -((x - mean) ** 2).sum(-1) / (2 * var) - 0.5 * d * math.log(2 * math.pi * var)


def exact_eps(diffusion, mu=MU, s=S):
    """The optimal eps_theta for data N(mu, s^2 I), as a plain function of (x_t, t) that counts its calls."""
    def eps(x, t):
        eps.calls += 1
        ab = diffusion.alpha_bar[t.cpu()].to(x)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu.to(x)) / (ab * s * s + 1 - ab)
    eps.calls = 0
    return eps


# -- the conversions --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ab", [0.999, 0.5, 0.01])
def test_score_of_q_xt_given_x0_is_minus_eps_over_sqrt_one_minus_abar(ab):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, generator=g, dtype=torch.float64)
    xt = (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps).requires_grad_(True)
    auto = torch.autograd.grad(gaussian_log_density(xt, math.sqrt(ab) * x0, 1 - ab).sum(), xt)[0]
    torch.testing.assert_close(score.eps_to_score(eps, ab), auto, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(score.score_to_eps(auto, ab), eps, rtol=1e-10, atol=1e-10)


def test_optimal_eps_is_the_scaled_score_of_the_marginal_and_tweedie_is_the_posterior_mean():
    diffusion = ddpm.GaussianDiffusion("linear", T=100)
    eps_fn = exact_eps(diffusion)
    g = torch.Generator().manual_seed(1)
    for i in (0, 10, 50, 99):
        ab = float(diffusion.alpha_bar[i])
        v = ab * S * S + 1 - ab
        xt = (math.sqrt(ab) * MU + math.sqrt(v) * torch.randn(32, 2, generator=g, dtype=torch.float64))
        xr = xt.clone().requires_grad_(True)
        auto = torch.autograd.grad(gaussian_log_density(xr, math.sqrt(ab) * MU, v).sum(), xr)[0]
        eps = eps_fn(xt, torch.full((32,), i))
        torch.testing.assert_close(score.eps_to_score(eps, ab), auto, rtol=1e-10, atol=1e-10)
        posterior_mean = MU + math.sqrt(ab) * S * S * (xt - math.sqrt(ab) * MU) / v
        torch.testing.assert_close(score.tweedie_x0(xt, auto, ab), posterior_mean, rtol=1e-9, atol=1e-9)
        # with the learned (here exact) score, Tweedie is the x0_hat of every sampler step
        torch.testing.assert_close(score.tweedie_x0(xt, score.eps_to_score(eps, ab), ab),
                                   diffusion.predict_x0_from_eps(xt, i, eps), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(score.model_score(diffusion, eps_fn, xt, i), auto, rtol=1e-10, atol=1e-10)


def test_a_batch_of_levels_broadcasts_over_images_and_keeps_the_dtype():
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(4, 1, 3, 3, generator=g)
    ab = torch.tensor([0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
    s = score.eps_to_score(eps, ab)
    assert s.dtype == torch.float32 and s.shape == eps.shape
    for k in range(4):
        torch.testing.assert_close(s[k], -eps[k] / math.sqrt(1 - float(ab[k])))
    torch.testing.assert_close(score.score_to_eps(s, ab), eps)
    torch.testing.assert_close(score.tweedie_x0(eps, s, ab)[2], (eps[2] + 0.9 * s[2]) / math.sqrt(0.1))


def test_conversions_reject_levels_without_noise_or_out_of_range():
    x = torch.zeros(2, 2)
    for bad in (1.0, 0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="abar_t"):
            score.eps_to_score(x, bad)
    with pytest.raises(ValueError, match="abar_t"):
        score.score_to_eps(x, torch.tensor([0.5, 1.0]))
    score.tweedie_x0(x, x, 1.0)  # no noise: Tweedie returns x_t itself, allowed
    with pytest.raises(ValueError, match="broadcast"):
        score.eps_to_score(x, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="one shape"):
        score.tweedie_x0(x, torch.zeros(2, 3), 0.5)


# -- Langevin dynamics ------------------------------------------------------------------------------------------

def test_langevin_steps_reach_the_mean_and_the_variance_of_a_gaussian():
    """x <- x + h/2 (-(x - m)/s^2) + sqrt(h) z is an AR(1) chain with stationary variance h / (1 - (1 - h/(2 s^2))^2)
    = s^2 / (1 - h / (4 s^2)): the exact law of the discretised chain, s^2 in the limit h -> 0."""
    m, s = torch.tensor([1.5, -2.0], dtype=torch.float64), 0.5
    score_fn = lambda x: -(x - m) / s ** 2  # noqa: E731
    g = torch.Generator().manual_seed(3)
    for h in (0.1 * s ** 2, 0.5 * s ** 2):
        x = torch.zeros(20000, 2, dtype=torch.float64)  # start far from the mean
        for _ in range(200):
            x = score.langevin_step(score_fn, x, h, torch.randn(x.shape, generator=g, dtype=torch.float64))
        var = s ** 2 / (1 - h / (4 * s ** 2))
        assert (x.mean(0) - m).abs().max() < 4 * math.sqrt(var / 20000)
        assert abs(x.var(0).mean().item() / var - 1) < 0.03
    assert abs(s ** 2 / (1 - 0.1 / 4) / s ** 2 - 1) < 0.03  # the small step's law is within 3% of N(m, s^2)


def test_langevin_step_rejects_bad_input():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="step size"):
        score.langevin_step(lambda v: v, x, 0.0, x)
    with pytest.raises(ValueError, match="step size"):
        score.langevin_step(lambda v: v, x, float("inf"), x)
    with pytest.raises(ValueError, match="z has shape"):
        score.langevin_step(lambda v: v, x, 0.1, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="score function returned"):
        score.langevin_step(lambda v: v[:, :1], x, 0.1, x)


def test_step_sizes_follow_the_noise_variance():
    diffusion = ddpm.GaussianDiffusion("linear", T=50)
    levels = [49, 20, 0]
    steps = score.langevin_step_sizes(diffusion, levels, 0.3)
    for t, step in zip(levels, steps):
        assert step == pytest.approx(0.3 * (1 - float(diffusion.alpha_bar[t])), rel=1e-12)
    # Song & Ermon's rule epsilon sigma_t^2 / sigma_L^2 in y = x / sqrt(abar) coordinates, times abar_t
    sigma2 = [(1 - float(diffusion.alpha_bar[t])) / float(diffusion.alpha_bar[t]) for t in levels]
    epsilon = 0.3 * sigma2[-1]
    for t, step, s2 in zip(levels, steps, sigma2):
        assert step == pytest.approx(float(diffusion.alpha_bar[t]) * epsilon * s2 / sigma2[-1], rel=1e-12)
    with pytest.raises(ValueError, match="array indices"):
        score.langevin_step_sizes(diffusion, [50], 0.3)
    with pytest.raises(ValueError, match="step_size"):
        score.langevin_step_sizes(diffusion, [3], -1.0)


def predicted_std(diffusion, levels, steps_per_level, step_size, s):
    """The exact std of annealed Langevin's output for data N(mu, s^2) with the exact score, per coordinate: every
    step is linear, x - sqrt(abar) mu <- (1 - h / (2 v)) (x - sqrt(abar) mu) + sqrt(h) z with v = abar s^2 + 1 - abar,
    so the variance follows var <- (1 - h / (2 v))^2 var + h, and a change of level multiplies it by abar'/abar."""
    seq, var = ddpm.timesteps(diffusion.T, levels), 1.0
    for k, t in enumerate(seq):
        ab = float(diffusion.alpha_bar[t])
        if k:
            var *= ab / float(diffusion.alpha_bar[seq[k - 1]])
        v, h = ab * s * s + 1 - ab, step_size * (1 - ab)
        for _ in range(steps_per_level):
            var = (1 - h / (2 * v)) ** 2 * var + h
    return math.sqrt(var)


@pytest.mark.parametrize("levels, steps_per_level, step_size", [(100, 10, 2.0), (20, 5, 0.2)])
def test_annealed_langevin_with_the_exact_score_samples_the_gaussian_data(levels, steps_per_level, step_size):
    diffusion = ddpm.GaussianDiffusion("linear", T=100)
    s = 0.5
    eps_fn = exact_eps(diffusion, s=s)
    n = 20000
    x = score.annealed_langevin_sample(diffusion, eps_fn, (n, 2), levels=levels, steps_per_level=steps_per_level,
                                       step_size=step_size, generator=torch.Generator().manual_seed(4))
    assert eps_fn.calls == levels * steps_per_level
    assert x.dtype == torch.float32 and x.shape == (n, 2)
    std = predicted_std(diffusion, levels, steps_per_level, step_size, s)
    assert (x.double().mean(0) - MU).abs().max() < 4 * std / math.sqrt(n)
    assert (x.double().std(0) / std - 1).abs().max() < 0.025      # the sampler is the documented recursion
    if levels * steps_per_level >= 1000:                          # and with enough steps it reaches N(mu, s^2)
        assert abs(std / s - 1) < 0.05 and (x.double().std(0) / s - 1).abs().max() < 0.06
    else:                                                         # with few, small steps it stays too wide
        assert std / s > 1.3


def test_annealed_langevin_is_seeded_counts_its_calls_and_is_the_written_out_loop():
    diffusion = ddpm.GaussianDiffusion("linear", T=30)
    eps_fn = exact_eps(diffusion)
    kwargs = dict(levels=6, steps_per_level=3, step_size=0.5)
    a = score.annealed_langevin_sample(diffusion, eps_fn, (64, 2), generator=torch.Generator().manual_seed(5), **kwargs)
    b, traj = score.annealed_langevin_sample(diffusion, eps_fn, (64, 2), generator=torch.Generator().manual_seed(5),
                                             return_trajectory=True, denoise=True, **kwargs)
    assert eps_fn.calls == 2 * 18 + 1
    seq = ddpm.timesteps(30, 6)
    assert traj.samples.shape == (6 + 2, 64, 2) and traj.t == [30] + [t + 1 for t in seq] + [0]
    torch.testing.assert_close(traj.samples[-2], a)  # the last Langevin iterate, before Tweedie
    # written out: x_T, then per level a rescale and steps_per_level Langevin steps, noise in that order
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 2, generator=g)
    for k, t in enumerate(seq):
        ab = float(diffusion.alpha_bar[t])
        if k:
            x = x * math.sqrt(ab / float(diffusion.alpha_bar[seq[k - 1]]))
        for _ in range(3):
            z = torch.randn(64, 2, generator=g)
            x = x + 0.25 * (1 - ab) * score.eps_to_score(eps_fn(x, torch.full((64,), t)), ab) \
                + math.sqrt(0.5 * (1 - ab)) * z
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-6)
    ab0 = float(diffusion.alpha_bar[seq[-1]])
    torch.testing.assert_close(b, diffusion.predict_x0_from_eps(a, seq[-1], eps_fn(a, torch.full((64,), seq[-1]))),
                               rtol=1e-5, atol=1e-6)
    assert ab0 < 1


def test_annealed_langevin_puts_a_module_back_in_training_mode_and_uses_given_noise(eval_only_net):
    diffusion = ddpm.GaussianDiffusion("linear", T=20)
    net = eval_only_net
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(6))
    out = score.annealed_langevin_sample(diffusion, net, (8, 2), levels=4, steps_per_level=2, x_T=x_T,
                                         generator=torch.Generator().manual_seed(7))
    again = score.annealed_langevin_sample(diffusion, net, (8, 2), levels=4, steps_per_level=2, x_T=x_T.clone(),
                                           generator=torch.Generator().manual_seed(7))
    assert net.training and torch.equal(out, again)


def test_annealed_langevin_rejects_bad_input():
    diffusion = ddpm.GaussianDiffusion("linear", T=20)
    eps_fn = exact_eps(diffusion)
    with pytest.raises(TypeError, match="GaussianDiffusion"):
        score.annealed_langevin_sample(eps_fn, diffusion, (4, 2))
    with pytest.raises(ValueError, match="steps_per_level"):
        score.annealed_langevin_sample(diffusion, eps_fn, (4, 2), levels=5, steps_per_level=0)
    with pytest.raises(ValueError, match="steps"):
        score.annealed_langevin_sample(diffusion, eps_fn, (4, 2), levels=21)
    with pytest.raises(ValueError, match="step_size"):
        score.annealed_langevin_sample(diffusion, eps_fn, (4, 2), levels=5, step_size=0.0)
    with pytest.raises(ValueError, match="x_T has shape"):
        score.annealed_langevin_sample(diffusion, eps_fn, (4, 2), levels=5, x_T=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="the model returned shape"):
        score.annealed_langevin_sample(diffusion, lambda x, t: x[:, :1], (4, 2), levels=5)
    with pytest.raises(FloatingPointError, match="too far apart"):
        score.annealed_langevin_sample(diffusion, lambda x, t: torch.full_like(x, float("nan")), (4, 2), levels=5)


# -- the checker of Exercise 3.4 --------------------------------------------------------------------------------

def stub(*args, **kwargs):
    raise NotImplementedError("Exercise 3.4: stub")


WRONG_LANGEVIN = [
    lambda score_fn, x, step_size, z: x + step_size * score_fn(x) + math.sqrt(step_size) * z,        # no 1/2
    lambda score_fn, x, step_size, z: x + 0.5 * step_size * score_fn(x) + step_size * z,             # step, not sqrt
    lambda score_fn, x, step_size, z: x - 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * z,  # downhill
    lambda score_fn, x, step_size, z: x + 0.5 * step_size * score_fn(x),                             # no noise
    lambda score_fn, x, step_size, z: x + 0.5 * math.sqrt(step_size) * score_fn(x) + math.sqrt(step_size) * z,
]


@pytest.fixture(autouse=True)
def fresh_hints():
    _runner.reset_hints()
    yield
    _runner.reset_hints()


def test_langevin_checker_is_listed_and_accepts_the_reference(capsys):
    exercise, check, reference = checks.lesson03.CHECKS[-1]
    assert exercise == "3.4" and check is checks.check_langevin_step and reference is checks.ref_langevin_step
    assert ("3.4", check, reference) in checks.ALL_CHECKS   # so tests/test_checks.py runs its generic tests too
    assert check(reference) is reference
    assert "Exercise 3.4: correct" in capsys.readouterr().out
    own = lambda score_fn, x, step_size, z: x + step_size / 2 * score_fn(x) + step_size ** 0.5 * z  # noqa: E731
    assert check(own) is own
    assert check(score.langevin_step) is score.langevin_step  # the package's version is the same thing


def test_langevin_checker_hands_back_the_reference_for_a_stub(capsys):
    assert checks.check_langevin_step(stub) is checks.ref_langevin_step
    assert "not implemented yet" in capsys.readouterr().out


@pytest.mark.parametrize("k", range(len(WRONG_LANGEVIN)))
def test_langevin_checker_rejects_plausible_mistakes_with_a_nudge_then_the_hint(k):
    with pytest.raises(ExerciseFailed, match="(?s)Exercise 3.4.*Nudge: Langevin dynamics climbs") as first:
        checks.check_langevin_step(WRONG_LANGEVIN[k])
    assert first.value.tier == "nudge" and "sqrt(step_size)" not in str(first.value)
    with pytest.raises(ExerciseFailed, match=r"(?s)Exercise 3.4.*Hint: x \+ \(step_size / 2\)") as second:
        checks.check_langevin_step(WRONG_LANGEVIN[k])
    assert second.value.tier == "hint"


def test_lesson03_checkers_all_give_a_nudge_first():
    wrong = {"3.1": lambda eps_model, x0, t, noise, alpha_bar: ((noise - eps_model(x0, t)) ** 2).mean(),
             "3.2": lambda eps_model, xt, t, z, betas: checks.ref_sampling_step(eps_model, xt, t, z, betas) + 1.0,
             "3.3": lambda eps, xt, alpha_bar_t, alpha_bar_prev: xt}
    for exercise, check, _ in checks.lesson03.CHECKS:
        with pytest.raises(ExerciseFailed) as err:
            check(wrong.get(exercise, WRONG_LANGEVIN[0]))
        message = str(err.value)
        assert err.value.tier == "nudge" and "Nudge: " in message
        assert _runner.GENERIC_NUDGE not in message, f"Exercise {exercise} has no nudge of its own"


def test_langevin_checker_leaves_the_learners_random_state_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    checks.check_langevin_step(checks.ref_langevin_step)
    with pytest.raises(ExerciseFailed):  # fresh noise from the global generator instead of z
        checks.check_langevin_step(lambda score_fn, x, step_size, z: x + 0.5 * step_size * score_fn(x)
                                   + math.sqrt(step_size) * torch.randn_like(x))
    assert torch.equal(torch.get_rng_state(), state)
