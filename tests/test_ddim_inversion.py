"""DDIM inversion and spherical interpolation (GaussianDiffusion.ddim_invert and ddpm.slerp, lesson 03).

For data x_0 ~ N(mu, s^2 I) the optimal noise prediction is known in closed form,
eps(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t), and the deterministic DDIM
process maps each point along its own quantile: x_T = sqrt(abar_T) mu + sqrt(abar_T s^2 + 1 - abar_T) (x_0 - mu) / s.
Inversion must find that code, and DDIM sampling from it must come back to x_0.
"""
import math

import pytest
import torch

from diffusion_course import ddpm

MU = torch.tensor([0.8, -0.4], dtype=torch.float64)
S = 0.3


def exact_eps(diffusion):
    def eps(x, t):
        eps.calls += 1
        ab = diffusion.alpha_bar[t.cpu()].to(x)[:, None]
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU.to(x)) / (ab * S * S + 1 - ab)
    eps.calls = 0
    return eps


def data(n=256, seed=0):
    return MU + S * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_inversion_then_ddim_sampling_reconstructs_x0_and_finds_the_exact_code():
    diffusion = ddpm.GaussianDiffusion("linear", T=1000)
    eps = exact_eps(diffusion)
    x0 = data()
    ab_T = diffusion.alpha_bar[-1]
    exact_code = ab_T.sqrt() * MU + (ab_T * S * S + 1 - ab_T).sqrt() * (x0 - MU) / S
    errors, code_errors = [], []
    for steps in (10, 50, 250, 1000):
        eps.calls = 0
        x_T = diffusion.ddim_invert(eps, x0, steps=steps, progress=False)
        assert eps.calls == steps and x_T.shape == x0.shape and x_T.dtype == torch.float64
        back = diffusion.ddim_sample(eps, x0.shape, steps=steps, x_T=x_T, progress=False)
        errors.append((back - x0).norm(dim=1).mean().item())
        code_errors.append((x_T - exact_code).norm(dim=1).mean().item())
    assert errors == sorted(errors, reverse=True)              # better with every refinement (first order)
    assert errors[-1] < 2e-2 * S and code_errors[-1] < 1e-2    # all T steps: close to x_0 and to the exact code
    assert code_errors == sorted(code_errors, reverse=True)


def test_inversion_trajectory_runs_up_the_ddim_grid():
    diffusion = ddpm.GaussianDiffusion("linear", T=50)
    eps = exact_eps(diffusion)
    x0 = data(8)
    x_T, traj = diffusion.ddim_invert(eps, x0, steps=5, return_trajectory=True, progress=False)
    grid = diffusion.ddim_timesteps(5)
    assert traj.t == [0] + [t + 1 for t in reversed(grid)] and traj.t[-1] == 50
    assert torch.equal(traj.samples[0], x0) and torch.equal(traj.samples[-1], x_T)
    # the first step: from the data (abar = 1) with eps_theta(x_0, t_1) at the grid's first level
    t1 = grid[-1]
    ab = float(diffusion.alpha_bar[t1])
    first = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps(x0, torch.full((8,), t1))
    torch.testing.assert_close(traj.samples[1], first)
    # a middle step: the Euler step x_t / sqrt(abar_t) = x_s / sqrt(abar_s) + (sigma_t - sigma_s) eps_theta(x_s, s)
    s_, t_ = grid[-2], grid[-3]
    ab_s, ab_t = float(diffusion.alpha_bar[s_]), float(diffusion.alpha_bar[t_])
    x_s = traj.samples[2]
    sigma = lambda a: math.sqrt((1 - a) / a)  # noqa: E731
    step = math.sqrt(ab_t) * (x_s / math.sqrt(ab_s) + (sigma(ab_t) - sigma(ab_s)) * eps(x_s, torch.full((8,), s_)))
    torch.testing.assert_close(traj.samples[3], step)


def test_inversion_keeps_a_module_in_its_mode_and_rejects_bad_input(eval_only_net):
    diffusion = ddpm.GaussianDiffusion("linear", T=20)
    net = eval_only_net
    diffusion.ddim_invert(net, torch.zeros(3, 2), steps=4, progress=False)
    assert net.training
    with pytest.raises(ValueError, match="steps"):
        diffusion.ddim_invert(net, torch.zeros(3, 2), steps=21)
    with pytest.raises(TypeError, match="floating-point"):
        diffusion.ddim_invert(net, torch.zeros(3, 2, dtype=torch.long), steps=4)
    with pytest.raises(ValueError, match="model returned shape"):
        diffusion.ddim_invert(lambda x, t: x[:, :1], torch.zeros(3, 2), steps=4)


# -- slerp ------------------------------------------------------------------------------------------------------

def test_slerp_ends_norms_and_angles():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    b = b * (a.norm() / b.norm())                                   # equal norms
    w = torch.linspace(0, 1, 9)
    path = ddpm.slerp(a, b, w)
    assert path.shape == (9, 1, 16, 16) and path.dtype == a.dtype
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.flatten(1).norm(dim=1), a.norm().expand(9), rtol=1e-5, atol=1e-5)
    theta = torch.arccos(torch.dot(a.flatten(), b.flatten()) / a.norm() ** 2)
    for k, wk in enumerate(w):                                      # the angle to a grows linearly with w
        cos = torch.dot(path[k].flatten(), a.flatten()) / (path[k].norm() * a.norm())
        assert torch.arccos(cos.clamp(-1, 1)).item() == pytest.approx(wk.item() * theta.item(), abs=1e-3)
    # a straight line cuts inside the sphere: its midpoint has norm |a| cos(theta / 2)
    mid = 0.5 * (a + b)
    assert mid.norm().item() == pytest.approx((a.norm() * torch.cos(theta / 2)).item(), rel=1e-5)
    assert mid.norm() < path[4].norm()


def test_slerp_of_orthogonal_unit_vectors_and_its_special_cases():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(ddpm.slerp(e1, e2, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(ddpm.slerp(e1, e2, [1 / 3]), torch.tensor([[math.cos(math.pi / 6),
                                                                             math.sin(math.pi / 6)]]))
    torch.testing.assert_close(ddpm.slerp(e1, 2 * e1, 0.5), 1.5 * e1)  # parallel: linear
    with pytest.raises(ValueError, match="one shape"):
        ddpm.slerp(e1, torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="non-zero"):
        ddpm.slerp(e1, torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="weights"):
        ddpm.slerp(e1, e2, [[0.5]])
    with pytest.raises(ValueError, match="weights"):
        ddpm.slerp(e1, e2, float("nan"))
