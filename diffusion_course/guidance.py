"""Classifier-free guidance: one network that is both conditional and unconditional, and a sampler-side
combination of the two predictions.

Taught in lesson 07_cross_attention.

Training (Ho & Salimans, 2021): with probability ``p_uncond`` a training example's condition y is replaced
by the null condition, so the same eps_theta learns eps_theta(z_t, t, y) and eps_theta(z_t, t, null).
This package's null condition is *learned*: a token of the condition encoder
(:class:`~diffusion_course.nn.conditioning.ConditionEncoder`), not a vector of zeros, so the network can
place it wherever it serves the unconditional prediction best.

Sampling: the guided prediction

    eps_hat = eps_theta(z_t, t, null) + s * (eps_theta(z_t, t, y) - eps_theta(z_t, t, null))

with guidance scale s: s = 0 is the unconditional model, s = 1 the conditional one, s > 1 pushes the
samples towards what distinguishes y (more adherence, less diversity). :class:`ClassifierFreeGuidance`
wraps a conditional denoiser into a plain eps-model, so every sampler of :mod:`diffusion_course.ddpm`
(DDPM's Algorithm 2, DDIM) uses guidance unchanged; both halves go through the network in one batched call.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

Model = Union[nn.Module, Callable[..., torch.Tensor]]


def condition_dropout(batch: int, p_uncond: float, generator: Optional[torch.Generator] = None,
                      device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Which conditions of a batch to replace by the null condition: ``(batch,)`` bool, each True with
    probability ``p_uncond``, drawn from ``generator`` (on the CPU, then moved to ``device``).

    Lesson: 07_cross_attention.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond is a probability in [0, 1] (typically 0.1), got {p_uncond}")
    return (torch.rand(batch, generator=generator) < p_uncond).to(device or "cpu")


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + s * (eps_c - eps_u), the classifier-free guidance combination; any shape, both alike.

    Lesson: 07_cross_attention.
    """
    if eps_cond.shape != eps_uncond.shape:
        raise ValueError(f"conditional and unconditional predictions differ in shape: {tuple(eps_cond.shape)} "
                         f"and {tuple(eps_uncond.shape)}")
    return eps_uncond + scale * (eps_cond - eps_uncond)


class ClassifierFreeGuidance(nn.Module):
    """A conditional denoiser ``model(x, t, cond=..., drop=...)`` turned into the guided eps-model
    ``forward(x (B, C, H, W), t (B,), cond (B, ...), concat=None) -> (B, C, H, W)``; a spatial condition
    ``concat`` (lesson 08) is kept in both halves: only the tokens are dropped.

    Each call stacks the batch twice, conditions kept in the first half and dropped (the null condition) in
    the second, runs the network once on the 2B inputs, and combines the halves with :func:`guided_eps`; at
    s = 1 (the conditional model) and s = 0 (the unconditional one) it runs only the half that counts.
    ``config`` is the wrapped model's, so the package's samplers read the image shape from it.
    Lesson: 07_cross_attention.
    """

    def __init__(self, model: Model, scale: float = 3.0) -> None:
        super().__init__()
        if scale < 0:
            raise ValueError(f"the guidance scale must be >= 0 (0: unconditional, 1: conditional), got {scale}")
        self.model, self.scale = model, float(scale)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None,
                concat: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition: pass cond=... (one per image)")
        B = x.shape[0]
        if len(cond) != B:
            raise ValueError(f"{len(cond)} conditions for a batch of {B} images; give one condition per image")
        if self.scale in (0.0, 1.0):  # one half has weight zero: call the network on the other half only
            drop = torch.full((B,), self.scale == 0.0, dtype=torch.bool, device=x.device)
            return self.model(x, t, cond=cond, drop=drop, **({} if concat is None else {"concat": concat}))
        drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x.device)
        extra = {} if concat is None else {"concat": torch.cat([concat, concat])}  # spatial conditions stay in both
        eps = self.model(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([cond, cond]), drop=drop, **extra)
        eps_cond, eps_uncond = eps.chunk(2)
        return guided_eps(eps_cond, eps_uncond, self.scale)
