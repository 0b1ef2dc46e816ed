"""The transformer block of the LDM U-Net: how a condition tau_theta(y) steers the denoiser.

Taught in lesson 07_cross_attention. At every attention site of a conditional U-Net the feature map
phi(z_t) of shape (B, C, H, W) becomes H*W tokens of width C, which pass through ``depth`` transformer
blocks (pre-norm, each a residual step):

    x = x + self_attn(LayerNorm(x))                       Q, K, V from the image tokens
    x = x + cross_attn(LayerNorm(x), context, mask)       Q from the image, K, V from tau_theta(y)
    x = x + FeedForward(LayerNorm(x))                     GEGLU, 4x wider inside

and go back to a feature map. The SpatialTransformer wraps them as in LDM: GroupNorm -> 1x1 conv ->
tokens -> blocks -> feature map -> 1x1 conv (zero-initialised) -> + input, so that at initialisation it is
exactly the identity and training starts from the unconditional U-Net's behaviour.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .layers import group_norm, zero_module


class GEGLU(nn.Module):
    """The gated GELU unit: a Linear to ``2 * dim_out``, split into (a, gate), output a * gelu(gate).

    ``(..., dim_in) -> (..., dim_out)``. Lesson: 07_cross_attention.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP: GEGLU to ``mult * dim`` channels, then a Linear back to ``dim``.

    ``(B, N, dim) -> (B, N, dim)``. Lesson: 07_cross_attention.
    """

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the condition, and a GEGLU feed-forward, each pre-norm (LayerNorm)
    and residual.

    ``forward(x (B, N, dim), context (B, M, context_dim), mask=None (B, M) bool)`` -> ``(B, N, dim)``.
    The heads are ``dim // num_head_channels`` when ``num_head_channels > 0``, else ``num_heads``.
    Lesson: 07_cross_attention.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int, num_head_channels: int = -1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads, num_head_channels=num_head_channels, zero_out=False)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, num_heads, context_dim, num_head_channels, zero_out=False)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's transformer over a feature map: GroupNorm -> proj_in (1x1 conv) -> H*W tokens -> ``depth``
    BasicTransformerBlocks -> feature map -> proj_out (1x1 conv, zero-initialised) -> + input.

    ``forward(x (B, C, H, W), context (B, M, context_dim), context_mask=None (B, M) bool)`` ->
    ``(B, C, H, W)``. Exactly the identity at initialisation. Lesson: 07_cross_attention.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int, depth: int = 1, norm_groups: int = 32,
                 num_head_channels: int = -1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"a SpatialTransformer needs depth >= 1 transformer blocks, got {depth}")
        self.channels, self.context_dim = channels, context_dim
        self.norm = group_norm(channels, norm_groups)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(BasicTransformerBlock(channels, num_heads, context_dim, num_head_channels)
                                    for _ in range(depth))
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.channels:
            raise ValueError(f"SpatialTransformer expects {self.channels} channels, got {C}")
        if context is None:
            raise ValueError(f"a SpatialTransformer cross-attends to a condition: pass context=(B, M, "
                             f"{self.context_dim}), the tokens tau_theta(y)")
        h = self.proj_in(self.norm(x))
        h = h.reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C): one token per pixel
        for block in self.blocks:
            h = block(h, context, context_mask)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)
