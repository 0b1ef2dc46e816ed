"""The engine's hot loops make no host round trip: coefficient tables are copied to a device once and kept,
integer steps become tensors on the device, and the t the engine draws itself are never range-checked again
(a check of a GPU tensor waits for the GPU). The CPU cannot show a wait, so these tests watch for the calls
that would cause one."""
import pytest
import torch

from diffusion_course.ddpm import GaussianDiffusion
from diffusion_course.solvers import dpm_solver_pp_2m_sample


@pytest.fixture
def diffusion():
    return GaussianDiffusion("linear", T=50)


def toy_model(x, t, **kwargs):
    return 0.1 * x + 0.001 * t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@pytest.fixture
def no_value_checks(monkeypatch):
    """Fail on any min/max of an integer tensor: the only way the engine range-checks a tensor t."""
    real_min, real_max = torch.Tensor.min, torch.Tensor.max

    def guard(real):
        def call(self, *args, **kwargs):
            if not self.is_floating_point():
                raise AssertionError("a t tensor was range-checked inside a hot loop")
            return real(self, *args, **kwargs)
        return call

    monkeypatch.setattr(torch.Tensor, "min", guard(real_min))
    monkeypatch.setattr(torch.Tensor, "max", guard(real_max))


def test_extract_int_and_tensor_agree(diffusion):
    x = torch.randn(4, 3, 2, 2)
    for t in (0, 17, 49):
        a = diffusion.extract(diffusion.sqrt_alpha_bar, t, x)
        b = diffusion.extract(diffusion.sqrt_alpha_bar, torch.full((4,), t), x)
        assert a.shape == b.shape == (4, 1, 1, 1)
        assert torch.equal(a, b)
        assert float(a[0]) == pytest.approx(float(diffusion.sqrt_alpha_bar[t]), rel=1e-6)


def test_formula_tables_match_their_definitions(diffusion):
    d = diffusion
    assert torch.allclose(d.sqrt_alphas, d.alphas.sqrt())
    assert torch.allclose(d.recip_sqrt_alphas * d.sqrt_alphas, torch.ones(d.T, dtype=torch.float64))
    assert torch.allclose(d.eps_coef, d.betas / (1 - d.alpha_bar).sqrt())
    assert torch.allclose(d.log_betas.exp(), d.betas)
    assert torch.allclose(d.one_minus_alpha_bar + d.alpha_bar, torch.ones(d.T, dtype=torch.float64))


def test_tables_are_copied_to_a_device_once(diffusion):
    x = torch.empty(3, 2, device="meta")  # a device other than the CPU, with no data
    first = diffusion._table_on(diffusion.sqrt_alpha_bar, x.device)
    again = diffusion._table_on(diffusion.sqrt_alpha_bar, x.device)
    assert first.device.type == "meta" and first is again
    assert ("sqrt_alpha_bar", x.device) in diffusion._device_tables
    foreign = diffusion.sqrt_alpha_bar * 2  # not one of the process's tables: copied, never cached
    n = len(diffusion._device_tables)
    assert diffusion._table_on(foreign, x.device).device.type == "meta"
    assert len(diffusion._device_tables) == n
    out = diffusion.extract(diffusion.sqrt_alpha_bar, 5, x)
    assert out.device.type == "meta" and out.shape == (3, 1)


def test_hot_loops_never_range_check_t(diffusion, no_value_checks):
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    g = torch.Generator().manual_seed(0)
    loss = diffusion.L_simple(toy_model, x0, generator=g)  # t drawn by the engine
    assert torch.isfinite(loss)
    diffusion.ddim_sample(toy_model, (2, 1, 4, 4), steps=5, generator=g, progress=False)
    diffusion.sample(toy_model, (2, 1, 4, 4), generator=g, progress=False)
    dpm_solver_pp_2m_sample(diffusion, toy_model, (2, 1, 4, 4), steps=5, generator=g)


def test_user_tensors_are_still_checked(diffusion):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        diffusion.extract(diffusion.betas, torch.tensor([0, 50]), x)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        diffusion.extract(diffusion.betas, -1, x)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        diffusion.L_simple(toy_model, torch.zeros(2, 1, 4, 4), t=torch.tensor([3, 60]))
    with pytest.raises(TypeError):
        diffusion.extract(diffusion.betas, torch.tensor([0.5, 1.0]), x)


def test_drawn_t_are_marked_and_in_range(diffusion):
    g = torch.Generator().manual_seed(1)
    t = diffusion.sample_t(1000, generator=g)
    assert diffusion._own_t.get(id(t)) is t
    assert 0 <= int(t.min()) and int(t.max()) < diffusion.T
    assert len(torch.unique(t)) == diffusion.T  # 1000 draws over 50 steps reach every one


def test_cpu_generator_noise_is_the_same_wherever_it_goes(diffusion):
    a = diffusion._randn((3, 4), generator=torch.Generator().manual_seed(3))
    b = torch.randn((3, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    meta = diffusion._randn((3, 4), generator=torch.Generator().manual_seed(3), device=torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (3, 4)


def test_sampling_results_unchanged_by_int_steps(diffusion):
    """An integer step and the same step as a tensor give bit-identical DDIM and DDPM steps."""
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    out_int = diffusion.p_mean_variance(toy_model, x, 7)
    out_tensor = diffusion.p_mean_variance(toy_model, x, torch.tensor([7, 7]))
    for key in out_int:
        assert torch.equal(out_int[key], out_tensor[key]), key
