"""Attention: the multi-head layer softmax(Q K^T / sqrt(d)) V, and the self-attention block of the
DDPM U-Net.

Taught in lesson 04_unet (self-attention over the pixels of a feature map) and lesson 07_cross_attention
(cross-attention, where Q = W_Q phi(z_t) comes from the image tokens and K = W_K tau_theta(y),
V = W_V tau_theta(y) from the condition's tokens, with a key padding mask for conditions of different
lengths). The layer goes through :func:`dot_product_attention`, that is
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where the hardware has them), except in a bf16
training step on the CPU with a small score matrix, where the explicit softmax is faster.
:func:`~diffusion_course.nn.attention_maps.record_cross_attention` switches the layer to an explicit softmax that
also hands the weights out, for pictures of where each word looks.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm


def attention_heads(channels: int, num_heads: int = 4, num_head_channels: int = -1) -> int:
    """The number of heads of an attention layer over ``channels`` channels: ``channels // num_head_channels``
    when ``num_head_channels > 0`` (a fixed width per head, as in LDM's configs), else ``num_heads``.

    A clear error when the heads do not split the channels evenly. Lesson: 07_cross_attention.
    """
    if num_head_channels > 0:
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels cannot be split into heads of {num_head_channels} channels; "
                             f"choose num_head_channels dividing every attention layer's channels (or set it to "
                             f"-1 and use num_heads)")
        return channels // num_head_channels
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"{channels} channels cannot be split into {num_heads} heads; choose num_heads "
                         f"dividing every attention layer's channels (or set num_head_channels)")
    return num_heads


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with ``num_heads`` heads of width d = query_dim / num_heads: Q from ``x``,
    K and V from ``context`` (from ``x`` itself when no context is given: self-attention).

    ``forward(x (B, N, query_dim), context=None (B, M, context_dim), mask=None (B, M) bool)`` ->
    ``(B, N, query_dim)``. ``mask[b, m]`` is True for a real token that the queries may attend to and False
    for padding; every row needs at least one True. With ``context_dim`` set the layer is a cross-attention
    layer and ``context`` is required. ``num_head_channels > 0`` fixes the width per head instead of the
    number of heads. With ``zero_out`` (the default) the output projection starts at zero, so a residual
    attention layer starts as the identity. Lesson: 04_unet and 07_cross_attention.
    """

    def __init__(self, query_dim: int, num_heads: int = 4, context_dim: Optional[int] = None,
                 num_head_channels: int = -1, zero_out: bool = True) -> None:
        super().__init__()
        self.num_heads = attention_heads(query_dim, num_heads, num_head_channels)
        self.query_dim = query_dim
        self.is_cross = context_dim is not None
        self.context_dim = context_dim if context_dim is not None else query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(self.context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(self.context_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)
        if zero_out:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)
        # When set (by record_cross_attention), forward computes the softmax explicitly and hands this callable
        # the weights averaged over heads, (B, N, M), still in the autograd graph (the recorder decides).
        self.recorder: Optional[Callable[[torch.Tensor], None]] = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C / heads)
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def _check(self, x: torch.Tensor, context: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"attention expects x of shape (B, N, {self.query_dim}), got {tuple(x.shape)}")
        if context is None:
            if self.is_cross:
                raise ValueError(f"this cross-attention layer needs context=(B, M, {self.context_dim}), "
                                 f"the condition's tokens tau_theta(y)")
            context = x
        kind = "cross-attention" if self.is_cross else "attention"
        if context.ndim != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape (B={x.shape[0]}, M, {self.context_dim}), "
                             f"got {tuple(context.shape)}")
        if context.shape[-1] != self.context_dim:
            raise ValueError(f"context has width {context.shape[-1]}, but this {kind} layer was built for "
                             f"context_dim {self.context_dim}")
        if mask is not None:
            check_mask(mask, context.shape[0], context.shape[1])
        return context

    def _weights(self, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        # (B, heads, N, d), (B, heads, M, d) -> softmax(Q K^T / sqrt(d)) of shape (B, heads, N, M), float32
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def attention_weights(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention weights softmax(Q K^T / sqrt(d)) per head, ``(B, heads, N, M)`` float32: row n says
        how query n distributes its attention over the M context tokens (0 on padding, summing to 1).

        Lesson: 07_cross_attention.
        """
        context = self._check(x, context, mask)
        return self._weights(self._heads(self.to_q(x)), self._heads(self.to_k(context)), mask)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = self._check(x, context, mask)
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        if self.recorder is None:
            out = dot_product_attention(q, k, v, mask)  # (B, heads, N, d)
        else:
            weights = self._weights(q, k, mask)  # (B, heads, N, M)
            self.recorder(weights.mean(dim=1))
            out = weights.to(v.dtype) @ v
        B, N, C = x.shape
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))


# The most query x key pairs per head for which an explicit softmax beats the fused kernel in a CPU training step
# in bfloat16 (benchmarks/bench_attention.py, one thread: 1.4x to 10x faster up to 256 x 256 pairs, 1.06x to 1.45x
# at 512 x 512, 0.56x to 0.66x at 1024 x 1024).
CPU_EXPLICIT_MAX_PAIRS = 512 * 512


def explicit_attention_pays(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`dot_product_attention` computes softmax(Q K^T / sqrt(d)) V explicitly instead of calling
    the fused ``scaled_dot_product_attention``: on the CPU, in bfloat16 or float16, when a gradient will flow back
    (the fused kernel's backward pass is slow there at these sizes) and the score matrix is small
    (at most ``CPU_EXPLICIT_MAX_PAIRS`` query x key pairs per head). Everywhere else the fused kernel is
    faster and is used. Lesson: 04_unet (bf16 on the CPU).
    """
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.shape[-2] * k.shape[-2] <= CPU_EXPLICIT_MAX_PAIRS)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V as three plain operations in the inputs' dtype (the score matrix is
    materialised): the path :func:`dot_product_attention` takes where :func:`explicit_attention_pays`. Shapes as
    in :func:`dot_product_attention`. Lesson: 04_unet (bf16 on the CPU).
    """
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head: ``(B, heads, N, d)``, ``(B, heads, M, d)`` x 2 -> ``(B, heads, N, d)``,
    with an optional key padding ``mask`` ``(B, M)`` (True = attend). Goes through the fused
    ``scaled_dot_product_attention`` except where :func:`explicit_attention_pays`: there through
    :func:`explicit_attention`. Lesson: 04_unet and 07_cross_attention.
    """
    if explicit_attention_pays(q, k, v):
        return explicit_attention(q, k, v, mask)
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def check_mask(mask: torch.Tensor, batch: int, tokens: int) -> None:
    """Check a key padding mask: shape ``(batch, tokens)``, dtype bool (True = a real token), and at least one
    real token per row (a row of padding only leaves attention nothing to attend to). Lesson: 07_cross_attention.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"the context mask must be a bool tensor (True = a real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, tokens):
        raise ValueError(f"the context mask must have shape (B, M) = ({batch}, {tokens}), got {tuple(mask.shape)}")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of the context mask are all False (padding only), so attention has no "
                         f"token to attend to; give every condition at least one real token")


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map, added to its input: the attention layer of
    the unconditional U-Net (a conditional U-Net uses a SpatialTransformer instead).

    ``(B, C, H, W) -> (B, C, H, W)``; the identity at initialisation. Lesson: 04_unet.
    """

    def __init__(self, channels: int, num_heads: int = 4, norm_groups: int = 32, num_head_channels: int = -1) -> None:
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels, norm_groups)
        self.self_attn = MultiHeadAttention(channels, num_heads, num_head_channels=num_head_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.channels:
            raise ValueError(f"AttentionBlock expects {self.channels} channels, got {C}")
        tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = x.reshape(B, C, H * W).transpose(1, 2) + self.self_attn(tokens)
        return h.transpose(1, 2).reshape(B, C, H, W)
