"""DPM-Solver++ 2M and the time-step spacings (diffusion_course.solvers, lesson 03).

The solver is checked against the paper's equations written out by hand, against DDIM where the two must agree,
and against the exact solution of the probability-flow ODE for Gaussian data, where eps_theta is known in closed
form: for x_0 ~ N(mu, s^2 I), x_t ~ N(sqrt(abar_t) mu, (abar_t s^2 + 1 - abar_t) I) and the optimal noise
prediction is eps(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t). The ODE then
moves every point along its own quantile, x_0 = mu + s (x_T - sqrt(abar_T) mu) / sqrt(abar_T s^2 + 1 - abar_T).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_course import ddpm, denoisers, guidance, solvers

MU = torch.tensor([0.8, -0.4], dtype=torch.float64)
S = 0.3


def gaussian_eps(diffusion, mu=MU, s=S):
    """The exact eps_theta(x_t, t) for data N(mu, s^2 I), as a plain function (no parameters)."""
    def eps(x, t):
        ab = diffusion.alpha_bar[t.cpu()].to(x.dtype)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu.to(x.dtype)) / (ab * s * s + 1 - ab)
    return eps


def exact_x0(diffusion, x_T, mu=MU, s=S):
    ab_T = diffusion.alpha_bar[-1]
    return mu + s * (x_T - ab_T.sqrt() * mu) / (ab_T * s * s + 1 - ab_T).sqrt()


def lambda_uniform_diffusion(T=1000, lam_max=6.0, lam_min=-6.0):
    """A schedule whose half log-SNR falls linearly with the index, so that the "linspace" grid is uniform in
    lambda (exactly where (T - 1) / (steps - 1) is an integer), the setting of the paper's convergence analysis."""
    lam = torch.linspace(lam_max, lam_min, T, dtype=torch.float64)
    alpha_bar = torch.sigmoid(2 * lam)  # abar = e^(2 lambda) / (1 + e^(2 lambda))
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return ddpm.GaussianDiffusion(1 - alpha_bar / prev)


def errors(diffusion, steps, **kwargs):
    """Mean distance to the exact ODE solution of DPM-Solver++ 2M and of DDIM (eta = 0) at each step count."""
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact, eps = exact_x0(diffusion, x_T), gaussian_eps(diffusion)
    out = {"dpm": [], "ddim": []}
    for n in steps:
        dpm = solvers.dpm_solver_pp_2m_sample(diffusion, eps, x_T.shape, steps=n, x_T=x_T, **kwargs)
        ddim = diffusion.ddim_sample(eps, x_T.shape, steps=n, x_T=x_T, progress=False)
        out["dpm"].append((dpm - exact).norm(dim=1).mean().item())
        out["ddim"].append((ddim - exact).norm(dim=1).mean().item())
    return out


# -- spacings --------------------------------------------------------------------------------------

def test_spacings_on_small_cases_computed_by_hand():
    # T = 10, 3 steps. linspace: round(0, 4.5, 9) with halves to even -> 0, 4, 9.
    assert solvers.timesteps(10, 3, "linspace") == [9, 4, 0]
    # leading: T // steps = 3, so 0, 3, 6, shifted up by one (Stable Diffusion's steps_offset = 1).
    assert solvers.timesteps(10, 3, "leading") == [7, 4, 1]
    # trailing: 10, 6.67, 3.33 rounded to 10, 7, 3, minus one.
    assert solvers.timesteps(10, 3, "trailing") == [9, 6, 2]
    # T = 10, 4 steps: linspace 0, 3, 6, 9; leading 2 * (0..3) + 1; trailing 10, 7.5, 5, 2.5 -> 10, 8, 5, 2 (-1).
    assert solvers.timesteps(10, 4, "linspace") == [9, 6, 3, 0]
    assert solvers.timesteps(10, 4, "leading") == [7, 5, 3, 1]
    assert solvers.timesteps(10, 4, "trailing") == [9, 7, 4, 1]
    # the conventions' own examples: Stable Diffusion's 50 steps of 1000, and the trailing grid
    assert solvers.timesteps(1000, 50, "leading") == list(range(981, 0, -20))
    assert solvers.timesteps(1000, 50, "trailing") == list(range(999, 0, -20))
    assert solvers.timesteps(1000, 1, "trailing") == [999] and solvers.timesteps(1000, 1, "leading") == [1]


