"""Spatial feature transform (SFT): StableSR's way of steering a frozen U-Net with features of the
low-resolution image.

Taught in lesson 09_stablesr. For the n-th feature map F_dif^n of the frozen U-Net and the condition's
feature map F^n at the same resolution (from the time-aware encoder), a small network M_theta^n makes a
per-pixel, per-channel scale and shift, and the feature map becomes

    (alpha^n, beta^n) = M_theta^n(F^n)
    F_hat^n = (1 + alpha^n) * F_dif^n + beta^n

The last convolutions of M_theta^n start at zero, so alpha^n = beta^n = 0 and F_hat^n = F_dif^n: a U-Net
with SFT layers starts as exactly the frozen prior. StableSR's own code (Wang et al., 2023) normalises the
feature first, GroupNorm(F_dif^n) * (1 + alpha^n) + beta^n, which changes the prior's features before any
training; ``normalize=True`` builds that variant for comparison.

This module imports only ``layers``, so the blocks can build on it.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .layers import group_norm, zero_module


def sft_modulate(F_dif: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The lecture's modulation F_hat = (1 + alpha) * F_dif + beta, element by element.

    ``F_dif (B, C, h, w)``; ``alpha`` and ``beta`` broadcastable to it (``(B, C, h, w)`` from an SFT
    layer). Returns ``(B, C, h, w)``. Lesson: 09_stablesr.
    """
    return (1 + alpha) * F_dif + beta


class SFTLayer(nn.Module):
    """M_theta^n and the modulation it drives, for one feature map of ``channels`` channels steered by a
    condition feature of ``cond_channels`` channels.

    ``M_theta^n``: conv 3x3 (cond_channels -> hidden) -> SiLU, then two zero-initialised conv 3x3 heads
    (hidden -> channels) for alpha and beta. ``forward(F_dif (B, channels, h, w), feature (B, cond_channels,
    h, w)) -> (B, channels, h, w)``. With ``normalize`` the feature map is group-normalised (no affine
    parameters) before it is modulated, as in StableSR's code; then the layer is *not* the identity at
    initialisation. Lesson: 09_stablesr.
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int = 64, normalize: bool = False,
                 norm_groups: int = 32) -> None:
        super().__init__()
        if min(channels, cond_channels, hidden) < 1:
            raise ValueError(f"SFTLayer needs positive channel counts, got channels={channels}, "
                             f"cond_channels={cond_channels}, hidden={hidden}")
        self.channels, self.cond_channels = channels, cond_channels
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.SiLU())
        self.to_alpha = zero_module(nn.Conv2d(hidden, channels, 3, padding=1))
        self.to_beta = zero_module(nn.Conv2d(hidden, channels, 3, padding=1))
        self.norm: Optional[nn.GroupNorm] = None
        if normalize:
            norm = group_norm(channels, norm_groups)
            self.norm = nn.GroupNorm(norm.num_groups, channels, eps=norm.eps, affine=False)

    def params(self, feature: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta) = M_theta(F): ``(B, cond_channels, h, w) -> 2 x (B, channels, h, w)``. Lesson: 09_stablesr."""
        if feature.ndim != 4 or feature.shape[1] != self.cond_channels:
            raise ValueError(f"the SFT layer expects a condition feature (B, {self.cond_channels}, h, w), got "
                             f"{tuple(feature.shape)}; the time-aware encoder's out_channels must equal the "
                             f"U-Net's sft_channels")
        a = self.shared(feature)
        return self.to_alpha(a), self.to_beta(a)

    def forward(self, F_dif: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        if F_dif.shape[-2:] != feature.shape[-2:] or F_dif.shape[0] != feature.shape[0]:
            raise ValueError(f"the condition feature {tuple(feature.shape)} does not match the feature map "
                             f"{tuple(F_dif.shape)} it modulates (batch and spatial size must agree)")
        alpha, beta = self.params(feature)
        base = self.norm(F_dif) if self.norm is not None else F_dif
        return sft_modulate(base, alpha.to(F_dif.dtype), beta.to(F_dif.dtype))


def feature_for(struct_cond: Dict[str, torch.Tensor], F_dif: torch.Tensor) -> torch.Tensor:
    """The condition feature for a feature map: ``struct_cond[str(h)]`` where h is the map's height, with a
    clear error naming the keys there are. Lesson: 09_stablesr."""
    key = str(F_dif.shape[-2])
    if key not in struct_cond:
        raise ValueError(f"struct_cond has no feature for resolution {key} (it has {sorted(struct_cond, key=int)}); "
                         f"the time-aware encoder must return one feature map per resolution of the U-Net")
    return struct_cond[key]
