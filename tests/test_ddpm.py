import math

import pytest
import torch

from diffusion_course import ddpm
from diffusion_course.ddpm import GaussianDiffusion, normal_kl


def oracle_for_point(c: torch.Tensor, diffusion: GaussianDiffusion):
    """The exact eps_theta when the data is the single point c: eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t)."""
    def model(xt, t):
        return diffusion.predict_eps_from_x0(xt, t, c.expand_as(xt))
    return model


class Smooth(torch.nn.Module):
    def forward(self, x, t):
        return torch.sin(x) * (1 + t.double().reshape(-1, *[1] * (x.ndim - 1)) / 100).to(x.dtype)


@pytest.fixture
def diffusion():
    return GaussianDiffusion("linear", T=100)


def test_closed_form_equals_chain_moments_exactly(diffusion):
    # mean and variance of the iterated chain by their recursions, against q(x_t | x_0), float64
    x0 = torch.randn(3, 4, dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros(())
    for i in range(diffusion.T):
        a = diffusion.alphas[i]
        mean, var = a.sqrt() * mean, a * var + diffusion.betas[i]
        m_cf, v_cf = diffusion.q_mean_variance(x0, i)
        assert torch.allclose(mean, m_cf, atol=1e-12)
        assert torch.allclose(var.expand(3, 1), v_cf.reshape(3, 1), atol=1e-12)


def test_closed_form_equals_chain_monte_carlo(diffusion):
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for t in (0, 9, 49, 99):
        chain = diffusion.q_sample_chain(x0, t, generator=g)
        closed = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        want_mean = diffusion.sqrt_alpha_bar[t].item() * 0.7
        want_var = 1 - diffusion.alpha_bar[t].item()
        for x in (chain, closed):
            se_mean = math.sqrt(want_var / n)
            assert abs(x.mean().item() - want_mean) < 5 * se_mean
            assert abs(x.var().item() - want_var) < 5 * want_var * math.sqrt(2 / n)


def test_posterior_matches_bayes_on_a_grid(diffusion):
    x0, xt = 0.4, -0.3
    grid = torch.linspace(-6, 6, 200001, dtype=torch.float64)
    dx = grid[1] - grid[0]
    for t in (1, 10, 60, 99):
        ab_prev = diffusion.alpha_bar[t - 1]
        prior = torch.distributions.Normal(ab_prev.sqrt() * x0, (1 - ab_prev).sqrt()).log_prob(grid)
        lik = torch.distributions.Normal(diffusion.alphas[t].sqrt() * grid, diffusion.betas[t].sqrt()).log_prob(torch.tensor(xt, dtype=torch.float64))
        w = torch.softmax(prior + lik, 0)
        mean_num = (w * grid).sum()
        var_num = (w * (grid - mean_num) ** 2).sum()
        mean, var, logvar = diffusion.q_posterior_mean_variance(torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), t)
        assert mean.item() == pytest.approx(mean_num.item(), abs=1e-7)
        assert var.item() == pytest.approx(var_num.item(), rel=1e-5)
        assert logvar.item() == pytest.approx(math.log(var_num.item()), abs=1e-5)
        assert dx > 0


def test_posterior_variance_at_t1_is_zero(diffusion):
    assert diffusion.beta_tilde[0].item() == 0.0
    assert (diffusion.beta_tilde[1:] < diffusion.betas[1:]).all()


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, lv1, m2, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), want, atol=1e-12)
    assert torch.allclose(normal_kl(m1, lv1, m1, lv1), torch.zeros(50, dtype=torch.float64))
    with pytest.raises(ValueError, match="broadcast"):
        normal_kl(torch.zeros(3), torch.zeros(4), torch.zeros(3), torch.zeros(3))


def test_algorithm2_mean_equals_posterior_mean_route(diffusion):
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 5, 50, 98, 99])
    direct = diffusion.mu_from_eps(xt, t, eps)
    x0 = diffusion.predict_x0_from_eps(xt, t, eps)
    via_posterior, _, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    assert torch.allclose(direct, via_posterior, atol=1e-10)
    # x0 -> eps -> x0 round trip
    assert torch.allclose(diffusion.predict_x0_from_eps(xt, t, diffusion.predict_eps_from_x0(xt, t, x0)), x0, atol=1e-10)