@pytest.mark.parametrize("spacing", solvers.SPACINGS)
def test_spacings_are_decreasing_distinct_indices_in_range(spacing):
    for T in (1, 2, 7, 10, 40, 1000):
        for steps in sorted({min(k, T) for k in (1, 2, 3, T // 3, T // 2, T - 1, T) if k >= 1}):
            ab = ddpm.GaussianDiffusion("linear", T=T).alpha_bar if spacing == "logsnr" else None
            seq = solvers.timesteps(T, steps, spacing, ab)
            assert len(seq) == steps and all(isinstance(i, int) for i in seq)
            assert all(a > b for a, b in zip(seq, seq[1:])), (T, steps, seq)
            assert 0 <= seq[-1] and seq[0] <= T - 1
    # every index when steps = T (the leading grid's shift would leave the table there, so it is dropped)
    ab = ddpm.GaussianDiffusion("linear", T=40).alpha_bar if spacing == "logsnr" else None
    assert solvers.timesteps(40, 40, spacing, ab) == list(range(39, -1, -1))


def test_logsnr_spacing_is_even_in_lambda():
    """Its levels' half log-SNR steps are as even as integer indices allow: far more even than the linspace
    grid's, whose last steps are the longest in lambda; it starts at T - 1 and ends at 0."""
    d = ddpm.GaussianDiffusion("linear", T=1000)
    lam = lambda seq: [solvers.half_log_snr(float(d.alpha_bar[i])) for i in seq]  # noqa: E731
    # (10 and 25 steps: within 10% of even; at 50 the last levels are forced onto indices 3, 2, 1, 0, whose gaps
    # in lambda are set by the table; every longest gap is at least 3 times shorter than the linspace grid's)
    for steps, spread in ((10, 0.1), (25, 0.1), (50, 1.0)):
        seq = solvers.timesteps(1000, steps, "logsnr", d.alpha_bar)
        assert seq[0] == 999 and seq[-1] == 0 and seq == d.ddim_timesteps(steps, "logsnr")
        gaps = np.diff(lam(seq))
        even = (lam([0])[0] - lam([999])[0]) / (steps - 1)
        lin_gaps = np.diff(lam(solvers.timesteps(1000, steps, "linspace")))
        assert (1 - spread) * even < gaps.min() and gaps.max() < (1 + spread) * even, (steps, gaps / even)
        assert lin_gaps.max() > 3 * gaps.max()
    assert solvers.timesteps(1000, 1, "logsnr", d.alpha_bar) == [999]
    with pytest.raises(ValueError, match="needs the schedule"):
        solvers.timesteps(1000, 10, "logsnr")
    with pytest.raises(ValueError, match="decreasing"):
        solvers.timesteps(3, 2, "logsnr", torch.tensor([0.5, 0.6, 0.7]))


def test_linspace_is_the_ddim_grid():
    diffusion = ddpm.GaussianDiffusion("linear", T=1000)
    for steps in (1, 2, 3, 7, 10, 50, 333, 999, 1000):
        assert solvers.timesteps(1000, steps, "linspace") == diffusion.ddim_timesteps(steps)


def test_spacings_reject_bad_arguments():
    with pytest.raises(ValueError, match="unknown spacing 'uniform'; valid: linspace, leading, trailing, logsnr"):
        solvers.timesteps(1000, 10, "uniform")
    for steps in (0, 1001, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="1 <= steps <= T = 1000"):
            solvers.timesteps(1000, steps)
    with pytest.raises(ValueError, match="T must be a positive integer"):
        solvers.timesteps(0, 1)


# -- the pieces of a step ------------------------------------------------------------------------------

def test_half_log_snr():
    for ab in (1e-5, 0.3, 0.5, 0.99):
        assert solvers.half_log_snr(ab) == pytest.approx(math.log(math.sqrt(ab) / math.sqrt(1 - ab)), rel=1e-12)
    assert solvers.half_log_snr(0.5) == 0.0 and solvers.half_log_snr(1.0) == math.inf
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="abar must lie in"):
            solvers.half_log_snr(bad)


def test_first_order_update_is_the_ddim_step_and_returns_x0_at_the_data():
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    ab_s, ab_t = 0.2, 0.7
    eps = (x - math.sqrt(ab_s) * x0) / math.sqrt(1 - ab_s)  # the noise direction DDIM reuses
    ddim = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
    torch.testing.assert_close(solvers.dpm_solver_pp_update(x, x0, ab_s, ab_t), ddim, rtol=0, atol=1e-12)
    assert torch.equal(solvers.dpm_solver_pp_update(x, x0, ab_s, 1.0), x0)
    with pytest.raises(ValueError, match="towards the data"):
        solvers.dpm_solver_pp_update(x, x0, ab_t, ab_s)
    with pytest.raises(ValueError, match="shape"):
        solvers.dpm_solver_pp_update(x, x0[:, :2], ab_s, ab_t)


def test_multistep_estimate_is_the_papers_D():
    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    h, h_prev = 0.3, 0.6
    r = h_prev / h
    expected = (1 + 1 / (2 * r)) * a - 1 / (2 * r) * b
    torch.testing.assert_close(solvers.multistep_x0(a, b, h, h_prev), expected, rtol=0, atol=1e-15)
    for bad in ((math.inf, 0.5), (0.5, 0.0), (-0.1, 0.5)):
        with pytest.raises(ValueError, match="finite step sizes"):
            solvers.multistep_x0(a, b, *bad)


# -- the sampler against DDIM and against the paper ------------------------------------------------------

def toy_model(T):
    torch.manual_seed(0)
    return denoisers.ToyMLP(T, hidden=16, depth=2).double()


def test_one_and_two_steps_equal_ddim_and_the_first_step_always_does():
    diffusion = ddpm.GaussianDiffusion("linear", T=100)
    model = toy_model(100)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 2):  # step 1 has no history, the last step goes to abar = 1: both first order
        ours = solvers.dpm_solver_pp_2m_sample(diffusion, model, x_T.shape, steps=steps, x_T=x_T)
        ddim = diffusion.ddim_sample(model, x_T.shape, steps=steps, eta=0.0, x_T=x_T, progress=False)
        torch.testing.assert_close(ours, ddim, rtol=0, atol=1e-12)
    ours, traj = solvers.dpm_solver_pp_2m_sample(diffusion, model, x_T.shape, steps=10, x_T=x_T,
                                                 return_trajectory=True)
    ddim, ddim_traj = diffusion.ddim_sample(model, x_T.shape, steps=10, x_T=x_T, progress=False,
                                            return_trajectory=True)
    torch.testing.assert_close(traj.samples[1], ddim_traj.samples[1], rtol=0, atol=1e-12)  # after step 1
    assert (traj.samples[2] - ddim_traj.samples[2]).abs().max() > 1e-6  # step 2 is second order
    assert traj.t == ddim_traj.t and traj.samples.shape == ddim_traj.samples.shape == (11, 64, 2)
    assert torch.equal(traj.samples[0], x_T) and torch.equal(traj.samples[-1], ours)


def test_three_steps_follow_the_papers_algorithm_by_hand():
    """Algorithm 2 of Lu et al. with M = 3 levels, written out from its equations with the abar table."""
    diffusion = ddpm.GaussianDiffusion("linear", T=100)
    model = toy_model(100)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seq = solvers.timesteps(100, 3, "trailing")  # 99, 65, 32: no step more than twice the one before
    a = [float(diffusion.alpha_bar[i]) for i in seq] + [1.0]
    lam = [0.5 * math.log(v / (1 - v)) for v in a[:3]] + [math.inf]
    sig = [math.sqrt(1 - v) for v in a]

    def x0_hat(x, i):
        eps = model(x, torch.full((len(x),), i))
        return (x - math.sqrt(1 - diffusion.alpha_bar[i].item()) * eps) / math.sqrt(diffusion.alpha_bar[i].item())

    q0 = x0_hat(x, seq[0])
    h1 = lam[1] - lam[0]
    x1 = sig[1] / sig[0] * x - math.sqrt(a[1]) * (math.exp(-h1) - 1) * q0
    q1 = x0_hat(x1, seq[1])
    h2 = lam[2] - lam[1]
    r2 = h1 / h2
    d2 = (1 + 1 / (2 * r2)) * q1 - 1 / (2 * r2) * q0
    x2 = sig[2] / sig[1] * x1 - math.sqrt(a[2]) * (math.exp(-h2) - 1) * d2
    x3 = x0_hat(x2, seq[2])  # the last step, to abar = 1, is first order: x_0 is the last estimate
    for lof in (True, False):
        ours = solvers.dpm_solver_pp_2m_sample(diffusion, model, x.shape, steps=3, spacing="trailing", x_T=x,
                                               lower_order_final=lof)
        torch.testing.assert_close(ours, x3, rtol=0, atol=1e-10)


def test_lower_order_final_only_touches_the_long_step_into_the_last_level():
    diffusion = ddpm.GaussianDiffusion("linear", T=1000)
    for spacing in ("linspace", "leading"):
        for steps in (5, 10, 20, 50):
            seq = solvers.timesteps(1000, steps, spacing)
            lam = [solvers.half_log_snr(float(diffusion.alpha_bar[i])) for i in seq]
            h = np.diff(lam)
            long_steps = [k + 1 for k in range(len(h) - 1) if h[k + 1] > 2 * h[k]]
            assert long_steps == [len(h) - 1], (spacing, steps)  # only the step into seq[-1]
    seq = solvers.timesteps(1000, 20, "trailing")
    h = np.diff([solvers.half_log_snr(float(diffusion.alpha_bar[i])) for i in seq])
    assert all(h[1:] <= 2 * h[:-1])
    model = toy_model(1000)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    run = lambda sp, lof: solvers.dpm_solver_pp_2m_sample(diffusion, model, x_T.shape, steps=20,  # noqa: E731
                                                          spacing=sp, x_T=x_T, lower_order_final=lof)
    assert torch.equal(run("trailing", True), run("trailing", False))
    assert not torch.allclose(run("linspace", True), run("linspace", False))


# -- convergence to the exact ODE solution --------------------------------------------------------------

def test_second_order_convergence_on_a_uniform_lambda_grid():
    """The setting of the paper's analysis: steps of equal length in lambda. Doubling the steps divides the
    error of DPM-Solver++ 2M by about 4 (second order) and DDIM's by about 2 (first order)."""
    err = errors(lambda_uniform_diffusion(), (20, 40, 80))
    dpm_ratios = [err["dpm"][k] / err["dpm"][k + 1] for k in range(2)]
    ddim_ratios = [err["ddim"][k] / err["ddim"][k + 1] for k in range(2)]
    assert all(r > 3.3 for r in dpm_ratios), (err, dpm_ratios)
    assert all(1.8 < r < 2.2 for r in ddim_ratios), (err, ddim_ratios)
    assert all(d < c / 5 for d, c in zip(err["dpm"][1:], err["ddim"][1:])), err


def test_beats_ddim_on_the_course_schedule_and_reaches_the_exact_solution():
    """The linear schedule with the DDIM grid: more accurate than DDIM at every step count, the error falls
    much faster than DDIM's once the steps are fine enough, and with 1000 steps the solver is exact up to the
    one step from t = 1 to the data (x0_hat at abar_1 instead of abar = 1, about 1e-4 here)."""
    diffusion = ddpm.GaussianDiffusion("linear", T=1000)
    err = errors(diffusion, (10, 20, 40, 80, 1000))
    assert all(d < c for d, c in zip(err["dpm"], err["ddim"])), err
    assert err["dpm"][1] / err["dpm"][2] > 3.0 and err["ddim"][1] / err["ddim"][2] < 2.2, err
    assert err["dpm"][3] < err["ddim"][3] / 10, err
    assert err["dpm"][-1] < 2e-4 < err["ddim"][-1], err
    # the paper's Algorithm 2 verbatim extrapolates over the grid's long last step, and is worse for it
    verbatim = errors(diffusion, (20, 40), lower_order_final=False)
    assert verbatim["dpm"][0] > 1.5 * err["dpm"][1] and verbatim["dpm"][1] > 2 * err["dpm"][2], (err, verbatim)


# -- the sampler's contract --------------------------------------------------------------------------

class ModeRecorder(nn.Module):
    """eps = 0.1 x, remembering whether it ran in training mode."""

    def __init__(self, out_shape=None):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.1))
        self.modes, self.out_shape = [], out_shape

    def forward(self, x, t, scale=1.0):
        self.modes.append(self.training)
        eps = self.weight * x * scale
        return eps if self.out_shape is None else eps[..., : self.out_shape]


