"""Noise schedules beta_1..beta_T and the quantities derived from them.

Taught in lesson 01_forward_process.

Conventions, kept everywhere in the package:

* The lecture counts time steps ``t = 1..T``. Code arrays are indexed ``0..T-1``: array entry ``i``
  holds the lecture's step ``t = i + 1`` (so ``betas[0]`` is beta_1 and ``alpha_bar[T-1]`` is
  abar_T). :func:`lecture_t_to_index` and :func:`index_to_lecture_t` convert.
* Schedules are computed in float64 (abar_T is a product of a thousand factors, and 1 - abar_t is
  needed to many digits near t = 1); they are cast to the working dtype only when used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Union

import torch

IntOrTensor = Union[int, torch.Tensor]


def lecture_t_to_index(t: IntOrTensor, T: int) -> IntOrTensor:
    """Map the lecture's step ``t`` in ``1..T`` to the array index ``t - 1`` in ``0..T-1``.

    Lesson: 01_forward_process.
    """
    tt = torch.as_tensor(t)
    if tt.numel() and (int(tt.min()) < 1 or int(tt.max()) > T):
        raise ValueError(f"the lecture's t runs over 1..{T}; got {t!r}")
    return t - 1


def index_to_lecture_t(i: IntOrTensor, T: int) -> IntOrTensor:
    """Map an array index ``i`` in ``0..T-1`` to the lecture's step ``t = i + 1``.

    Lesson: 01_forward_process.
    """
    ii = torch.as_tensor(i)
    if ii.numel() and (int(ii.min()) < 0 or int(ii.max()) > T - 1):
        raise ValueError(f"array indices run over 0..{T - 1}; got {i!r}")
    return i + 1


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"the number of steps T must be a positive int, got {T!r}")


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule: beta_t rises linearly from ``beta_start`` to ``beta_end`` (Ho et al. 2020).

    Returns a float64 tensor of shape ``(T,)``. Lesson: 01_forward_process.
    """
    _check_T(T)
    if not (0 < beta_start <= beta_end < 1):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def rescaled_linear_betas(T: int = 1000) -> torch.Tensor:
    """The linear schedule rescaled for any T so that abar_T stays about the same as DDPM's at T = 1000.

    beta_start = 1e-4 * 1000 / T and beta_end = 0.02 * 1000 / T (as in Nichol & Dhariwal's code); for
    T = 1000 it is exactly DDPM's schedule. This is the package's ``"linear"`` schedule. (It is not what
    the diffusers library calls ``scaled_linear``: that is :func:`sqrt_linear_betas`.) Lesson: 01_forward_process.
    """
    _check_T(T)
    scale = 1000.0 / T
    beta_end = min(0.02 * scale, 0.999)
    return linear_betas(T, min(1e-4 * scale, beta_end), beta_end)


def sqrt_linear_betas(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent diffusion's schedule: sqrt(beta_t) rises linearly from sqrt(0.00085) to sqrt(0.012), so
    beta_t = (sqrt(beta_start) + (t - 1) / (T - 1) (sqrt(beta_end) - sqrt(beta_start)))^2.

    These are the values of the LDM and Stable Diffusion configurations (``linear_start``/``linear_end``;
    Rombach et al. 2022), whose code calls it ``linear`` and the diffusers library ``scaled_linear``; the
    package names it ``"scaled_linear"`` as diffusers does. Its betas stay small (abar_T is about 0.0047
    at T = 1000, against 4e-5 for DDPM's linear schedule): latents of unit variance need less noise
    to lose their content than pixels do. Float64, shape ``(T,)``. Lesson: 08_latent_diffusion.
    """
    _check_T(T)
    if not (0 < beta_start <= beta_end < 1):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2


def cosine_alpha_bar(t: torch.Tensor, T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's abar(t) = g(t) / g(0), g(t) = cos^2(((t / T + s) / (1 + s)) * pi / 2) (they write f; the
    course keeps f for the downsampling factor).

    ``t`` is continuous in ``[0, T]`` (lecture time; abar(0) = 1). Lesson: 01_forward_process.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    f = torch.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2
    f0 = math.cos((s / (1 + s)) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021): beta_t = 1 - abar(t) / abar(t - 1), clipped at
    ``max_beta`` to avoid the singularity at t = T.

    Returns float64 of shape ``(T,)``. Lesson: 01_forward_process.
    """
    _check_T(T)
    t = torch.arange(1, T + 1, dtype=torch.float64)  # lecture time 1..T
    betas = 1 - cosine_alpha_bar(t, T, s) / cosine_alpha_bar(t - 1, T, s)
    return betas.clamp(max=max_beta)


SCHEDULES: Dict[str, Callable[[int], torch.Tensor]] = {
    "linear": rescaled_linear_betas,
    "cosine": cosine_betas,
    "scaled_linear": sqrt_linear_betas,
}


def make_betas(name: str, T: int = 1000) -> torch.Tensor:
    """Betas of the named schedule (``"linear"``, ``"cosine"`` or ``"scaled_linear"``), float64, shape ``(T,)``.

    Lesson: 01_forward_process.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](T)


def check_betas(betas: torch.Tensor) -> torch.Tensor:
    """Validate a schedule: a 1-D tensor with every beta in the open interval (0, 1). Returns float64.

    Lesson: 01_forward_process.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        raise ValueError("betas contain NaN or inf")
    if (betas <= 0).any() or (betas >= 1).any():
        bad = betas[(betas <= 0) | (betas >= 1)][:3].tolist()
        raise ValueError(f"every beta_t must lie in (0, 1); found {bad}")
    return betas


@dataclass(frozen=True)
class Schedule:
    """A noise schedule and its derived quantities, all float64 of shape ``(T,)`` (index i = step t-1).

    * ``betas``      beta_t
    * ``alphas``     alpha_t = 1 - beta_t
    * ``alpha_bar``  abar_t = prod_{s<=t} alpha_s
    * ``snr``        SNR(t) = abar_t / (1 - abar_t)

    Lesson: 01_forward_process.
    """

    betas: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", check_betas(self.betas))

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> "Schedule":
        """The named schedule with T steps. Lesson: 01_forward_process."""
        return cls(make_betas(name, T))

    @property
    def T(self) -> int:
        return int(self.betas.numel())

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alpha_bar(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def snr(self) -> torch.Tensor:
        ab = self.alpha_bar
        return ab / (1.0 - ab)

    def log_snr(self) -> torch.Tensor:
        """log SNR(t), float64 (decreasing in t for any valid schedule). Lesson: 01_forward_process."""
        ab = self.alpha_bar
        return torch.log(ab) - torch.log1p(-ab)
