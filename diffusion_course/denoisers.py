"""Small eps-prediction networks eps_theta(x_t, t) for lesson 03_training_and_sampling.

Both learn one embedding vector per time step (an ``nn.Embedding`` table), the simplest way to tell
the network which t it denoises; lesson 04 replaces the table with the sinusoidal embedding and the
U-Net. ``t`` is a ``(B,)`` long tensor of array indices 0..T-1, as everywhere in the package.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ToyMLP(nn.Module):
    """eps_theta for 2-D points: ``(B, dim) -> (B, dim)``. Each hidden layer adds its own projection of
    the time embedding. Lesson: 03_training_and_sampling."""

    def __init__(self, T: int, dim: int = 2, hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.T, self.dim = T, dim
        self.time_embed = nn.Embedding(T, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"ToyMLP expects points of shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.time_embed(t)  # (B, hidden)
        h = self.inp(x)
        for layer, proj in zip(self.layers, self.time_proj):
            h = h + layer(self.act(h + proj(emb)))  # residual MLP, time added before each layer
        return self.out(self.act(h))


class ConvBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv (dilated), plus a per-channel time bias, with a residual connection.

    ``(B, C, H, W) -> (B, C, H, W)``. Lesson: 03_training_and_sampling."""

    def __init__(self, channels: int, emb_dim: int, dilation: int = 1, groups: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.time_bias = nn.Linear(emb_dim, channels)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.conv(self.act(self.norm(h) + self.time_bias(emb)[:, :, None, None]))


class SmallConvDenoiser(nn.Module):
    """A small fully convolutional eps_theta for small images: ``(B, C, H, W) -> (B, C, H, W)``.

    A stack of residual :class:`ConvBlock` s with growing dilation, so that the receptive field covers
    a 16x16 digit without any down-sampling. Lesson: 03_training_and_sampling."""

    def __init__(self, T: int, in_channels: int = 1, channels: int = 64,
                 dilations: Sequence[int] = (1, 2, 4, 8, 4, 2, 1)) -> None:
        super().__init__()
        self.T, self.in_channels = T, in_channels
        emb_dim = 4 * channels
        self.time_embed = nn.Sequential(nn.Embedding(T, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(channels, emb_dim, d) for d in dilations)
        self.out = nn.Sequential(nn.GroupNorm(min(8, channels), channels), nn.SiLU(),
                                 nn.Conv2d(channels, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SmallConvDenoiser expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        emb = self.time_embed(t)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