def test_eval_mode_no_grad_model_kwargs_and_determinism():
    diffusion = ddpm.GaussianDiffusion("linear", T=50)
    model = ModeRecorder().train()
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = solvers.dpm_solver_pp_2m_sample(diffusion, model, (4, 3), steps=5, generator=seeded())
    assert model.modes == [False] * 5 and model.training  # exactly `steps` network calls, in eval mode
    assert out.shape == (4, 3) and out.dtype == torch.float32 and not out.requires_grad
    again = solvers.dpm_solver_pp_2m_sample(diffusion, model, (4, 3), steps=5, generator=seeded())
    assert torch.equal(out, again)
    scaled = solvers.dpm_solver_pp_2m_sample(diffusion, model, (4, 3), steps=5, model_kwargs={"scale": 2.0},
                                             generator=seeded())
    assert not torch.allclose(scaled, out)
    bad = ModeRecorder(out_shape=2).train()
    with pytest.raises(ValueError, match="must have the input's shape"):
        solvers.dpm_solver_pp_2m_sample(diffusion, bad, (4, 3), steps=5)
    assert bad.training  # restored after the error too


def test_clip_x0_clamps_every_estimate_and_follows_the_diffusion_default():
    diffusion = ddpm.GaussianDiffusion("linear", T=50)
    push_out = lambda x, t: -3.0 * torch.ones_like(x)  # noqa: E731  (x0_hat far above 1 at every step)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    free = solvers.dpm_solver_pp_2m_sample(diffusion, push_out, x_T.shape, steps=6, x_T=x_T)
    clipped = solvers.dpm_solver_pp_2m_sample(diffusion, push_out, x_T.shape, steps=6, x_T=x_T, clip_x0=True)
    assert free.max() > 2 and clipped.abs().max() <= 1.0
    diffusion.clip_x0 = True
    assert torch.equal(solvers.dpm_solver_pp_2m_sample(diffusion, push_out, x_T.shape, steps=6, x_T=x_T), clipped)
    assert torch.equal(solvers.dpm_solver_pp_2m_sample(diffusion, push_out, x_T.shape, steps=6, x_T=x_T,
                                                       clip_x0=False), free)