@pytest.mark.parametrize("sigma", ["beta_tilde", "beta"])
def test_elbo_term_equals_weighted_eps_mse(diffusion, sigma):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    model = Smooth()
    for t in (1, 7, 40, 99):
        xt = diffusion.q_sample(x0, t, eps)
        kl = diffusion.vb_term(model, x0, xt, t, sigma=sigma)
        eps_theta = model(xt, torch.full((5,), t))
        weighted = diffusion.eps_mse_weight(t, sigma, like=x0).to(x0) * ddpm.sum_flat((eps - eps_theta) ** 2)
        if sigma == "beta_tilde":
            assert torch.allclose(kl, weighted, rtol=1e-9, atol=1e-12)
        else:  # a constant C that does not depend on eps_theta
            c = kl - weighted
            kl_zero = diffusion.vb_term(lambda x, tt: torch.zeros_like(x), x0, xt, t, sigma=sigma)
            c_zero = kl_zero - diffusion.eps_mse_weight(t, sigma, like=x0).to(x0) * ddpm.sum_flat(eps ** 2)
            assert torch.allclose(c, c_zero, atol=1e-9)
            assert (c > 0).all()


def test_discretized_decoder_probabilities_sum_to_one():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(1, -1)
    for mean, log_scale in ((0.1, -2.0), (-0.97, -4.0), (0.5, 0.3)):
        lp = ddpm.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ddpm.discretized_gaussian_log_likelihood(torch.full((2,), 3.0), torch.zeros(2), torch.zeros(2))


def test_variational_bound_shapes_and_signs(diffusion):
    x0 = (torch.randint(0, 256, (2, 1, 4, 4)).double() / 255) * 2 - 1
    out = diffusion.variational_bound_bpd(Smooth(), x0, progress=False, generator=torch.Generator().manual_seed(0))
    assert out["terms"].shape == (2, diffusion.T) and out["total"].shape == (2,)
    assert (out["terms"][:, 1:] >= -1e-9).all()  # KL terms are non-negative
    assert torch.allclose(out["total"], out["terms"].sum(1) + out["prior"])
    assert (out["prior"] < 0.05).all()


