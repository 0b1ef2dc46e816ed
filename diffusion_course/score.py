"""The score view of DDPM: eps_theta as a scaled score, Tweedie's formula, and annealed Langevin dynamics.

Taught in lesson 03_training_and_sampling (section "The score view").

Notation of the lecture: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), so that
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Its score, the gradient of the log-density in x_t, is

    grad_{x_t} log q(x_t | x_0) = -(x_t - sqrt(abar_t) x_0) / (1 - abar_t) = -eps / sqrt(1 - abar_t).

Minimising L_simple over eps_theta is therefore denoising score matching (Vincent 2011) with the score model
s_theta(x_t, t) = -eps_theta(x_t, t) / sqrt(1 - abar_t), and its minimiser is the score of the marginal q(x_t).
Tweedie's formula turns a score into the posterior mean of the clean data,

    E[x_0 | x_t] = (x_t + (1 - abar_t) grad log q(x_t)) / sqrt(abar_t),

which with the learned score is exactly the x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) of every
sampler step.

**Annealed Langevin dynamics** (Song & Ermon 2019, *Generative Modeling by Estimating Gradients of the Data
Distribution*) samples with the score alone: at each noise level, from the noisiest to the cleanest, a few steps

    x <- x + (step / 2) s(x) + sqrt(step) z,   z ~ N(0, I),

each of which leaves the level's distribution (nearly) unchanged while mixing the sample over it. Their levels are
"variance exploding": y = x_0 + sigma eps, with step alpha_i = epsilon sigma_i^2 / sigma_L^2 at level i (sigma_L the
smallest). DDPM's levels are "variance preserving", and the two are one change of scale apart:
y = x_t / sqrt(abar_t) has sigma_t^2 = (1 - abar_t) / abar_t. A Langevin step of size alpha in y is a step of size
abar_t alpha in x_t (the score scales by sqrt(abar_t), the noise by sqrt(abar_t) too), so their rule becomes

    step_t = abar_t epsilon sigma_t^2 / sigma_L^2 = r (1 - abar_t),   r = epsilon / sigma_L^2,

a step proportional to the level's noise variance 1 - abar_t. The package takes ``step_size`` = r, the step in units
of that variance (Song & Ermon's epsilon = 2e-5 with sigma_L = 0.01 is r = 0.2). Moving on to the next, less noisy
level carries y over unchanged, as theirs does: x <- x sqrt(abar_next / abar_t).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from .ddpm import GaussianDiffusion, Model, Trajectory, timesteps
from .utils import evaluating

__all__ = ["eps_to_score", "score_to_eps", "tweedie_x0", "model_score", "langevin_step", "langevin_step_sizes",
           "annealed_langevin_sample"]

AlphaBar = Union[float, torch.Tensor]


def _alpha_bar_like(alpha_bar_t: AlphaBar, x: torch.Tensor, allow_one: bool, what: str) -> torch.Tensor:
    """abar_t as a tensor that broadcasts against ``x`` (a ``(B,)`` tensor is shaped ``(B, 1, ...)``), cast to x's
    dtype and device, its values checked: in (0, 1), or (0, 1] where ``allow_one``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    ab = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    if ab.numel() == 0 or not torch.isfinite(ab).all():
        raise ValueError(f"{what}: abar_t must be finite numbers, got {alpha_bar_t!r}")
    lo, hi = float(ab.min()), float(ab.max())
    if lo <= 0.0 or hi > 1.0 or (hi == 1.0 and not allow_one):
        valid = "(0, 1]" if allow_one else "(0, 1) (at abar_t = 1 there is no noise, so no score)"
        raise ValueError(f"{what}: abar_t must lie in {valid}, got values in [{lo}, {hi}]")
    if ab.ndim == 1 and x.ndim > 1 and ab.shape[0] == x.shape[0]:
        ab = ab.reshape(-1, *([1] * (x.ndim - 1)))  # one abar per example
    try:
        torch.broadcast_shapes(ab.shape, x.shape)
    except RuntimeError as e:
        raise ValueError(f"{what}: abar_t of shape {tuple(ab.shape)} does not broadcast against x of shape "
                         f"{tuple(x.shape)}; pass a float, a (B,) tensor or a broadcastable one") from e
    dtype = x.dtype if x.is_floating_point() else torch.float32
    return ab.to(device=x.device, dtype=dtype)