class ConditionalGaussians(nn.Module):
    """An exact conditional eps-model: class y has data N(means[y], S^2 I); the null condition N(0, S^2 I)."""

    def __init__(self, diffusion, means):
        super().__init__()
        self.diffusion = diffusion
        self.register_buffer("means", means)

    def forward(self, x, t, cond, drop):
        mu = torch.where(drop[:, None], torch.zeros_like(self.means[cond]), self.means[cond])
        ab = self.diffusion.alpha_bar[t.cpu()].to(x.dtype)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * S * S + 1 - ab)


def test_classifier_free_guidance_wrapper_works_with_the_solver():
    diffusion = ddpm.GaussianDiffusion("linear", T=200)
    net = ConditionalGaussians(diffusion, torch.tensor([[1.0, 0.0], [-0.5, 0.5]], dtype=torch.float64))
    cond = torch.tensor([0, 1, 1, 0])
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample = lambda model: solvers.dpm_solver_pp_2m_sample(diffusion, model, x_T.shape, steps=40, x_T=x_T,  # noqa
                                                           model_kwargs={"cond": cond})
    guided = sample(guidance.ClassifierFreeGuidance(net, scale=3.0))

    def by_hand(x, t, cond):
        e_c = net(x, t, cond=cond, drop=torch.zeros(len(x), dtype=torch.bool))
        e_u = net(x, t, cond=cond, drop=torch.ones(len(x), dtype=torch.bool))
        return e_u + 3.0 * (e_c - e_u)

    torch.testing.assert_close(guided, sample(by_hand), rtol=0, atol=1e-10)
    conditional = sample(guidance.ClassifierFreeGuidance(net, scale=1.0))
    # scale 1 is the conditional model: its samples land near mu_y + S z, the exact ODE solution per class
    exact = exact_x0(diffusion, x_T, mu=net.means[cond], s=S)
    assert (conditional - exact).norm(dim=1).max() < 0.03
    # guidance pushes the samples further along mu_y - mu_null = mu_y
    assert ((guided - conditional) * net.means[cond]).sum(1).min() > 0


