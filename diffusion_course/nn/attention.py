"""Attention over the pixels of a feature map: self-attention, and the cross-attention that lets a
condition tau_theta(y) steer the U-Net.

Taught in lesson 04_unet (self-attention) and lesson 07_cross_attention (cross-attention, where
Q = W_Q phi(z_t), K = W_K tau_theta(y), V = W_V tau_theta(y)). Both go through
``torch.nn.functional.scaled_dot_product_attention``, which computes softmax(Q K^T / sqrt(d)) V with
fused kernels where the hardware has them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with ``num_heads`` heads, Q from ``x`` and K, V from ``context``
    (from ``x`` itself when no context is given: self-attention).

    ``x: (B, N, query_dim)``, ``context: (B, M, context_dim)`` -> ``(B, N, query_dim)``. The output
    projection starts at zero, so a residual attention layer starts as the identity. Lesson: 04_unet.
    """

    def __init__(self, query_dim: int, num_heads: int = 4, context_dim: Optional[int] = None) -> None:
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"{query_dim} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(self.context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(self.context_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C / heads)
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        ctx = x if context is None else context
        if ctx.ndim != 3 or ctx.shape[-1] != self.context_dim or ctx.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape (B={x.shape[0]}, M, {self.context_dim}), got {tuple(ctx.shape)}")
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(x.shape))


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map, added to its input; with ``context_dim``
    a cross-attention layer to the condition follows (lesson 07).

    ``(B, C, H, W)`` (and ``context: (B, M, context_dim)``) -> ``(B, C, H, W)``. Lesson: 04_unet.
    """

    def __init__(self, channels: int, num_heads: int = 4, context_dim: Optional[int] = None,
                 norm_groups: int = 32) -> None:
        super().__init__()
        from .blocks import group_norm

        self.channels, self.context_dim = channels, context_dim
        self.norm = group_norm(channels, norm_groups)
        self.self_attn = MultiHeadAttention(channels, num_heads)
        if context_dim:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross_attn = MultiHeadAttention(channels, num_heads, context_dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.channels:
            raise ValueError(f"AttentionBlock expects {self.channels} channels, got {C}")
        tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = x.reshape(B, C, H * W).transpose(1, 2) + self.self_attn(tokens)
        if self.context_dim:
            if context is None:
                raise ValueError("this U-Net was built with context_dim; pass context=(B, M, context_dim)")
            h = h + self.cross_attn(self.norm_cross(h), context)
        return h.transpose(1, 2).reshape(B, C, H, W)
