"""The DDPM diffusion process: forward noising, the posterior, the variational bound, L_simple,
Algorithm 1 (training), Algorithm 2 (sampling) and DDIM.

Taught in lessons 01_forward_process, 02_elbo_to_simple_loss and 03_training_and_sampling.

The process is kept apart from the network (as in Ho et al.'s and Nichol & Dhariwal's code): a
``model`` is any callable ``model(x_t, t) -> eps_theta`` where ``x_t`` has shape ``(B, ...)`` and ``t``
is a ``(B,)`` long tensor of *array indices* ``0..T-1`` (index ``i`` is the lecture's step ``t = i + 1``;
see :mod:`diffusion_course.schedules`). Every coefficient is stored in float64 and cast to the dtype of
the tensor it multiplies.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedules import Schedule, make_betas
from .utils import evaluating

Model = Callable[..., torch.Tensor]
SIGMA_CHOICES = ("beta", "beta_tilde")
SPACINGS = ("linspace", "leading", "trailing", "logsnr")


# ----------------------------------------------------------------------------------------------
# Gaussian helpers (lesson 02)
# ----------------------------------------------------------------------------------------------

def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first (batch). ``(B, ...) -> (B,)``. Lesson: 02_elbo_to_simple_loss."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sum_flat(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first (batch). ``(B, ...) -> (B,)``. Lesson: 02_elbo_to_simple_loss."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats.

    KL = 1/2 [ log(s2^2 / s1^2) + (s1^2 + (m1 - m2)^2) / s2^2 - 1 ]. Arguments broadcast.
    Lesson: 02_elbo_to_simple_loss.
    """
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v) for v in (mean1, logvar1, mean2, logvar2))
    try:
        torch.broadcast_shapes(mean1.shape, logvar1.shape, mean2.shape, logvar2.shape)
    except RuntimeError as e:
        raise ValueError(f"normal_kl: shapes {tuple(mean1.shape)}, {tuple(logvar1.shape)}, "
                         f"{tuple(mean2.shape)}, {tuple(logvar2.shape)} do not broadcast") from e
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), the standard normal CDF. Lesson: 02_elbo_to_simple_loss."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log p(x) of data quantised to ``bins`` levels in [-1, 1] under N(mean, exp(log_scale)^2).

    This is DDPM's decoder L_0: each pixel's probability is the Gaussian mass of its bin of width
    2 / (bins - 1); the two edge bins extend to -inf and +inf. Elementwise, in nats.
    Lesson: 02_elbo_to_simple_loss.
    """
    if x.shape != mean.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but mean has {tuple(mean.shape)}")
    if x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6:
        raise ValueError("discretized_gaussian_log_likelihood expects data scaled to [-1, 1]")
    half_bin = 1.0 / (bins - 1)
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (centred + half_bin))
    cdf_minus = standard_normal_cdf(inv_std * (centred - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -1 + half_bin, log_cdf_plus,
                       torch.where(x > 1 - half_bin, log_one_minus_cdf_minus, log_delta))


def timesteps(T: int, steps: int, spacing: str = "linspace", alpha_bar: Optional[Any] = None) -> List[int]:
    """``steps`` distinct array indices in ``[0, T - 1]``, in decreasing order: the levels a sampler with
    ``steps`` network calls visits before its last step to abar = 1 (x_0).

    * ``"linspace"``: ``round(linspace(0, T - 1, steps))``, evenly spread with both ends included (T - 1 first,
      0 last), exactly :meth:`GaussianDiffusion.ddim_timesteps`'s default. (With ``steps = 1``, ``[T - 1]``: the
      one step starts from x_T's level.)
    * ``"leading"``: the DDIM paper's uniform skip, ``i * (T // steps)`` for ``i = 0 .. steps - 1``, shifted up
      by one as Stable Diffusion does (``steps_offset = 1`` in its scheduler configuration): for T = 1000 and
      50 steps, 981, 961, ..., 21, 1. When ``steps = T`` the shift would leave the table (index T), so there it
      is 0 and the grid is every index. Its first level lies below T - 1, so sampling starts from a level with
      a little signal left while x_T is pure noise.
    * ``"trailing"``: from T - 1 down in strides of T / steps, ``round(T - i * T / steps) - 1`` (numpy's round,
      halves to even): for T = 1000 and 50 steps, 999, 979, ..., 19. It starts at the noisiest level and
      does not reach index 0.
    * ``"logsnr"``: evenly spread in the half log-SNR lambda = log(sqrt(abar) / sqrt(1 - abar)) from index T - 1 to
      index 0, each level the index whose lambda is nearest (kept distinct), as DPM-Solver's code offers
      (``skip_type="logSNR"``, Lu et al. 2022, who recommend it for low-resolution pixel models). It needs the
      schedule: ``alpha_bar``, the T values of abar. For T = 1000 (linear schedule) and 25 steps it visits 999,
      ..., 10, 4, 1, 0: most levels lie where little noise is left, where lambda changes fastest with t and an even
      grid in t takes its largest steps in lambda.

    Lesson: 03_training_and_sampling.
    """
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer (the number of diffusion steps), got {T!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not (1 <= steps <= T):
        raise ValueError(f"steps must be an integer with 1 <= steps <= T = {T}, got {steps!r}")
    T, steps = int(T), int(steps)
    if spacing == "linspace":
        # one step starts where x_T is: at the noisiest level T - 1 (linspace alone would give index 0)
        idx = np.round(np.linspace(0, T - 1, steps)).astype(np.int64)[::-1] if steps > 1 else np.array([T - 1])
    elif spacing == "leading":
        ratio = T // steps
        offset = 1 if (steps - 1) * ratio + 1 <= T - 1 else 0
        idx = (np.arange(steps, dtype=np.int64) * ratio + offset)[::-1]
    elif spacing == "trailing":
        idx = np.round(T - np.arange(steps, dtype=np.float64) * (T / steps)).astype(np.int64) - 1
    elif spacing == "logsnr":
        idx = np.array(_logsnr_levels(T, steps, alpha_bar), dtype=np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    out = [int(i) for i in idx]
    assert len(set(out)) == steps and out == sorted(out, reverse=True) and 0 <= out[-1] and out[0] <= T - 1
    return out


def _logsnr_levels(T: int, steps: int, alpha_bar: Any) -> List[int]:
    """The ``"logsnr"`` grid of :func:`timesteps`: ``steps`` distinct indices, T - 1 first and 0 last, nearest to
    an even grid in the half log-SNR."""
    if alpha_bar is None:
        raise ValueError("the 'logsnr' spacing needs the schedule: pass alpha_bar (the T values of abar)")
    ab = np.asarray(torch.as_tensor(alpha_bar, dtype=torch.float64).cpu(), dtype=np.float64)
    if ab.shape != (T,) or not np.all((ab > 0) & (ab < 1)) or np.any(np.diff(ab) >= 0):
        raise ValueError(f"alpha_bar must hold T = {T} values in (0, 1), decreasing, got shape {ab.shape}")
    if steps == 1:
        return [T - 1]
    lam = 0.5 * (np.log(ab) - np.log1p(-ab))                  # increasing towards index 0
    targets = np.linspace(lam[T - 1], lam[0], steps)
    out: List[int] = []
    for k, target in enumerate(targets):
        i = int(np.argmin(np.abs(lam - target)))
        if out:
            i = min(i, out[-1] - 1)                           # strictly decreasing
        out.append(max(i, steps - 1 - k))                     # room left for the levels still to come
    out[0], out[-1] = T - 1, 0
    return out


def slerp(x_a: torch.Tensor, x_b: torch.Tensor, weights: Union[float, Sequence[float], torch.Tensor]
          ) -> torch.Tensor:
    """Spherical interpolation between two tensors of one shape, along the great circle through them:

        slerp(x_a, x_b, w) = sin((1 - w) theta) / sin(theta) x_a + sin(w theta) / sin(theta) x_b,
        cos(theta) = <x_a, x_b> / (|x_a| |x_b|),

    the angle taken over all their entries. ``w = 0`` gives ``x_a``, ``w = 1`` gives ``x_b``; between two vectors of
    equal norm every point keeps that norm (a straight line between them cuts inside the sphere: its midpoint has
    norm |x_a| cos(theta / 2)). That is why noise x_T is interpolated this way: a Gaussian x_T in d dimensions has
    norm close to sqrt(d), and a point of much smaller norm is one the sampler never saw. ``weights``: a float
    (returns ``x_a``'s shape) or a 1-D sequence or tensor of K floats (returns ``(K, *x_a.shape)``). Nearly parallel
    inputs (sin(theta) < 1e-6) are interpolated linearly. Lesson: 03_training_and_sampling.
    """
    if not isinstance(x_a, torch.Tensor) or not isinstance(x_b, torch.Tensor):
        raise TypeError("slerp interpolates between two tensors")
    if x_a.shape != x_b.shape:
        raise ValueError(f"slerp needs two tensors of one shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim > 1 or not torch.isfinite(w).all():
        raise ValueError(f"weights must be a finite float or a 1-D sequence of them, got {weights!r}")
    a, b = x_a.double().flatten(), x_b.double().flatten()
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a == 0 or norm_b == 0:
        raise ValueError("slerp needs two non-zero tensors (the angle to a zero vector is undefined)")
    theta = torch.arccos((a @ b / (norm_a * norm_b)).clamp(-1.0, 1.0))
    ws = w.reshape(-1, 1)                                                       # (K, 1)
    if torch.sin(theta) < 1e-6:
        out = (1.0 - ws) * a + ws * b
    else:
        out = (torch.sin((1.0 - ws) * theta) * a + torch.sin(ws * theta) * b) / torch.sin(theta)
    out = out.reshape(-1, *x_a.shape).to(device=x_a.device,
                                         dtype=x_a.dtype if x_a.is_floating_point() else torch.float32)
    return out[0] if w.ndim == 0 else out


class Trajectory(NamedTuple):
    """A reverse-process trajectory: ``samples`` of shape ``(K, B, ...)`` from x_T to x_0, and the
    lecture time ``t`` of each (``T, ..., 0``; t = 0 is the final sample). Lesson: 03_training_and_sampling."""

    samples: torch.Tensor
    t: List[int]


# ----------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """The DDPM process for a schedule beta_1..beta_T.

    ``schedule`` is a :class:`~diffusion_course.schedules.Schedule`, a 1-D tensor of betas, or a
    schedule name (``"linear"``, ``"cosine"``, ``"scaled_linear"``) used with ``T`` steps. ``clip_x0`` (default False, which is
    Algorithm 2 verbatim) clamps the predicted x_0 to [-1, 1] while sampling: right for images in pixel
    space, wrong for latents (lesson 08), whose range is not [-1, 1].

    Lesson: 01_forward_process.
    """

    def __init__(self, schedule: Union[Schedule, torch.Tensor, str] = "linear", T: int = 1000,
                 clip_x0: bool = False) -> None:
        if isinstance(schedule, str):
            schedule = Schedule(make_betas(schedule, T))
        elif not isinstance(schedule, Schedule):
            schedule = Schedule(torch.as_tensor(schedule))
        self.schedule = schedule
        self.T = schedule.T
        self.clip_x0 = bool(clip_x0)

        b = schedule.betas  # float64 throughout
        self.betas = b
        self.alphas = 1.0 - b
        self.alpha_bar = torch.cumprod(self.alphas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - self.alpha_bar).sqrt()
        self.sqrt_recip_alpha_bar = (1.0 / self.alpha_bar).sqrt()
        self.sqrt_recipm1_alpha_bar = (1.0 / self.alpha_bar - 1.0).sqrt()
        # posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I)
        self.beta_tilde = b * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        # beta_tilde_1 = 0; its log is clipped to beta_tilde_2 (only used where t > 1 matters)
        self.log_beta_tilde_clipped = torch.log(torch.cat([self.beta_tilde[1:2], self.beta_tilde[1:]]))
        self.posterior_mean_coef_x0 = b * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef_xt = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (1.0 - self.alpha_bar)
        # the products the formulas index, kept as tables so that ``extract`` finds them on every device
        self.sqrt_alphas = self.alphas.sqrt()
        self.sqrt_betas = b.sqrt()
        self.recip_sqrt_alphas = 1.0 / self.sqrt_alphas
        self.one_minus_alpha_bar = 1.0 - self.alpha_bar
        self.eps_coef = b / self.sqrt_one_minus_alpha_bar  # beta_t / sqrt(1 - abar_t), Algorithm 2 line 4
        self.log_betas = torch.log(b)
        self._device_tables: Dict[Tuple[str, torch.device], torch.Tensor] = {}
        # the t tensors the engine made itself (from an integer, or drawn in range): not checked again
        self._own_t: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()

    def __repr__(self) -> str:
        return f"GaussianDiffusion(T={self.T}, clip_x0={self.clip_x0})"

    # -- indexing ----------------------------------------------------------------------------
    def _check_t(self, t: Union[int, torch.Tensor], batch: int, check_values: bool = True) -> torch.Tensor:
        """``t`` as a ``(batch,)`` long tensor on its own device, its values checked to lie in [0, T). The check
        of a tensor on a GPU waits for the GPU (a clear error beats a device-side assert), so it is skipped for
        the t the engine made itself (``_own``: from an integer, or drawn in range) and where
        ``check_values=False``: the sampling and training loops never wait for it."""
        if isinstance(t, int) and not isinstance(t, bool):
            if not 0 <= t < self.T:
                raise ValueError(f"t must lie in [0, {self.T}) (array indices; the lecture's t = index + 1); got {t}")
            return torch.full((batch,), t, dtype=torch.long)
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must hold integer array indices 0..{self.T - 1}, got dtype {t.dtype}")
        t = t.long()
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t must be a scalar or have shape ({batch},) to match the batch; "
                             f"got shape {tuple(t.shape)}")
        if check_values and t.numel() and self._own_t.get(id(t)) is not t:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.T:
                raise ValueError(f"t must lie in [0, {self.T}) (array indices; the lecture's t = index + 1); "
                                 f"got values in [{lo}, {hi}]")
        return t

    def _table_on(self, coef: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``coef`` on ``device``: one of the process's own tables is copied there once and kept (float32 on
        Apple's MPS, which has no float64); any other tensor is copied on every call."""
        if coef.device == device:
            return coef
        dtype = torch.float32 if device.type == "mps" else coef.dtype
        names = [k for k, v in vars(self).items() if v is coef]
        if not names:
            return coef.to(device=device, dtype=dtype)
        key = (names[0], device)
        if key not in self._device_tables:
            self._device_tables[key] = coef.to(device=device, dtype=dtype)
        return self._device_tables[key]

    def extract(self, coef: torch.Tensor, t: Union[int, torch.Tensor], x: torch.Tensor,
                check_values: bool = True) -> torch.Tensor:
        """``coef[t]`` for each batch element, shaped ``(B, 1, 1, ...)`` to broadcast against ``x`` and cast
        to its dtype and device. The lookup runs on ``x``'s device, from a copy of the table kept there, so a
        sampling or training step neither copies coefficients from the host nor waits for the GPU (``t`` an
        integer, a t the engine made, or ``check_values=False``; see ``_check_t``). Lesson: 01_forward_process."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        table = self._table_on(coef, x.device)
        shape = (x.shape[0], *([1] * (x.ndim - 1)))
        if isinstance(t, int) and not isinstance(t, bool):
            self._check_t(t, 1)
            return table[t].to(dtype).expand(shape)
        t = self._check_t(t, x.shape[0], check_values)
        return table[t.to(x.device)].to(dtype).reshape(shape)

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """Mark ``t`` as made by the engine in range, so that no later lookup checks (and waits for) it."""
        self._own_t[id(t)] = t
        return t

    def _t_on(self, t: Union[int, torch.Tensor], x: torch.Tensor, check_values: bool = True) -> torch.Tensor:
        """``t`` as a ``(B,)`` long tensor on ``x``'s device; an integer is made there (no copy from the host)."""
        if isinstance(t, int) and not isinstance(t, bool):
            self._check_t(t, 1)
            return self._own(torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        out = self._check_t(t, x.shape[0], check_values).to(x.device)
        return self._own(out) if out is not t else out  # a copy of checked (or trusted) values

    @staticmethod
    def _randn(shape: Sequence[int], like: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise on ``device`` (or ``like``'s). A CPU ``generator`` draws on the CPU and the noise
        is copied over, so one seed gives the same numbers on every device; a generator on the device draws
        there (fast, reproducible on that kind of device only); none draws from the device's global stream."""
        if like is not None:
            device, dtype = like.device, like.dtype
        device = torch.device(device or "cpu")
        if generator is not None and generator.device.type == "cpu":
            return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"the generator lives on {generator.device} but the noise is for {device}")
        return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)

    def _check_same_shape(self, **tensors: torch.Tensor) -> None:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"shapes must match: {shapes}")

    # -- forward process (lesson 01) -----------------------------------------------------------
    def q_step(self, x_prev: torch.Tensor, t: Union[int, torch.Tensor],
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One forward step: x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

        ``t`` is the array index of step t (so ``t=0`` makes x_1 from x_0). Lesson: 01_forward_process.
        """
        if noise is None:
            noise = torch.randn_like(x_prev)
        self._check_same_shape(x_prev=x_prev, noise=noise)
        return self.extract(self.sqrt_alphas, t, x_prev) * x_prev + self.extract(self.sqrt_betas, t, x_prev) * noise

    def q_mean_variance(self, x0: torch.Tensor, t: Union[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean sqrt(abar_t) x_0 and variance (1 - abar_t) of q(x_t | x_0). Lesson: 01_forward_process."""
        return self.extract(self.sqrt_alpha_bar, t, x0) * x0, self.extract(self.one_minus_alpha_bar, t, x0)

    def q_sample(self, x0: torch.Tensor, t: Union[int, torch.Tensor],
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The closed form x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I).

        Lesson: 01_forward_process.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        self._check_same_shape(x0=x0, noise=noise)
        return self.extract(self.sqrt_alpha_bar, t, x0) * x0 + self.extract(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def q_sample_chain(self, x0: torch.Tensor, t: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_t by iterating q(x_s | x_{s-1}) for s = 1..t+1 (t an array index); the slow route that
        the closed form replaces. Lesson: 01_forward_process."""
        self._check_t(t, x0.shape[0])
        x = x0
        for s in range(int(t) + 1):
            x = self.q_step(x, s, self._randn(x.shape, like=x, generator=generator))
        return x

    # -- posterior and reparameterisation (lesson 02) -----------------------------------------------
    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, t: Union[int, torch.Tensor]
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I):
        mu_tilde_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
        beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.

        Returns (mean, variance, clipped log-variance). Lesson: 02_elbo_to_simple_loss.
        """
        self._check_same_shape(x0=x0, xt=xt)
        mean = self.extract(self.posterior_mean_coef_x0, t, xt) * x0 + self.extract(self.posterior_mean_coef_xt, t, xt) * xt
        return mean, self.extract(self.beta_tilde, t, xt), self.extract(self.log_beta_tilde_clipped, t, xt)

    def predict_x0_from_eps(self, xt: torch.Tensor, t: Union[int, torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t). Lesson: 02_elbo_to_simple_loss."""
        self._check_same_shape(xt=xt, eps=eps)
        return self.extract(self.sqrt_recip_alpha_bar, t, xt) * xt - self.extract(self.sqrt_recipm1_alpha_bar, t, xt) * eps

    def predict_eps_from_x0(self, xt: torch.Tensor, t: Union[int, torch.Tensor], x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t). Lesson: 02_elbo_to_simple_loss."""
        self._check_same_shape(xt=xt, x0=x0)
        return (xt - self.extract(self.sqrt_alpha_bar, t, xt) * x0) / self.extract(self.sqrt_one_minus_alpha_bar, t, xt)

    def mu_from_eps(self, xt: torch.Tensor, t: Union[int, torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
        """mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta), the mean of
        Algorithm 2, line 4. Lesson: 02_elbo_to_simple_loss."""
        self._check_same_shape(xt=xt, eps=eps)
        return self.extract(self.recip_sqrt_alphas, t, xt) * (xt - self.extract(self.eps_coef, t, xt) * eps)

    def sigma_squared(self, kind: str = "beta") -> torch.Tensor:
        """The fixed reverse variances sigma_t^2, float64 ``(T,)``: ``"beta"`` (sigma_t^2 = beta_t, best for
        x_0 ~ N(0, I)) or ``"beta_tilde"`` (sigma_t^2 = beta_tilde_t, best for a single fixed x_0); DDPM
        found both give similar samples. Lesson: 03_training_and_sampling."""
        if kind == "beta":
            return self.betas
        if kind == "beta_tilde":
            return self.beta_tilde
        raise ValueError(f"unknown sigma choice {kind!r}; valid: {', '.join(SIGMA_CHOICES)}")

    def eps_mse_weight(self, t: Union[int, torch.Tensor], sigma: str = "beta_tilde",
                       like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) with which
        L_{t-1} = lambda_t ||eps - eps_theta||^2 + C. ``(B,)`` float64. Lesson: 02_elbo_to_simple_loss."""
        s2 = self.sigma_squared(sigma)
        w = self.betas ** 2 / (2.0 * s2 * self.alphas * (1.0 - self.alpha_bar))
        t = self._check_t(t, like.shape[0] if like is not None else torch.as_tensor(t).reshape(-1).shape[0])
        return w[t.cpu()]

    # -- the reverse process -----------------------------------------------------------------
    def p_mean_variance(self, model: Model, xt: torch.Tensor, t: Union[int, torch.Tensor], sigma: str = "beta",
                        clip_x0: Optional[bool] = None, model_kwargs: Optional[Dict[str, Any]] = None
                        ) -> Dict[str, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) from an eps-prediction.

        Without clipping, mu_theta is Algorithm 2's line 4. With ``clip_x0`` the predicted x_0 is clamped to
        [-1, 1] and mu_theta = mu_tilde_t(x_t, x_0_clamped) (the same value when nothing is clamped).
        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``x0_pred`` and ``eps``.
        Lesson: 03_training_and_sampling.
        """
        clip = self.clip_x0 if clip_x0 is None else clip_x0
        tt = self._t_on(t, xt)
        eps = model(xt, tt, **(model_kwargs or {}))
        if eps.shape != xt.shape:
            raise ValueError(f"the model returned shape {tuple(eps.shape)} for an input of shape "
                             f"{tuple(xt.shape)}; an eps-prediction must have the input's shape")
        x0_pred = self.predict_x0_from_eps(xt, tt, eps)
        if clip:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
            mean, _, _ = self.q_posterior_mean_variance(x0_pred, xt, tt)
        else:
            mean = self.mu_from_eps(xt, tt, eps)
        s2 = self.sigma_squared(sigma)
        log_s2 = self.log_betas if sigma == "beta" else self.log_beta_tilde_clipped
        return {"mean": mean, "variance": self.extract(s2, tt, xt), "log_variance": self.extract(log_s2, tt, xt),
                "x0_pred": x0_pred, "eps": eps}

    @torch.no_grad()
    def p_sample(self, model: Model, xt: torch.Tensor, t: int, sigma: str = "beta", clip_x0: Optional[bool] = None,
                 generator: Optional[torch.Generator] = None, model_kwargs: Optional[Dict[str, Any]] = None
                 ) -> torch.Tensor:
        """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step.

        ``t`` is the array index (0 is the lecture's t = 1, where z = 0). Lesson: 03_training_and_sampling.
        """
        out = self.p_mean_variance(model, xt, t, sigma, clip_x0, model_kwargs)
        if int(t) == 0:
            return out["mean"]
        z = self._randn(xt.shape, like=xt, generator=generator)
        return out["mean"] + out["variance"].sqrt() * z

    def _start(self, model: Model, shape: Sequence[int], x_T: Optional[torch.Tensor],
               generator: Optional[torch.Generator], device: Optional[Union[str, torch.device]]) -> torch.Tensor:
        if device is None:  # from x_T, else from the model's weights, else the CPU
            params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
            device = x_T.device if x_T is not None else (params[0].device if params else torch.device("cpu"))
        if x_T is not None:
            if tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
            return x_T.to(device)
        return self._randn(shape, generator=generator, device=torch.device(device))

    @torch.no_grad()
    def sample(self, model: Model, shape: Sequence[int], sigma: str = "beta", clip_x0: Optional[bool] = None,
               return_trajectory: bool = False, trajectory_stride: int = 1, x_T: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, device: Optional[Union[str, torch.device]] = None,
               progress: bool = True, model_kwargs: Optional[Dict[str, Any]] = None
               ) -> Union[torch.Tensor, Tuple[torch.Tensor, Trajectory]]:
        """Algorithm 2: x_T ~ N(0, I); for t = T..1, x_{t-1} = mu_theta(x_t, t) + sigma_t z; return x_0.

        With ``return_trajectory`` also returns a :class:`Trajectory` keeping every ``trajectory_stride``-th
        x_t (on the CPU), x_T first and x_0 last. Lesson: 03_training_and_sampling.
        """
        with evaluating(model):
            x = self._start(model, shape, x_T, generator, device)
            frames, times = ([x.cpu()] if return_trajectory else []), [self.T]
            for i in tqdm(range(self.T - 1, -1, -1), desc="DDPM sampling", disable=not progress, leave=False):
                x = self.p_sample(model, x, i, sigma, clip_x0, generator, model_kwargs)
                if return_trajectory and (i % trajectory_stride == 0):
                    frames.append(x.cpu())
                    times.append(i)
        if return_trajectory:
            return x, Trajectory(torch.stack(frames), times)
        return x

    # -- DDIM (beyond the lecture; lesson 03) -------------------------------------------------------
    def ddim_timesteps(self, steps: int, spacing: str = "linspace") -> List[int]:
        """``steps`` array indices in decreasing order, the levels DDIM visits: by default spread evenly over
        0..T-1 (T-1 first, 0 last); ``spacing="leading"`` or ``"trailing"`` gives the grids of the DDIM code and
        Stable Diffusion (see :func:`timesteps`). Lesson: 03_training_and_sampling.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or not (1 <= steps <= self.T):
            raise ValueError(f"DDIM needs 1 <= steps <= T = {self.T}, got {steps!r}")
        return timesteps(self.T, steps, spacing, self.alpha_bar)

    @torch.no_grad()
    def ddim_step(self, model: Model, xt: torch.Tensor, t: int, t_prev: int, eta: float = 0.0,
                  clip_x0: Optional[bool] = None, generator: Optional[torch.Generator] = None,
                  model_kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """One DDIM update from index ``t`` to index ``t_prev`` (``-1`` means x_0, abar = 1) (Song et al. 2021):
        x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - s^2) eps + s z, with
        s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
        eta = 0 is deterministic; eta = 1 with consecutive steps is DDPM's ancestral step with
        sigma_t^2 = beta_tilde_t. Lesson: 03_training_and_sampling.
        """
        if not (-1 <= t_prev < t):
            raise ValueError(f"need -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        clip = self.clip_x0 if clip_x0 is None else clip_x0
        tt = self._t_on(t, xt)
        eps = model(xt, tt, **(model_kwargs or {}))
        if eps.shape != xt.shape:
            raise ValueError(f"the model returned shape {tuple(eps.shape)} for input {tuple(xt.shape)}")
        ab = float(self.alpha_bar[t])
        ab_prev = float(self.alpha_bar[t_prev]) if t_prev >= 0 else 1.0
        x0_pred = self.predict_x0_from_eps(xt, tt, eps)
        if clip:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
            eps = self.predict_eps_from_x0(xt, tt, x0_pred)
        s = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(max(0.0, 1 - ab / ab_prev))
        x_prev = math.sqrt(ab_prev) * x0_pred + math.sqrt(max(0.0, 1 - ab_prev - s ** 2)) * eps
        if s > 0:
            x_prev = x_prev + s * self._randn(xt.shape, like=xt, generator=generator)
        return x_prev

    @torch.no_grad()
    def ddim_sample(self, model: Model, shape: Sequence[int], steps: int = 50, eta: float = 0.0,
                    clip_x0: Optional[bool] = None, return_trajectory: bool = False,
                    x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                    device: Optional[Union[str, torch.device]] = None, progress: bool = True,
                    model_kwargs: Optional[Dict[str, Any]] = None, spacing: str = "linspace"
                    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Trajectory]]:
        """DDIM sampling with ``steps`` network calls (eta = 0: deterministic) on the grid ``spacing`` (see
        :meth:`ddim_timesteps`). Lesson: 03_training_and_sampling."""
        with evaluating(model):
            x = self._start(model, shape, x_T, generator, device)
            seq = self.ddim_timesteps(steps, spacing)
            frames, times = ([x.cpu()] if return_trajectory else []), [self.T]
            for k, t in enumerate(tqdm(seq, desc=f"DDIM sampling ({steps} steps)", disable=not progress, leave=False)):
                t_prev = seq[k + 1] if k + 1 < len(seq) else -1
                x = self.ddim_step(model, x, t, t_prev, eta, clip_x0, generator, model_kwargs)
                if return_trajectory:
                    frames.append(x.cpu())
                    times.append(t_prev + 1)
        if return_trajectory:
            return x, Trajectory(torch.stack(frames), times)
        return x

    @torch.no_grad()
    def ddim_invert(self, model: Model, x0: torch.Tensor, steps: int = 50, spacing: str = "linspace",
                    return_trajectory: bool = False, progress: bool = True,
                    model_kwargs: Optional[Dict[str, Any]] = None
                    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Trajectory]]:
        """DDIM inversion: run the deterministic DDIM process (eta = 0) *forwards*, from data ``x0`` ``(B, ...)`` up
        to x_T, on the grid of :meth:`ddim_timesteps` (``steps`` network calls); Song, Meng & Ermon (2021) encode
        images to their codes this way.

        Each step goes from a level s to the next noisier level t of the grid with the network's noise estimate
        at the level it is at, eps = eps_theta(x_s, s):

            x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps,  x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s),

        that is x_t / sqrt(abar_t) = x_s / sqrt(abar_s) + (sigma_t - sigma_s) eps with sigma = sqrt((1 - abar) / abar):
        the Euler step of the same ODE that :meth:`ddim_sample` solves backwards, with the roles of the two levels
        swapped. The first step starts at the data (abar = 1), where eps_theta is not defined; it uses
        eps_theta(x_0, t_1) at the grid's first level t_1. ``ddim_sample(model, shape, steps, x_T=...)`` with the
        same grid and ``clip_x0=False`` maps the result back close to ``x0``, closer as ``steps`` grows (the two
        Euler steps over each stride differ only in the level where eps is read). No clipping here: a clamped
        x0_hat would make the map impossible to undo. With ``return_trajectory`` also returns a
        :class:`Trajectory` of x_0 and x after each step (on the CPU), labelled with the lecture's t (0 first, T
        last). Lesson: 03_training_and_sampling.
        """
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point tensor (B, ...), got {type(x0).__name__}")
        seq = self.ddim_timesteps(steps, spacing)[::-1]  # increasing noise: e.g. 0, ..., T - 1
        x = x0
        frames, times = ([x.cpu()] if return_trajectory else []), [0]
        with evaluating(model):
            for k, t in enumerate(tqdm(seq, desc=f"DDIM inversion ({steps} steps)", disable=not progress,
                                       leave=False)):
                s = seq[k - 1] if k > 0 else seq[0]             # where eps is read: the current level
                ab_s = float(self.alpha_bar[seq[k - 1]]) if k > 0 else 1.0
                ab_t = float(self.alpha_bar[t])
                eps = model(x, self._t_on(s, x), **(model_kwargs or {}))
                if eps.shape != x.shape:
                    raise ValueError(f"the model returned shape {tuple(eps.shape)} for input {tuple(x.shape)}")
                x0_hat = (x - math.sqrt(1.0 - ab_s) * eps) / math.sqrt(ab_s)
                x = math.sqrt(ab_t) * x0_hat + math.sqrt(1.0 - ab_t) * eps
                if return_trajectory:
                    frames.append(x.cpu())
                    times.append(t + 1)
        if return_trajectory:
            return x, Trajectory(torch.stack(frames), times)
        return x

    # -- the losses (lessons 02 and 03) ---------------------------------------------------------------
    def sample_t(self, batch: int, device: Optional[Union[str, torch.device]] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t ~ Uniform({1, ..., T}) as array indices 0..T-1, shape ``(batch,)``, on ``device``. Like the noise
        (see ``_randn``), a CPU ``generator`` draws on the CPU, a generator on the device or none draws there.
        Lesson: 03_training_and_sampling."""
        device = torch.device(device or "cpu")
        if generator is not None and generator.device.type == "cpu":
            return self._own(torch.randint(0, self.T, (batch,), generator=generator).to(device))
        return self._own(torch.randint(0, self.T, (batch,), generator=generator, device=device))

    def L_simple(self, model: Model, x0: torch.Tensor, t: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """L_simple = E_{x_0, eps, t} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2,
        estimated on the batch (squared error averaged over batch and dimensions). Lesson: 02_elbo_to_simple_loss.
        """
        if t is None:  # drawn in range: never checked, so the step never waits for the GPU
            t = self.sample_t(x0.shape[0], x0.device, generator)
        t = self._t_on(t, x0)
        if noise is None:
            noise = self._randn(x0.shape, like=x0, generator=generator)
        xt = self.q_sample(x0, t, noise)
        eps = model(xt, t, **(model_kwargs or {}))
        if eps.shape != x0.shape:
            raise ValueError(f"the model returned shape {tuple(eps.shape)} for input {tuple(x0.shape)}")
        return ((noise - eps) ** 2).mean()

    def training_step(self, model: Model, optimizer: torch.optim.Optimizer, x0: torch.Tensor,
                      model_kwargs: Optional[Dict[str, Any]] = None,
                      generator: Optional[torch.Generator] = None) -> float:
        """Algorithm 1, one iteration: t ~ Uniform({1..T}), eps ~ N(0, I), one gradient step on
        || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2. Returns the loss.

        Lesson: 03_training_and_sampling.
        """
        loss = self.L_simple(model, x0, model_kwargs=model_kwargs, generator=generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss.item()}; lower the learning rate or check the data "
                                     "(it should be scaled to [-1, 1])")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    # -- the variational bound (lesson 02) ------------------------------------------------------------
    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)), summed over dimensions, nats, ``(B,)``. Lesson: 02_elbo_to_simple_loss."""
        mean, var = self.q_mean_variance(x0, self.T - 1)
        return sum_flat(normal_kl(mean, var.log().expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean)))

    def vb_term(self, model: Model, x0: torch.Tensor, xt: torch.Tensor, t: Union[int, torch.Tensor],
                sigma: str = "beta_tilde", model_kwargs: Optional[Dict[str, Any]] = None,
                clip_x0: bool = False) -> torch.Tensor:
        """One term of the bound, in nats summed over dimensions, ``(B,)``:
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) where index t > 0, and the decoder term
        L_0 = -log p_theta(x_0 | x_1) (discretised Gaussian, data in [-1, 1]) where index t = 0. With
        ``clip_x0`` the mean of p_theta comes from the predicted x_0 clamped to [-1, 1], as in the code behind
        the published bounds (Nichol & Dhariwal 2021 evaluate with clipping on); the default is the bound of
        the lecture's unclipped model. Lesson: 02_elbo_to_simple_loss.
        """
        tt = self._t_on(t, x0)
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, xt, tt)
        out = self.p_mean_variance(model, xt, tt, sigma=sigma, clip_x0=clip_x0, model_kwargs=model_kwargs)
        kl = sum_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]))
        nll = -sum_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"]))
        return torch.where(tt == 0, nll, kl)

    @torch.no_grad()
    def variational_bound_bpd(self, model: Model, x0: torch.Tensor, sigma: str = "beta_tilde",
                              progress: bool = True, generator: Optional[torch.Generator] = None,
                              model_kwargs: Optional[Dict[str, Any]] = None, clip_x0: bool = False
                              ) -> Dict[str, torch.Tensor]:
        """The full bound -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0, in bits per dimension, one
        x_t ~ q(x_t | x_0) per term. Returns ``total`` ``(B,)``, ``prior`` ``(B,)`` and ``terms`` ``(B, T)``
        (column i is the term at array index i: L_0 in column 0). ``clip_x0``: see :meth:`vb_term`.
        Lesson: 02_elbo_to_simple_loss.
        """
        B = x0.shape[0]
        dims = x0[0].numel()
        terms = torch.zeros(B, self.T, dtype=torch.float64)
        for i in tqdm(range(self.T), desc="variational bound", disable=not progress, leave=False):
            noise = self._randn(x0.shape, like=x0, generator=generator)
            xt = self.q_sample(x0, i, noise)
            terms[:, i] = self.vb_term(model, x0, xt, i, sigma, model_kwargs, clip_x0).double().cpu()
        prior = self.prior_kl(x0).double().cpu()
        to_bpd = 1.0 / (dims * math.log(2.0))
        return {"total": (terms.sum(1) + prior) * to_bpd, "prior": prior * to_bpd, "terms": terms * to_bpd}