def test_sampler_rejects_bad_arguments():
    diffusion = ddpm.GaussianDiffusion("linear", T=50)
    eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="1 <= steps <= T = 50"):
        solvers.dpm_solver_pp_2m_sample(diffusion, eps, (2, 2), steps=51)
    with pytest.raises(ValueError, match="1 <= steps <= T = 50"):
        solvers.dpm_solver_pp_2m_sample(diffusion, eps, (2, 2), steps=0)
    with pytest.raises(ValueError, match="unknown spacing"):
        solvers.dpm_solver_pp_2m_sample(diffusion, eps, (2, 2), spacing="karras")
    with pytest.raises(ValueError, match="x_T has shape"):
        solvers.dpm_solver_pp_2m_sample(diffusion, eps, (2, 2), x_T=torch.zeros(3, 2))
    with pytest.raises(TypeError, match="must be a GaussianDiffusion"):
        solvers.dpm_solver_pp_2m_sample(eps, diffusion, (2, 2))


def test_ddim_samples_on_every_spacing():
    """DDIM takes the same grids as the solver: its first step from x_T lands on the grid's second level."""
    d = ddpm.GaussianDiffusion("linear", T=100)
    for spacing in ("linspace", "leading", "trailing", "logsnr"):
        assert d.ddim_timesteps(10, spacing) == solvers.timesteps(100, 10, spacing, d.alpha_bar)
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    lead = d.ddim_sample(lambda x, t: 0.1 * x, (3, 2), steps=10, x_T=x_T, progress=False, spacing="leading")
    trail = d.ddim_sample(lambda x, t: 0.1 * x, (3, 2), steps=10, x_T=x_T, progress=False, spacing="trailing")
    assert lead.shape == trail.shape == (3, 2) and not torch.allclose(lead, trail)
    with pytest.raises(ValueError, match="unknown spacing"):
        d.ddim_timesteps(10, "uniform")


def test_sample_with_dispatches_to_each_sampler():
    d = ddpm.GaussianDiffusion("linear", T=50)
    model = lambda x, t: 0.1 * x
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(5))
    run = lambda name, **kw: solvers.sample_with(d, model, (3, 2), name, x_T=x_T, **kw)
    assert torch.equal(run("ddim", steps=7), d.ddim_sample(model, (3, 2), steps=7, x_T=x_T, progress=False))
    assert torch.equal(run("dpmpp2m", steps=7), solvers.dpm_solver_pp_2m_sample(d, model, (3, 2), steps=7, x_T=x_T))
    assert torch.equal(run("dpmpp2m"), solvers.dpm_solver_pp_2m_sample(d, model, (3, 2), steps=20, x_T=x_T))
    assert torch.equal(run("ddpm", generator=torch.Generator().manual_seed(1)),
                       d.sample(model, (3, 2), x_T=x_T, generator=torch.Generator().manual_seed(1), progress=False))
    with pytest.raises(ValueError, match="all T = 50 steps"):
        run("ddpm", steps=10)
    with pytest.raises(ValueError, match="eta must be 0"):
        run("dpmpp2m", eta=0.5)
    with pytest.raises(ValueError, match="valid: ddim, ddpm, dpmpp2m"):
        run("euler")


