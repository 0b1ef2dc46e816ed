"""Higher-order solvers of the probability-flow ODE and of the reverse SDE: DPM-Solver++ 2M (Lu et al. 2022) and 3M,
their stochastic forms with a noise knob eta, and the time-step spacings that samplers with few steps use.

Taught in lesson 03_training_and_sampling, right after DDIM.

Notation of the lecture: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the network's data estimate
x0_hat(x_t, t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t). Time is measured by the half
log-SNR

    lambda_t = log( sqrt(abar_t) / sqrt(1 - abar_t) ),

which grows from about -5 at t = T (linear schedule) to +inf at the data (abar = 1). In lambda, DDIM's
deterministic process (the probability-flow ODE) reads d( x / sqrt(1 - abar) ) / d lambda = e^lambda x0_hat, so
from a level s to a later level t (lambda_t > lambda_s, h = lambda_t - lambda_s), exactly,

    x_t = sqrt(1 - abar_t) / sqrt(1 - abar_s) x_s
          + sqrt(1 - abar_t) * integral_{lambda_s}^{lambda_t} e^lambda x0_hat(x_lambda, lambda) dlambda.

The linear part is integrated exactly (an *exponential integrator*); only x0_hat along the way is approximated.

* Holding x0_hat at its value at s (first order) gives
  x_t = sqrt(1 - abar_t) / sqrt(1 - abar_s) x_s + sqrt(abar_t) (1 - e^-h) x0_hat, which is exactly DDIM's step
  with eta = 0 (:meth:`GaussianDiffusion.ddim_step`).
* DPM-Solver++ 2M (the paper's Algorithm 2, "multistep, second order") keeps the x0_hat of the previous step,
  at lambda_prev (h_prev = lambda_s - lambda_prev, r = h_prev / h), and replaces x0_hat in the same update by
  D = (1 + 1 / (2 r)) x0_hat_s - 1 / (2 r) x0_hat_prev: a linear extrapolation in lambda, one network call per
  step as for DDIM, and a local error one order smaller.

DPM-Solver++ 3M (``order=3``; the third-order multistep form that the authors' code offers beside 2M) keeps the two
previous estimates and fits a quadratic in lambda through the three, x0_hat(lambda_s + u) ~ x0_hat + u x0' +
u^2 / 2 x0''. With D1 = h x0' and D2 = h^2 x0'' / 2 from that fit (:func:`multistep_derivatives`), the integral
above is exact for the quadratic:

    x_t = sigma_t / sigma_s x_s + sqrt(abar_t) [ (1 - e^-h) x0_hat + phi_2(h) D1 - 2 phi_3(h) D2 ],
    phi_2(h) = 1 + (e^-h - 1) / h,   phi_3(h) = phi_2(h) / h - 1 / 2,

because sigma_t e^(lambda_s) int_0^h e^u u du = sqrt(abar_t) h phi_2(h) and sigma_t e^(lambda_s) int_0^h e^u u^2 / 2 du
= -sqrt(abar_t) h^2 phi_3(h) (``tests/test_solvers.py`` checks both integrals and the third order). Its second
step, with one earlier estimate, is the second-order step with the exact phi_2(h) D1 in place of 2M's
(1 - e^-h) D1 / 2 (the two agree to second order).

The first step has no previous x0_hat and is first order (a DDIM step). The last step goes to abar = 1, where
lambda = +inf, h = +inf and r = 0: the second-order weight h / (2 h_prev) is infinite, so that step is first order
too, and the first-order update at abar = 1 returns the last x0_hat unchanged (as DDIM's last step does, and
as k-diffusion's ``sample_dpmpp_2m`` and diffusers' ``DPMSolverMultistepScheduler`` with a final noise level of
zero do).

One safeguard goes beyond the paper's Algorithm 2 (``lower_order_final=True``, the default; the name is the
option by which the paper's code and diffusers take their final steps at lower order, for the same reason): a step
more than twice as long in lambda as the step before it (h > 2 h_prev, i.e. an extrapolation weight
h / (2 h_prev) > 1) is taken at first order. The evenly spaced grids in t (``"linspace"``, ``"leading"``) end with
such a step: their last level, index 0 or 1, lies a long way in lambda beyond the one before it (for T = 1000,
the linear or cosine schedule and 5 to 100 steps, h is 2.4 to 5 times h_prev there, while no earlier step is
more than 1.7 times the one before it), and extrapolating x0_hat linearly over that stretch overshoots, because
x0_hat levels off as lambda grows. The ``"trailing"`` grid has no such step. ``lower_order_final=False`` is
Algorithm 2 verbatim (with the last step to abar = 1 first order, as it must be). Every scalar coefficient is
computed in float64 and applied to tensors of any dtype.

The stochastic variant (``sde=True``, DPM-Solver++ 2M SDE: Lu et al. 2022 solve the reverse diffusion SDE the same
way) integrates the same linear part exactly and adds fresh noise at every step but the last:

    x_t = sigma_t / sigma_s e^-h x_s + sqrt(abar_t) (1 - e^-2h) D + sigma_t sqrt(1 - e^-2h) z,   z ~ N(0, I),

with sigma = sqrt(1 - abar). With D = x0_hat (first order) this is exactly DDIM's step with eta = 1, the ancestral
step of DDPM on a coarser grid; the second-order D is the same extrapolation as above. Noise keeps correcting the
errors of earlier steps, which a deterministic solver carries to the end, at the price of needing more steps to
resolve the noise it adds.

Between the two lies a family with a knob eta in [0, 1] (``eta=``; k-diffusion's ``sample_dpmpp_2m_sde`` has the
same knob): keep e^-(eta h) of x_s's noise, add fresh noise for the rest,

    x_t = sigma_t / sigma_s e^-(eta h) x_s + sqrt(abar_t) (1 - e^-(1 + eta) h) D + sigma_t sqrt(1 - e^-2 eta h) z.

Why these coefficients: with x_s = sqrt(abar_s) x_0 + sigma_s eps and D = x_0, sigma_t / sigma_s sqrt(abar_s) =
sqrt(abar_t) e^-h (since sqrt(abar) / sigma = e^lambda), so the mean is sqrt(abar_t) x_0 and the variance
sigma_t^2 e^-2 eta h + sigma_t^2 (1 - e^-2 eta h) = sigma_t^2: every eta keeps x_t's marginal. eta = 0 is the
ODE step above and eta = 1 the SDE step; in between, less noise is added than the SDE adds, so fewer steps resolve
it, while some of the earlier errors are still washed out. The higher-order terms carry over with h replaced by
(1 + eta) h in phi_2 and phi_3 (the integrand's weight is (1 + eta) e^-(1 + eta)(lambda_t - lambda)), which at
eta = 1 gives the SDE forms of 2M and 3M.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .ddpm import SPACINGS, GaussianDiffusion, Model, Trajectory, timesteps
from .utils import evaluating

__all__ = ["SPACINGS", "SAMPLERS", "timesteps", "half_log_snr", "dpm_solver_pp_update", "dpm_solver_pp_sde_update",
           "multistep_x0", "multistep_derivatives", "dpm_solver_pp_multistep_update",
           "dpm_solver_pp_2m_sample", "sample_with"]  # the grids live in ddpm (DDIM uses them too) and are offered here as well

# ----------------------------------------------------------------------------------------------
# The pieces of one step
# ----------------------------------------------------------------------------------------------

def half_log_snr(alpha_bar: float) -> float:
    """lambda = log( sqrt(abar) / sqrt(1 - abar) ) = (log abar - log(1 - abar)) / 2, in float64; +inf at
    abar = 1 (the data). Lesson: 03_training_and_sampling."""
    alpha_bar = float(alpha_bar)
    if not 0.0 < alpha_bar <= 1.0:
        raise ValueError(f"abar must lie in (0, 1], got {alpha_bar}")
    if alpha_bar == 1.0:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def dpm_solver_pp_update(x_s: torch.Tensor, x0: torch.Tensor, alpha_bar_s: float, alpha_bar_t: float
                         ) -> torch.Tensor:
    """The exponential-integrator step from level s to the later level t with a data estimate ``x0`` held
    fixed over the step:

        x_t = sqrt(1 - abar_t) / sqrt(1 - abar_s) x_s + sqrt(abar_t) (1 - e^-h) x0,  h = lambda_t - lambda_s.

    With ``x0 = x0_hat(x_s)`` this is DDIM's step with eta = 0; DPM-Solver++ 2M passes its corrected estimate
    D instead. At ``alpha_bar_t = 1`` (lambda_t = +inf) it returns ``x0``. ``x_s`` and ``x0``: ``(B, ...)``.
    Lesson: 03_training_and_sampling.
    """
    if x_s.shape != x0.shape:
        raise ValueError(f"x_s has shape {tuple(x_s.shape)} but x0 has {tuple(x0.shape)}")
    alpha_bar_s, alpha_bar_t = float(alpha_bar_s), float(alpha_bar_t)
    h = half_log_snr(alpha_bar_t) - half_log_snr(alpha_bar_s)
    if not h > 0:
        raise ValueError(f"a step must go towards the data (abar_t > abar_s), got abar_s = {alpha_bar_s}, "
                         f"abar_t = {alpha_bar_t}")
    coef_x = math.sqrt((1.0 - alpha_bar_t) / (1.0 - alpha_bar_s))  # sigma_t / sigma_s; 0 at the data
    coef_x0 = math.sqrt(alpha_bar_t) * -math.expm1(-h)             # sqrt(abar_t) (1 - e^-h); 1 at the data
    return coef_x * x_s + coef_x0 * x0


def dpm_solver_pp_sde_update(x_s: torch.Tensor, x0: torch.Tensor, alpha_bar_s: float, alpha_bar_t: float,
                             z: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """The stochastic step from level s to the later level t with a data estimate ``x0`` and standard normal noise
    ``z`` (all ``(B, ...)``):

        x_t = sigma_t / sigma_s e^-(eta h) x_s + sqrt(abar_t) (1 - e^-(1 + eta) h) x0 + sigma_t sqrt(1 - e^-2 eta h) z,

    sigma = sqrt(1 - abar), h = lambda_t - lambda_s, ``eta`` in [0, 1] (default 1: the reverse SDE; 0: the ODE step
    of :func:`dpm_solver_pp_update`). With ``x0 = x0_hat(x_s)`` and eta = 1 it is DDIM's step with eta = 1. At
    ``alpha_bar_t = 1`` it returns ``x0``. Lesson: 03_training_and_sampling.
    """
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: the ODE, 1: the reverse SDE), got {eta}")
    if not (x_s.shape == x0.shape == z.shape):
        raise ValueError(f"x_s, x0 and z must share a shape, got {tuple(x_s.shape)}, {tuple(x0.shape)}, "
                         f"{tuple(z.shape)}")
    alpha_bar_s, alpha_bar_t = float(alpha_bar_s), float(alpha_bar_t)
    h = half_log_snr(alpha_bar_t) - half_log_snr(alpha_bar_s)
    if not h > 0:
        raise ValueError(f"a step must go towards the data (abar_t > abar_s), got abar_s = {alpha_bar_s}, "
                         f"abar_t = {alpha_bar_t}")
    sigma_s, sigma_t = math.sqrt(1.0 - alpha_bar_s), math.sqrt(1.0 - alpha_bar_t)
    if math.isinf(h):                                                  # to the data: x0 itself, whatever eta
        return x0.clone()
    coef_x = sigma_t / sigma_s * math.exp(-eta * h)
    coef_x0 = math.sqrt(alpha_bar_t) * -math.expm1(-(1.0 + eta) * h)  # sqrt(abar_t) (1 - e^-(1 + eta) h)
    coef_z = sigma_t * math.sqrt(-math.expm1(-2.0 * eta * h))           # sigma_t sqrt(1 - e^-2 eta h)
    return coef_x * x_s + coef_x0 * x0 + coef_z * z


def multistep_x0(x0_hat: torch.Tensor, x0_hat_prev: torch.Tensor, h: float, h_prev: float) -> torch.Tensor:
    """DPM-Solver++ 2M's data estimate for a step of size h (in lambda) from the current estimate and the one
    of the previous step, h_prev before it: with r = h_prev / h,

        D = (1 + 1 / (2 r)) x0_hat - 1 / (2 r) x0_hat_prev = x0_hat + h / (2 h_prev) (x0_hat - x0_hat_prev).

    Both estimates ``(B, ...)``; h and h_prev finite and > 0. Lesson: 03_training_and_sampling.
    """
    if x0_hat.shape != x0_hat_prev.shape:
        raise ValueError(f"the two estimates differ in shape: {tuple(x0_hat.shape)} and {tuple(x0_hat_prev.shape)}")
    if not (0 < h < math.inf and 0 < h_prev < math.inf):
        raise ValueError(f"the second-order correction needs finite step sizes > 0, got h = {h}, h_prev = {h_prev}")
    half_over_r = h / (2.0 * h_prev)  # 1 / (2 r)
    return (1.0 + half_over_r) * x0_hat - half_over_r * x0_hat_prev


def multistep_derivatives(x0_hat: torch.Tensor, x0_hat_1: torch.Tensor, x0_hat_2: Optional[torch.Tensor], h: float,
                          h_1: float, h_2: float = math.nan) -> Tuple[torch.Tensor, torch.Tensor]:
    """The derivative terms of the multistep solvers at the current level s, in units of the coming step h (in
    lambda): ``(D1, D2)`` with D1 ~ h x0' and D2 ~ h^2 x0'' / 2, from the current estimate ``x0_hat``, the one h_1
    before it (``x0_hat_1``) and, for the quadratic fit of 3M, the one h_2 before that (``x0_hat_2``; None: a line
    through two estimates, D2 = 0). With r_1 = h_1 / h and r_2 = h_2 / h:

        D1_0 = (x0_hat - x0_hat_1) / r_1,   D1_1 = (x0_hat_1 - x0_hat_2) / r_2,
        D2 = (D1_0 - D1_1) / (r_1 + r_2),    D1 = D1_0 + r_1 D2,

    which is exact for a quadratic x0_hat(lambda). Lesson: 03_training_and_sampling.
    """
    if not (0 < h < math.inf and 0 < h_1 < math.inf):
        raise ValueError(f"the multistep terms need finite step sizes > 0, got h = {h}, h_1 = {h_1}")
    d1_0 = (x0_hat - x0_hat_1) * (h / h_1)
    if x0_hat_2 is None:
        return d1_0, torch.zeros_like(d1_0)
    if not 0 < h_2 < math.inf:
        raise ValueError(f"the quadratic fit needs a finite h_2 > 0, got h_2 = {h_2}")
    r_1, r_2 = h_1 / h, h_2 / h
    d2 = (d1_0 - (x0_hat_1 - x0_hat_2) / r_2) / (r_1 + r_2)
    return d1_0 + r_1 * d2, d2


def dpm_solver_pp_multistep_update(x_s: torch.Tensor, x0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                                   alpha_bar_s: float, alpha_bar_t: float, z: Optional[torch.Tensor] = None,
                                   eta: float = 0.0) -> torch.Tensor:
    """The step of DPM-Solver++ 3M (and, with ``d2 = 0``, of its second step) from level s to the later level t:

        x_t = sigma_t / sigma_s e^-(eta h) x_s + sqrt(abar_t) [ (1 - e^-H) x0 + phi_2(H) d1 - 2 phi_3(H) d2 ]
              + sigma_t sqrt(1 - e^-2 eta h) z,       H = (1 + eta) h,

    with ``d1``, ``d2`` from :func:`multistep_derivatives` and ``z`` standard normal noise (needed when eta > 0).
    eta = 0 (default) is the ODE, eta = 1 the reverse SDE. The step to abar = 1 must be first order and is not
    taken here. Lesson: 03_training_and_sampling.
    """
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: the ODE, 1: the reverse SDE), got {eta}")
    if eta > 0 and z is None:
        raise ValueError("eta > 0 adds noise: pass z")
    alpha_bar_s, alpha_bar_t = float(alpha_bar_s), float(alpha_bar_t)
    h = half_log_snr(alpha_bar_t) - half_log_snr(alpha_bar_s)
    if not 0 < h < math.inf:
        raise ValueError(f"a multistep step goes towards the data, short of it (abar_s < abar_t < 1), got "
                         f"abar_s = {alpha_bar_s}, abar_t = {alpha_bar_t}")
    big_h = (1.0 + eta) * h
    phi_1 = -math.expm1(-big_h)                      # 1 - e^-H
    if big_h < 1e-4:                                 # their series, where the closed forms cancel
        phi_2, phi_3 = big_h / 2 - big_h ** 2 / 6 + big_h ** 3 / 24, -big_h / 6 + big_h ** 2 / 24 - big_h ** 3 / 120
    else:
        phi_2 = 1.0 - phi_1 / big_h                  # 1 + (e^-H - 1) / H
        phi_3 = phi_2 / big_h - 0.5
    sigma_s, sigma_t, a_t = math.sqrt(1.0 - alpha_bar_s), math.sqrt(1.0 - alpha_bar_t), math.sqrt(alpha_bar_t)
    x_t = sigma_t / sigma_s * math.exp(-eta * h) * x_s + a_t * (phi_1 * x0 + phi_2 * d1 - 2.0 * phi_3 * d2)
    if eta > 0:
        x_t = x_t + sigma_t * math.sqrt(-math.expm1(-2.0 * eta * h)) * z
    return x_t


def _predict_x0(diffusion: GaussianDiffusion, model: Model, x: torch.Tensor, t: int, clip: bool,
                model_kwargs: Optional[Dict[str, Any]]) -> torch.Tensor:
    tt = diffusion._t_on(int(t), x)  # made on x's device and never range-checked again
    eps = model(x, tt, **(model_kwargs or {}))
    if eps.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(eps.shape)} for an input of shape {tuple(x.shape)}; "
                         "an eps-prediction must have the input's shape")
    x0_hat = diffusion.predict_x0_from_eps(x, tt, eps)
    return x0_hat.clamp(-1.0, 1.0) if clip else x0_hat


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def dpm_solver_pp_2m_sample(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], steps: int = 20,
                            spacing: str = "linspace", clip_x0: Optional[bool] = None,
                            x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                            device: Optional[Union[str, torch.device]] = None, progress: bool = False,
                            model_kwargs: Optional[Dict[str, Any]] = None, return_trajectory: bool = False,
                            lower_order_final: bool = True, sde: bool = False, eta: Optional[float] = None,
                            order: int = 2) -> Union[torch.Tensor, Tuple[torch.Tensor, Trajectory]]:
    """Sample with DPM-Solver++ 2M (Lu et al. 2022, Algorithm 2): ``steps`` network calls, deterministic given x_T;
    with ``sde`` the stochastic DPM-Solver++ 2M SDE (:func:`dpm_solver_pp_sde_update`), whose fresh noise at every
    step but the last is drawn from ``generator`` after x_T (on the device of x); ``eta`` in [0, 1] sets how much of
    it (default 1, the reverse SDE; see the module's docstring), and is only taken with ``sde``. ``order=3`` gives
    DPM-Solver++ 3M (and with ``sde`` its SDE form): first order at the first step, second at the second, third
    from then on (:func:`dpm_solver_pp_multistep_update`).

    Used like :meth:`GaussianDiffusion.ddim_sample`: ``model(x_t, t, **model_kwargs) -> eps_theta`` (any
    callable; an ``nn.Module`` is put in eval mode while sampling and back in training mode after), x_T drawn
    from ``generator`` on the CPU unless given, ``shape`` ``(B, ...)``. The levels come from
    :func:`timesteps` with ``spacing``. Step 1 is first order (DDIM with eta = 0), the middle steps use
    :func:`multistep_x0`, the last step to abar = 1 is first order and returns the last x0_hat. With
    ``lower_order_final`` (default) a step more than twice as long in lambda as the one before it is first order
    too (see the module's docstring); ``False`` gives the paper's Algorithm 2 verbatim. With ``clip_x0``
    (default: ``diffusion.clip_x0``) every x0_hat is clamped to [-1, 1] before it enters an update. With
    ``return_trajectory`` also returns a :class:`~diffusion_course.ddpm.Trajectory` of x_T and every x after a
    step (on the CPU), labelled with the lecture's t (T first, 0 for the sample), as ``ddim_sample`` does.

    Lesson: 03_training_and_sampling.
    """
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}; "
                        "call dpm_solver_pp_2m_sample(diffusion, model, shape, ...)")
    if order not in (2, 3):
        raise ValueError(f"order must be 2 (DPM-Solver++ 2M) or 3 (3M), got {order!r}")
    if eta is not None and not sde and eta != 0:
        raise ValueError(f"eta sets the noise of the SDE form: pass sde=True with eta = {eta}, or no eta")
    eta = 1.0 if eta is None else float(eta)
    if sde and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: the ODE, 1: the reverse SDE), got {eta}")
    seq = timesteps(diffusion.T, steps, spacing, diffusion.alpha_bar)
    clip = diffusion.clip_x0 if clip_x0 is None else bool(clip_x0)
    name = f"DPM-Solver++ {order}M{f' SDE (eta {eta:g})' if sde else ''} ({steps} steps)"
    with evaluating(model):
        x = diffusion._start(model, shape, x_T, generator, device)
        frames, times = ([x.cpu()] if return_trajectory else []), [diffusion.T]
        x0_prev: Optional[torch.Tensor] = None
        x0_prev2: Optional[torch.Tensor] = None
        h_prev = h_prev2 = math.nan
        for k, t in enumerate(tqdm(seq, desc=name, disable=not progress, leave=False)):
            t_next = seq[k + 1] if k + 1 < len(seq) else -1  # -1: the data, abar = 1
            alpha_bar_s = float(diffusion.alpha_bar[t])
            alpha_bar_t = float(diffusion.alpha_bar[t_next]) if t_next >= 0 else 1.0
            h = half_log_snr(alpha_bar_t) - half_log_snr(alpha_bar_s)
            x0_hat = _predict_x0(diffusion, model, x, t, clip, model_kwargs)
            # first order: the first step (no history), the last one (h = +inf), and with lower_order_final a step
            # more than twice as long as the one before (extrapolation weight h / (2 h_prev) > 1)
            first_order = x0_prev is None or t_next < 0 or (lower_order_final and h > 2.0 * h_prev)
            z = diffusion._randn(x.shape, like=x, generator=generator) if sde and t_next >= 0 else None
            if order == 3 and not first_order:
                d1, d2 = multistep_derivatives(x0_hat, x0_prev, x0_prev2, h, h_prev, h_prev2)
                x = dpm_solver_pp_multistep_update(x, x0_hat, d1, d2, alpha_bar_s, alpha_bar_t, z,
                                                   eta if sde else 0.0)
            else:
                d = x0_hat if first_order else multistep_x0(x0_hat, x0_prev, h, h_prev)
                if z is not None:
                    x = dpm_solver_pp_sde_update(x, d, alpha_bar_s, alpha_bar_t, z, eta)
                else:
                    x = dpm_solver_pp_update(x, d, alpha_bar_s, alpha_bar_t)
            x0_prev2, h_prev2 = (x0_prev, h_prev) if not first_order else (None, math.nan)
            x0_prev, h_prev = x0_hat, h
            if return_trajectory:
                frames.append(x.cpu())
                times.append(t_next + 1)
    if return_trajectory:
        return x, Trajectory(torch.stack(frames), times)
    return x


# ----------------------------------------------------------------------------------------------
# One entry point for every sampler of the course
# ----------------------------------------------------------------------------------------------

SAMPLERS = ("ddim", "ddpm", "dpmpp2m", "dpmpp2m_sde", "dpmpp3m", "dpmpp3m_sde")
DEFAULT_STEPS = {"ddim": 50, "dpmpp2m": 20, "dpmpp2m_sde": 25, "dpmpp3m": 20, "dpmpp3m_sde": 25}


def sample_with(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], sampler: str = "ddim",
                steps: Optional[int] = None, eta: Optional[float] = None, generator: Optional[torch.Generator] = None,
                device: Optional[Union[str, torch.device]] = None, progress: bool = False,
                model_kwargs: Optional[Dict[str, Any]] = None, x_T: Optional[torch.Tensor] = None,
                spacing: str = "linspace") -> torch.Tensor:
    """Samples ``shape`` with the sampler named ``sampler``: ``"ddim"`` (``steps`` calls, default 50, with
    ``eta``, default 0), ``"ddpm"`` (Algorithm 2, all T steps: ``steps`` must be None or T), ``"dpmpp2m"``
    (DPM-Solver++ 2M, ``steps`` calls, default 20, deterministic: ``eta`` None or 0) or ``"dpmpp2m_sde"`` (its
    stochastic form, default 25 steps, with ``eta`` in [0, 1], default 1), and ``"dpmpp3m"`` / ``"dpmpp3m_sde"``
    the same at third order (DPM-Solver++ 3M). The trainer's sample grids, ``sample_images``, latent
    diffusion and ``python -m diffusion_course sample --sampler`` all sample through here. Lesson:
    03_training_and_sampling."""
    common = dict(generator=generator, device=device, progress=progress, model_kwargs=model_kwargs, x_T=x_T)
    if sampler == "ddim":
        return diffusion.ddim_sample(model, shape, steps=steps or DEFAULT_STEPS["ddim"], eta=eta or 0.0, spacing=spacing,
                                     **common)
    if sampler == "ddpm":
        if steps not in (None, diffusion.T):
            raise ValueError(f"DDPM sampling takes all T = {diffusion.T} steps; use 'ddim' or 'dpmpp2m' for {steps}")
        return diffusion.sample(model, shape, **common)
    if sampler in ("dpmpp2m", "dpmpp3m"):
        if eta:
            raise ValueError(f"DPM-Solver++ {sampler[5]}M solves the deterministic ODE: eta must be 0, got {eta}")
        return dpm_solver_pp_2m_sample(diffusion, model, shape, steps=steps or DEFAULT_STEPS[sampler],
                                       spacing=spacing, order=int(sampler[5]), **common)
    if sampler in ("dpmpp2m_sde", "dpmpp3m_sde"):
        return dpm_solver_pp_2m_sample(diffusion, model, shape, steps=steps or DEFAULT_STEPS[sampler],
                                       spacing=spacing, sde=True, eta=eta, order=int(sampler[5]), **common)
    raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
