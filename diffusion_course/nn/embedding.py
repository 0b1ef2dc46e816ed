"""How the time step t enters the network: a sinusoidal embedding followed by an MLP.

Taught in lesson 04_unet.

Two conventions are published. DDPM's code (and the LDM autoencoder's) puts the sines first and divides
by (half - 1); OpenAI's improved-diffusion and the LDM U-Net put the cosines first and divide by half.
This package uses the second one throughout:

    freqs_k = exp(-ln(max_period) * k / half),  k = 0..half-1
    emb(t) = [cos(t * freqs), sin(t * freqs)]            (plus one zero column when dim is odd)
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of time steps, cosines first: ``(B,) -> (B, dim)`` float32.

    ``t`` holds array indices (0..T-1) or any real times. Lesson: 04_unet.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"the embedding dimension must be at least 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class TimeEmbedding(nn.Module):
    """t -> sinusoidal embedding (model_channels) -> Linear -> SiLU -> Linear (4 x model_channels).

    ``(B,) -> (B, 4 * model_channels)``; every residual block then projects this vector to its own channels.
    Lesson: 04_unet.
    """

    def __init__(self, model_channels: int, emb_channels: int = 0) -> None:
        super().__init__()
        self.model_channels = model_channels
        emb_channels = emb_channels or 4 * model_channels
        self.mlp = nn.Sequential(nn.Linear(model_channels, emb_channels), nn.SiLU(),
                                 nn.Linear(emb_channels, emb_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.model_channels))