def test_the_trainer_and_the_cli_sample_with_dpm_solver(tmp_path):
    from diffusion_course.__main__ import main
    from diffusion_course.nn import UNetConfig
    from diffusion_course.training import TrainConfig, Trainer, sample_images

    unet = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,),
                      num_res_blocks=1, attention_resolutions=(), norm_groups=4)
    trainer = Trainer(TrainConfig(dataset="digits", image_size=8, steps=2, batch_size=4, T=20, sampler="dpmpp2m",
                                  sample_steps=4, out=str(tmp_path / "run"), progress=False), unet)
    trainer.train()
    images = sample_images(trainer.ema, trainer.diffusion, 3, "dpmpp2m", steps=4, progress=False)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "g.png"),
                 "--sampler", "dpmpp2m", "--steps", "4", "--n", "4"]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "g3.png"),
                 "--sampler", "dpmpp3m_sde", "--spacing", "logsnr", "--eta", "0.5", "--steps", "5", "--n", "4"]) == 0
    assert (tmp_path / "g3.png").is_file()
    a = sample_images(trainer.ema, trainer.diffusion, 3, "dpmpp3m", steps=5, progress=False, spacing="logsnr")
    b = sample_images(trainer.ema, trainer.diffusion, 3, "dpmpp3m", steps=5, progress=False)
    assert not torch.equal(a, b)                                                # the grid reaches the sampler


def test_one_step_starts_at_the_noisiest_level():
    """With one network call, every grid evaluates the model where x_T is (index T - 1 or near it), never at
    index 0 on pure noise; the one DDIM step then returns its x_0 prediction from x_T."""
    d = ddpm.GaussianDiffusion("linear", T=100)
    assert d.ddim_timesteps(1) == solvers.timesteps(100, 1, "linspace") == [99]
    seen = []
    model = lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x)
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = d.ddim_sample(model, (2, 3), steps=1, x_T=x_T, progress=False)
    assert seen == [99]
    assert torch.allclose(out, x_T / d.sqrt_alpha_bar[99].float())  # x0_hat with eps = 0


# -- the stochastic form: DPM-Solver++ 2M SDE ------------------------------------------------------------

def test_first_order_sde_update_is_the_ddim_step_with_eta_one():
    g = torch.Generator().manual_seed(3)
    x, x0, z = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    ab_s, ab_t = 0.2, 0.7
    eps = (x - math.sqrt(ab_s) * x0) / math.sqrt(1 - ab_s)
    s = math.sqrt((1 - ab_t) / (1 - ab_s)) * math.sqrt(1 - ab_s / ab_t)          # DDIM's sigma with eta = 1
    ddim = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t - s * s) * eps + s * z
    torch.testing.assert_close(solvers.dpm_solver_pp_sde_update(x, x0, ab_s, ab_t, z), ddim, rtol=0, atol=1e-12)
    assert torch.equal(solvers.dpm_solver_pp_sde_update(x, x0, ab_s, 1.0, z), x0)
    with pytest.raises(ValueError, match="towards the data"):
        solvers.dpm_solver_pp_sde_update(x, x0, ab_t, ab_s, z)
    with pytest.raises(ValueError, match="share a shape"):
        solvers.dpm_solver_pp_sde_update(x, x0, ab_s, ab_t, z[:, :2])