def eps_to_score(eps: torch.Tensor, alpha_bar_t: AlphaBar) -> torch.Tensor:
    """s = -eps / sqrt(1 - abar_t): a noise prediction as a score of q(x_t). ``eps`` ``(B, ...)``, ``alpha_bar_t`` a
    float in (0, 1) or a ``(B,)`` (or broadcastable) tensor. Lesson: 03_training_and_sampling."""
    ab = _alpha_bar_like(alpha_bar_t, eps, allow_one=False, what="eps_to_score")
    return -eps / torch.sqrt(1.0 - ab)


def score_to_eps(score: torch.Tensor, alpha_bar_t: AlphaBar) -> torch.Tensor:
    """eps = -sqrt(1 - abar_t) s, the inverse of :func:`eps_to_score`. Lesson: 03_training_and_sampling."""
    ab = _alpha_bar_like(alpha_bar_t, score, allow_one=False, what="score_to_eps")
    return -torch.sqrt(1.0 - ab) * score


def tweedie_x0(xt: torch.Tensor, score: torch.Tensor, alpha_bar_t: AlphaBar) -> torch.Tensor:
    """Tweedie's formula E[x_0 | x_t] = (x_t + (1 - abar_t) grad log q(x_t)) / sqrt(abar_t), ``(B, ...)``.

    With the learned score s_theta = -eps_theta / sqrt(1 - abar_t) it is the x0_hat of every sampler step,
    (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t). Lesson: 03_training_and_sampling.
    """
    if not isinstance(score, torch.Tensor) or score.shape != getattr(xt, "shape", None):
        raise ValueError(f"tweedie_x0: x_t and the score must be tensors of one shape, got "
                         f"{tuple(getattr(xt, 'shape', ()))} and {tuple(getattr(score, 'shape', ()))}")
    ab = _alpha_bar_like(alpha_bar_t, xt, allow_one=True, what="tweedie_x0")
    return (xt + (1.0 - ab) * score) / torch.sqrt(ab)


def model_score(diffusion: GaussianDiffusion, model: Model, xt: torch.Tensor, t: Union[int, torch.Tensor],
                model_kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """The learned score s_theta(x_t, t) = -eps_theta(x_t, t) / sqrt(1 - abar_t), ``(B, ...)``; ``t`` an array index
    (or a ``(B,)`` tensor of them) as everywhere in the package. Lesson: 03_training_and_sampling."""
    tt = diffusion._t_on(t, xt)
    eps = model(xt, tt, **(model_kwargs or {}))
    if eps.shape != xt.shape:
        raise ValueError(f"the model returned shape {tuple(eps.shape)} for an input of shape {tuple(xt.shape)}; "
                         "an eps-prediction must have the input's shape")
    return -eps / diffusion.extract(diffusion.sqrt_one_minus_alpha_bar, tt, xt)


def langevin_step(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, step_size: float,
                  z: torch.Tensor) -> torch.Tensor:
    """One step of Langevin dynamics, x + (step / 2) score(x) + sqrt(step) z, ``(B, ...)``.

    ``score_fn(x)`` returns the score at x, of x's shape; ``z`` is a draw from N(0, I) of x's shape; ``step_size``
    > 0. Repeated with fresh z, the steps sample (for small steps) the density whose score it is.
    Lesson: 03_training_and_sampling.
    """
    step_size = float(step_size)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"the Langevin step size must be a finite number > 0, got {step_size}")
    if z.shape != x.shape:
        raise ValueError(f"z has shape {tuple(z.shape)} but x has {tuple(x.shape)}")
    score = score_fn(x)
    if score.shape != x.shape:
        raise ValueError(f"the score function returned shape {tuple(score.shape)} for x of shape {tuple(x.shape)}")
    return x + 0.5 * step_size * score + math.sqrt(step_size) * z


def langevin_step_sizes(diffusion: GaussianDiffusion, levels: Sequence[int], step_size: float) -> List[float]:
    """The step at each of ``levels`` (array indices): ``step_size * (1 - abar_t)``, Song & Ermon's
    epsilon sigma_t^2 / sigma_L^2 translated to DDPM's levels (see the module's docstring). Lesson:
    03_training_and_sampling."""
    step_size = float(step_size)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"step_size must be a finite number > 0 (the step in units of 1 - abar_t), got {step_size}")
    for t in levels:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < diffusion.T:
            raise ValueError(f"levels must be array indices in [0, {diffusion.T}), got {t!r}")
    return [step_size * float(diffusion.one_minus_alpha_bar[t]) for t in levels]


