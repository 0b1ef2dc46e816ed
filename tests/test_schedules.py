import math

import pytest
import torch

from diffusion_course import schedules
from diffusion_course.schedules import Schedule


def test_linear_matches_ddpm():
    b = schedules.linear_betas(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    # scaled version equals DDPM's schedule at T = 1000
    assert torch.equal(schedules.rescaled_linear_betas(1000), b)
    # and keeps abar_T about the same at smaller T
    ab_1000 = Schedule(b).alpha_bar[-1].item()
    ab_100 = Schedule(schedules.rescaled_linear_betas(100)).alpha_bar[-1].item()
    assert ab_1000 < 1e-4 and ab_100 < 1e-3


def test_cosine_alpha_bar_matches_formula():
    T, s = 1000, 0.008
    sch = Schedule.from_name("cosine", T)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = torch.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    # wherever beta was not clipped, abar_t is exactly the formula
    unclipped = sch.betas < 0.999
    first_clip = int((~unclipped).nonzero()[0]) if (~unclipped).any() else T
    assert torch.allclose(sch.alpha_bar[:first_clip], f[:first_clip], rtol=1e-10, atol=1e-14)
    assert sch.betas.max().item() <= 0.999


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_derived_quantities(name):
    sch = Schedule.from_name(name, 200)
    assert torch.allclose(sch.alphas, 1 - sch.betas)
    assert torch.allclose(sch.alpha_bar[1:], sch.alpha_bar[:-1] * sch.alphas[1:])
    assert (sch.alpha_bar[1:] < sch.alpha_bar[:-1]).all()
    assert (sch.log_snr()[1:] < sch.log_snr()[:-1]).all()
    assert torch.allclose(sch.snr.log(), sch.log_snr())


def test_index_convention():
    T = 10
    assert schedules.lecture_t_to_index(1, T) == 0
    assert schedules.lecture_t_to_index(T, T) == T - 1
    assert schedules.index_to_lecture_t(0, T) == 1
    t = torch.arange(1, T + 1)
    assert torch.equal(schedules.index_to_lecture_t(schedules.lecture_t_to_index(t, T), T), t)
    # betas[0] is beta_1: the first factor of abar_1
    sch = Schedule.from_name("linear", T)
    assert sch.alpha_bar[schedules.lecture_t_to_index(1, T)] == 1 - sch.betas[0]
    with pytest.raises(ValueError, match="1..10"):
        schedules.lecture_t_to_index(0, T)
    with pytest.raises(ValueError, match="0..9"):
        schedules.index_to_lecture_t(10, T)


def test_bad_input():
    with pytest.raises(ValueError, match="valid names: cosine, linear, scaled_linear"):
        schedules.make_betas("quadratic", 10)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Schedule(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Schedule(torch.tensor([0.0, 0.1]))
    with pytest.raises(ValueError, match="1-D"):
        Schedule(torch.ones(2, 2) * 0.1)
    with pytest.raises(ValueError, match="NaN"):
        Schedule(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="positive int"):
        schedules.linear_betas(0)
    with pytest.raises(ValueError, match="beta_start"):
        schedules.linear_betas(10, 0.5, 0.1)


def test_scaled_linear_is_latent_diffusions_schedule():
    """LDM / Stable Diffusion: beta from 0.00085 to 0.012, linear in sqrt(beta) (diffusers' 'scaled_linear')."""
    b = schedules.make_betas("scaled_linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(0.00085, rel=1e-12) and b[-1].item() == pytest.approx(0.012, rel=1e-12)
    # linear in sqrt space: equal steps of sqrt(beta), and so not linear in beta itself
    steps = b.sqrt().diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=0)
    assert not torch.allclose(b.diff(), b.diff().mean().expand_as(b.diff()), rtol=1e-3)
    # the same numbers as the float32 computation the published code uses, to float32 precision
    published = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(b.float(), published, rtol=1e-6, atol=0)
    # Stable Diffusion's final cumulative product abar_T is about 0.0047, a hundred times DDPM's
    ab = Schedule(b).alpha_bar
    assert ab[-1].item() == pytest.approx(0.00466, abs=5e-5)
    assert Schedule.from_name("linear", 1000).alpha_bar[-1].item() < 1e-4
    # the package's 'linear' keeps its DDPM meaning (not the sqrt-space one)
    assert torch.equal(schedules.make_betas("linear", 1000), schedules.linear_betas(1000))