def test_sde_sampler_matches_ddim_eta_one_where_both_are_first_order_and_is_seeded():
    diffusion = ddpm.GaussianDiffusion("linear", T=100)
    model = toy_model(100).float()  # x_T comes from the generator in float32
    shape = (64, 2)
    # two steps: the first has no history and the last goes to the data, so both are first order, and both samplers
    # draw x_T and then one step's noise from the generator in the same order
    ours = solvers.dpm_solver_pp_2m_sample(diffusion, model, shape, steps=2, sde=True,
                                           generator=torch.Generator().manual_seed(5))
    ddim = diffusion.ddim_sample(model, shape, steps=2, eta=1.0, generator=torch.Generator().manual_seed(5),
                                 progress=False)
    torch.testing.assert_close(ours, ddim, rtol=1e-6, atol=1e-5)  # float32 sums in another order
    run = lambda seed: solvers.sample_with(diffusion, model, shape, "dpmpp2m_sde", 10,  # noqa: E731
                                           generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    ode = solvers.sample_with(diffusion, model, shape, "dpmpp2m", 10, generator=torch.Generator().manual_seed(1))
    assert (a - ode).abs().max() > 1e-3                                           # the noise changes the samples
    # eta = 1 is the default; eta = 0 is the ODE again (the generator's later draws are never used)
    assert torch.equal(a, solvers.sample_with(diffusion, model, shape, "dpmpp2m_sde", 10, eta=1.0,
                                              generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(solvers.sample_with(diffusion, model, shape, "dpmpp2m_sde", 10, eta=0.0,
                                                   generator=torch.Generator().manual_seed(1)), ode, rtol=0, atol=1e-6)
    half = solvers.sample_with(diffusion, model, shape, "dpmpp2m_sde", 10, eta=0.5,
                               generator=torch.Generator().manual_seed(1))
    assert (half - a).abs().max() > 1e-3 and (half - ode).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        solvers.sample_with(diffusion, model, shape, "dpmpp2m_sde", 10, eta=1.5)
    with pytest.raises(ValueError, match="pass sde=True"):
        solvers.dpm_solver_pp_2m_sample(diffusion, model, shape, steps=4, eta=0.5)


def test_sde_update_with_eta_keeps_the_marginal_and_spans_ode_to_sde():
    """For every eta the step maps x_s ~ sqrt(abar_s) x_0 + sigma_s eps (x0 = x_0 exact) to mean sqrt(abar_t) x_0 and
    variance sigma_t^2; eta = 0 is the ODE step and eta = 1 the SDE step."""
    g = torch.Generator().manual_seed(4)
    ab_s, ab_t, n = 0.3, 0.8, 400_000
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    x_s = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * torch.randn(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    for eta in (0.0, 0.25, 0.5, 1.0):
        x_t = solvers.dpm_solver_pp_sde_update(x_s, x0, ab_s, ab_t, z, eta)
        assert abs(x_t.mean().item() - math.sqrt(ab_t) * 0.7) < 4e-3, eta
        assert abs(x_t.var().item() - (1 - ab_t)) < 4e-3, eta
    small = torch.randn(5, 3, generator=g, dtype=torch.float64)
    zs = torch.randn(5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(solvers.dpm_solver_pp_sde_update(small, small, ab_s, ab_t, zs, 0.0),
                               solvers.dpm_solver_pp_update(small, small, ab_s, ab_t), rtol=0, atol=1e-12)
    for eta in (0.0, 0.5, 1.0):  # to the data, every eta returns x0
        assert torch.equal(solvers.dpm_solver_pp_sde_update(small, zs, ab_s, 1.0, small, eta), zs)
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        solvers.dpm_solver_pp_sde_update(small, small, ab_s, ab_t, zs, -0.1)


# -- third order: DPM-Solver++ 3M -----------------------------------------------------------------------

def test_phi_functions_integrate_the_linear_and_quadratic_terms():
    """sigma_t e^(lambda_s) int_0^h e^u u du = sqrt(abar_t) h phi_2(h) and ... u^2 / 2 ... = -sqrt(abar_t) h^2
    phi_3(h): the update applied to x_s = 0 with x0 = 0 and only d1 (or d2) set reproduces the integrals, computed by
    the trapezoidal rule on a fine grid."""
    ab_s, ab_t = 0.3, 0.8
    h = solvers.half_log_snr(ab_t) - solvers.half_log_snr(ab_s)
    u = torch.linspace(0, h, 200_001, dtype=torch.float64)
    scale = math.sqrt(1 - ab_t) * math.exp(solvers.half_log_snr(ab_s))
    lin = scale * torch.trapezoid(torch.exp(u) * u, u).item()
    quad = scale * torch.trapezoid(torch.exp(u) * u * u / 2, u).item()
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    # d1 = h x0' with x0' = 1; d2 = h^2 x0'' / 2 with x0'' = 1
    got_lin = solvers.dpm_solver_pp_multistep_update(zero, zero, h * one, zero, ab_s, ab_t).item()
    got_quad = solvers.dpm_solver_pp_multistep_update(zero, zero, zero, h * h / 2 * one, ab_s, ab_t).item()
    assert got_lin == pytest.approx(lin, rel=1e-8) and got_quad == pytest.approx(quad, rel=1e-8)
    # the series branch for tiny steps agrees with the closed form just above it
    a, b = 0.5, 0.5 + 2e-5
    tiny = solvers.dpm_solver_pp_multistep_update(zero, zero, one, one, a, b).item()
    hh = solvers.half_log_snr(b) - solvers.half_log_snr(a)
    assert tiny == pytest.approx(math.sqrt(b) * (hh / 2 - 2 * (-hh / 6)), rel=1e-3)


def test_multistep_derivatives_are_exact_for_a_quadratic():
    lam = lambda u: torch.tensor([0.3 - 1.2 * u + 0.7 * u * u], dtype=torch.float64)  # noqa: E731
    h, h1, h2 = 0.4, 0.25, 0.6
    d1, d2 = solvers.multistep_derivatives(lam(0.0), lam(-h1), lam(-h1 - h2), h, h1, h2)
    torch.testing.assert_close(d1, torch.tensor([h * -1.2], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(d2, torch.tensor([h * h * 0.7], dtype=torch.float64), rtol=0, atol=1e-12)
    d1, d2 = solvers.multistep_derivatives(lam(0.0), lam(-h1), None, h, h1)   # a line: the 2M difference
    torch.testing.assert_close(d1, (lam(0.0) - lam(-h1)) * h / h1) and torch.testing.assert_close(d2, 0 * d1)
    with pytest.raises(ValueError, match="finite step sizes"):
        solvers.multistep_derivatives(lam(0.0), lam(-h1), None, math.inf, h1)
    with pytest.raises(ValueError, match="finite h_2"):
        solvers.multistep_derivatives(lam(0.0), lam(-h1), lam(-1.0), h, h1)


def test_3m_local_error_is_fourth_order_on_the_exact_gaussian_path():
    """One step started on the exact ODE solution for Gaussian data, with exact earlier estimates: halving the
    step divides 2M's local error by about 8 (third order locally) and 3M's by about 16, equal or unequal steps."""
    mu, s, z = 0.8, 0.3, torch.tensor([1.3], dtype=torch.float64)
    ab = lambda lam: 1 / (1 + math.exp(-2 * lam))                                   # noqa: E731
    x_of = lambda lam: math.sqrt(ab(lam)) * mu + math.sqrt(ab(lam) * s * s + 1 - ab(lam)) * z  # noqa: E731
    x0_of = lambda lam: mu + s * s * math.sqrt(ab(lam)) * z / math.sqrt(ab(lam) * s * s + 1 - ab(lam))  # noqa: E731
    lam_s, e2, e3 = -1.0, [], []
    for h in (0.2, 0.1, 0.05):
        x0, x1, x2 = x0_of(lam_s), x0_of(lam_s - 0.7 * h), x0_of(lam_s - 2.0 * h)
        d1, d2 = solvers.multistep_derivatives(x0, x1, x2, h, 0.7 * h, 1.3 * h)
        step3 = solvers.dpm_solver_pp_multistep_update(x_of(lam_s), x0, d1, d2, ab(lam_s), ab(lam_s + h))
        step2 = solvers.dpm_solver_pp_update(x_of(lam_s), solvers.multistep_x0(x0, x1, h, 0.7 * h), ab(lam_s),
                                             ab(lam_s + h))
        e3.append((step3 - x_of(lam_s + h)).abs().item())
        e2.append((step2 - x_of(lam_s + h)).abs().item())
    assert all(6 < e2[k] / e2[k + 1] < 10 for k in range(2)), e2
    assert all(13 < e3[k] / e3[k + 1] < 19 for k in range(2)), e3
    assert all(a < b / 5 for a, b in zip(e3, e2))


def test_3m_beats_2m_on_the_logsnr_grid():
    """On the course's linear schedule and the "logsnr" grid, 20 steps of 3M land far closer to the exact ODE
    solution than 20 of 2M (the last step to the data, x0_hat at index 0, leaves about 1e-4 for both)."""
    d = ddpm.GaussianDiffusion("linear", T=1000)
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact, eps = exact_x0(d, x_T), gaussian_eps(d)
    err = lambda order: (solvers.dpm_solver_pp_2m_sample(d, eps, x_T.shape, steps=20, x_T=x_T, spacing="logsnr",  # noqa: E731
                                                         order=order) - exact).norm(dim=1).mean().item()
    assert err(3) < err(2) / 5 and err(3) < 1e-3, (err(2), err(3))


def test_3m_samplers_dispatch_are_seeded_and_reduce_to_the_ode():
    diffusion = ddpm.GaussianDiffusion("linear", T=100)
    model = toy_model(100).float()
    shape = (64, 2)
    run = lambda name, seed, **kw: solvers.sample_with(diffusion, model, shape, name, 10,  # noqa: E731
                                                       generator=torch.Generator().manual_seed(seed), **kw)
    ode3, ode2 = run("dpmpp3m", 1), run("dpmpp2m", 1)
    assert torch.equal(ode3, solvers.dpm_solver_pp_2m_sample(diffusion, model, shape, steps=10, order=3,
                                                             generator=torch.Generator().manual_seed(1)))
    assert (ode3 - ode2).abs().max() > 1e-6                                     # third order changes the path
    a, b, c = run("dpmpp3m_sde", 1), run("dpmpp3m_sde", 1), run("dpmpp3m_sde", 2)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3 and (a - ode3).abs().max() > 1e-3
    torch.testing.assert_close(run("dpmpp3m_sde", 1, eta=0.0), ode3, rtol=0, atol=1e-6)
    # two steps: first order, then the last step to the data: 3M is 2M is DDIM there
    two = lambda order: solvers.dpm_solver_pp_2m_sample(diffusion, model, shape, steps=2, order=order,  # noqa: E731
                                                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(two(3), two(2))
    with pytest.raises(ValueError, match="order must be 2"):
        solvers.dpm_solver_pp_2m_sample(diffusion, model, shape, steps=4, order=4)
    with pytest.raises(ValueError, match="eta must be 0"):
        run("dpmpp3m", 1, eta=0.5)
    with pytest.raises(ValueError, match="pass z"):
        solvers.dpm_solver_pp_multistep_update(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                                               0.3, 0.5, eta=0.5)