def test_L_simple_is_zero_for_the_oracle_and_positive_otherwise(diffusion):
    c = torch.tensor([[0.3, -0.2]])
    x0 = c.expand(64, 2).clone()
    assert diffusion.L_simple(oracle_for_point(c, diffusion), x0).item() < 1e-10
    assert diffusion.L_simple(lambda x, t: torch.zeros_like(x), x0).item() > 0.5


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    from diffusion_course.denoisers import ToyMLP
    diffusion = GaussianDiffusion("linear", T=50)
    model = ToyMLP(50, hidden=64, depth=2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x0 = torch.randn(256, 2) * 0.1 + torch.tensor([1.0, -1.0])
    g = torch.Generator().manual_seed(0)
    first = [diffusion.training_step(model, opt, x0, generator=g) for _ in range(5)]
    for _ in range(200):
        diffusion.training_step(model, opt, x0, generator=g)
    with torch.no_grad():
        t = torch.randint(0, 50, (256,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        final = diffusion.L_simple(model, x0, t, noise).item()
    assert final < 0.5 * sum(first) / len(first)


def test_training_step_refuses_nan():
    diffusion = GaussianDiffusion("linear", T=10)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        diffusion.training_step(lambda x, t: model(x), opt, torch.full((4, 2), float("nan")))


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_sampling_a_point_mass_returns_the_point(diffusion, sigma):
    c = torch.tensor([[0.5, -0.25]], dtype=torch.float64)
    model = oracle_for_point(c, diffusion)
    g = torch.Generator().manual_seed(0)
    x, traj = diffusion.sample(model, (8, 2), sigma=sigma, generator=g, progress=False, return_trajectory=True,
                               x_T=torch.randn(8, 2, dtype=torch.float64, generator=g))
    assert torch.allclose(x, c.expand(8, 2), atol=1e-9)
    assert traj.samples.shape == (diffusion.T + 1, 8, 2) and traj.t[0] == diffusion.T and traj.t[-1] == 0
    xd = diffusion.ddim_sample(model, (8, 2), steps=10, progress=False, x_T=torch.randn(8, 2, dtype=torch.float64, generator=g))
    assert torch.allclose(xd, c.expand(8, 2), atol=1e-9)


def test_p_sample_matches_algorithm2_line4(diffusion):
    model = Smooth()
    xt = torch.randn(4, 3, dtype=torch.float64)
    t = 30
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = diffusion.p_sample(model, xt, t, sigma="beta", generator=g1)
    z = torch.randn(xt.shape, generator=g2, dtype=torch.float64)
    tt = torch.full((4,), t)
    a, ab, b = diffusion.alphas[t], diffusion.alpha_bar[t], diffusion.betas[t]
    want = 1 / a.sqrt() * (xt - (1 - a) / (1 - ab).sqrt() * model(xt, tt)) + b.sqrt() * z
    assert torch.allclose(got, want, atol=1e-12)
    # no noise at the last step
    assert torch.allclose(diffusion.p_sample(model, xt, 0), diffusion.mu_from_eps(xt, torch.zeros(4, dtype=torch.long), model(xt, torch.zeros(4, dtype=torch.long))))


def test_ddim_eta1_consecutive_is_ancestral_with_beta_tilde(diffusion):
    model = Smooth()
    xt = torch.randn(4, 3, dtype=torch.float64)
    for t in (1, 17, 99):
        a = diffusion.ddim_step(model, xt, t, t - 1, eta=1.0, generator=torch.Generator().manual_seed(7))
        b = diffusion.p_sample(model, xt, t, sigma="beta_tilde", generator=torch.Generator().manual_seed(7))
        assert torch.allclose(a, b, atol=1e-10)


def test_ddim_eta0_is_deterministic(diffusion):
    model = Smooth()
    xT = torch.randn(5, 2, dtype=torch.float64)
    a = diffusion.ddim_sample(model, (5, 2), steps=20, eta=0.0, x_T=xT, progress=False, generator=torch.Generator().manual_seed(1))
    b = diffusion.ddim_sample(model, (5, 2), steps=20, eta=0.0, x_T=xT, progress=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    seq = diffusion.ddim_timesteps(20)
    assert seq[0] == diffusion.T - 1 and seq[-1] == 0 and len(seq) == 20 and seq == sorted(seq, reverse=True)


def test_clip_x0_keeps_predictions_in_range():
    diffusion = GaussianDiffusion("linear", T=50, clip_x0=True)
    out = diffusion.p_mean_variance(lambda x, t: -5 * torch.ones_like(x), torch.zeros(3, 2), 10)
    assert out["x0_pred"].abs().max().item() <= 1.0
    free = GaussianDiffusion("linear", T=50).p_mean_variance(lambda x, t: -5 * torch.ones_like(x), torch.zeros(3, 2), 10)
    assert free["x0_pred"].abs().max().item() > 1.0


def test_clear_errors(diffusion):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        diffusion.q_sample(x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        diffusion.q_sample(x, -1)
    with pytest.raises(TypeError, match="integer"):
        diffusion.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        diffusion.q_sample(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="shapes must match"):
        diffusion.q_sample(x, 1, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="eps-prediction"):
        diffusion.p_sample(lambda x, t: x[:, :1], x, 5)
    with pytest.raises(ValueError, match="sigma choice"):
        diffusion.sigma_squared("learned")
    with pytest.raises(ValueError, match="steps"):
        diffusion.ddim_timesteps(0)
    with pytest.raises(ValueError, match="valid names"):
        GaussianDiffusion("sigmoid", T=10)


def test_bound_with_clipping_changes_only_what_leaves_the_range(diffusion):
    """Clipping the predicted x_0 (the published bounds' setting) changes nothing for an exact model whose
    predictions stay in [-1, 1], and changes the terms of a model whose predictions leave it."""
    g = lambda: torch.Generator().manual_seed(3)
    c = torch.tensor([[0.5, -0.25, 0.75, 0.0]], dtype=torch.float64).expand(2, 4).contiguous()
    exact = oracle_for_point(c, diffusion)
    plain = diffusion.variational_bound_bpd(exact, c, progress=False, generator=g())
    clipped = diffusion.variational_bound_bpd(exact, c, progress=False, generator=g(), clip_x0=True)
    assert torch.allclose(plain["total"], clipped["total"], rtol=1e-9, atol=1e-12)
    wild = lambda xt, t: 3.0 * torch.ones_like(xt)  # x_0 predictions far outside [-1, 1]
    a = diffusion.variational_bound_bpd(wild, c, progress=False, generator=g())
    b = diffusion.variational_bound_bpd(wild, c, progress=False, generator=g(), clip_x0=True)
    assert torch.isfinite(b["total"]).all()
    assert not torch.allclose(a["terms"], b["terms"])
    assert (b["total"] < a["total"]).all()  # clamping pulls the predictions towards the data's range