@torch.no_grad()
def annealed_langevin_sample(diffusion: GaussianDiffusion, model: Model, shape: Sequence[int], levels: int = 100,
                             steps_per_level: int = 10, step_size: float = 0.2, spacing: str = "linspace",
                             denoise: bool = False, x_T: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None,
                             device: Optional[Union[str, torch.device]] = None, progress: bool = False,
                             model_kwargs: Optional[Dict[str, Any]] = None, return_trajectory: bool = False
                             ) -> Union[torch.Tensor, Tuple[torch.Tensor, Trajectory]]:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) on DDPM's noise levels, with the learned
    eps_theta as the score s_theta = -eps_theta / sqrt(1 - abar_t).

    Start from x_T ~ N(0, I) (q(x_T) for DDPM's schedules) at the noisiest of ``levels`` array indices chosen by
    :func:`~diffusion_course.ddpm.timesteps` with ``spacing`` (``"linspace"``: T - 1 down to 0). At each level t
    take ``steps_per_level`` steps x <- x + (step_t / 2) s_theta(x, t) + sqrt(step_t) z with
    step_t = ``step_size`` * (1 - abar_t) (the rule of the module's docstring), then move to the next level with
    x <- x sqrt(abar_next / abar_t). With ``denoise`` one more network call returns Tweedie's E[x_0 | x] at the
    last level instead of the last Langevin iterate (not in the 2019 paper; later score models end so).

    Song & Ermon's hand-over assumes that neighbouring levels are close and that each level's steps pull the
    sample in: with DDPM's linear schedule at T = 1000, 100 levels multiply x by at most about 1.1 per hand-over
    (at the top of the schedule, where abar changes fastest in ratio). With few, widely spaced levels and small
    steps the samples grow from level to level; a result that is not finite raises ``FloatingPointError``.

    Network calls: ``levels * steps_per_level`` (+1 with ``denoise``). Noise (x_T, then one z per step) comes from
    ``generator`` on the CPU and is copied to the device, as for the other samplers, so a seed gives the same
    numbers everywhere. ``model(x_t, t, **model_kwargs) -> eps_theta``, ``shape`` ``(B, ...)``. With
    ``return_trajectory`` also returns a :class:`~diffusion_course.ddpm.Trajectory` of x_T and x after each level
    (on the CPU), labelled with the lecture's t of that level. Lesson: 03_training_and_sampling.
    """
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}; "
                        "call annealed_langevin_sample(diffusion, model, shape, ...)")
    if isinstance(steps_per_level, bool) or not isinstance(steps_per_level, int) or steps_per_level < 1:
        raise ValueError(f"steps_per_level must be an integer >= 1, got {steps_per_level!r}")
    seq = timesteps(diffusion.T, levels, spacing, diffusion.alpha_bar)
    steps = langevin_step_sizes(diffusion, seq, step_size)
    with evaluating(model):
        x = diffusion._start(model, shape, x_T, generator, device)
        frames, times = ([x.cpu()] if return_trajectory else []), [diffusion.T]
        for k, (t, step) in enumerate(tqdm(list(zip(seq, steps)), desc="annealed Langevin", disable=not progress,
                                           leave=False)):
            if k > 0:  # y = x / sqrt(abar) carries over from one level to the next
                x = x * math.sqrt(float(diffusion.alpha_bar[t]) / float(diffusion.alpha_bar[seq[k - 1]]))
            tt = diffusion._t_on(t, x)

            def score_fn(x_now: torch.Tensor) -> torch.Tensor:
                return model_score(diffusion, model, x_now, tt, model_kwargs)

            for _ in range(steps_per_level):
                z = diffusion._randn(x.shape, like=x, generator=generator)
                x = langevin_step(score_fn, x, step, z)
            if return_trajectory:
                frames.append(x.cpu())
                times.append(t + 1)
        if denoise:
            t_last = seq[-1]
            x = tweedie_x0(x, model_score(diffusion, model, x, t_last, model_kwargs),
                           float(diffusion.alpha_bar[t_last]))
            if return_trajectory:
                frames.append(x.cpu())
                times.append(0)
    if not torch.isfinite(x).all():
        raise FloatingPointError("annealed Langevin produced NaN or inf: the levels are too far apart for the step "
                                 "size (use more levels, more steps per level or a larger step_size)")
    if return_trajectory:
        return x, Trajectory(torch.stack(frames), times)
    return x
