"""The U-Net's building blocks: ResidualBlock, Downsample, Upsample, and the DownBlock/UpBlock pairs of
the lecture (DownBlock = ResidualBlock + AttentionBlock; UpBlock alike, with the skip connection
concatenated so its input has more channels than its output).

Taught in lesson 04_unet; the ResidualBlock (without a time embedding) is reused by the autoencoders of
lessons 05_vae and 06_ldm_autoencoder. In a conditional U-Net (lesson 07_cross_attention) the attention
of a DownBlock/UpBlock is a SpatialTransformer, which also cross-attends to the condition's tokens.
``group_norm`` and ``zero_module`` live in ``layers`` and are imported here for older callers.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBlock, attention_heads
from .layers import group_norm, zero_module
from .sft import SFTLayer, feature_for
from .transformer import SpatialTransformer

StructCond = Dict[str, torch.Tensor]


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> (+ time) -> GroupNorm -> SiLU -> dropout -> conv (zero-initialised),
    added to the input (through a 1x1 conv when the channel count changes).

    ``(B, C_in, H, W), (B, emb) -> (B, C_out, H, W)``. The time embedding is projected to C_out and added
    after the first convolution (DDPM), or, with ``scale_shift``, applied as
    ``norm(h) * (1 + scale) + shift`` before the second convolution (improved DDPM). With ``emb_channels=0``
    the block takes no time embedding (the autoencoders of lessons 05/06).

    With ``sft_channels > 0`` (StableSR, lesson 09_stablesr) the block owns an :class:`SFTLayer`: given
    ``struct_cond``, a dict of condition features keyed by resolution, the residual branch's output F
    becomes (1 + alpha) * F + beta before the skip is added, (alpha, beta) made from the feature at F's
    resolution. Without ``struct_cond`` the block is the plain one. Lesson: 04_unet.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, emb_channels: int = 0,
                 dropout: float = 0.0, scale_shift: bool = False, norm_groups: int = 32,
                 sft_channels: int = 0, sft_hidden: int = 64) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if emb_channels:
            self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.sft = SFTLayer(out_channels, sft_channels, sft_hidden) if sft_channels else None

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None,
                struct_cond: Optional[StructCond] = None) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"ResidualBlock expects {self.in_channels} input channels, got {x.shape[1]}")
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_channels:
            if emb is None:
                raise ValueError("this ResidualBlock needs a time embedding (emb)")
            e = self.emb_proj(F.silu(emb))[:, :, None, None].to(h.dtype)
            if self.scale_shift:
                scale, shift = e.chunk(2, dim=1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + e)
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        if struct_cond is not None:
            if self.sft is None:
                raise ValueError("struct_cond was given, but this block has no SFT layer; build the U-Net with "
                                 "UNetConfig(sft_channels=...) to steer it")
            h = self.sft(h, feature_for(struct_cond, h))  # F_hat = (1 + alpha) * F + beta
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution. ``(B, C, H, W) -> (B, C, H/2, W/2)``.

    Lesson: 04_unet.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"Downsample needs even height and width, got {tuple(x.shape[-2:])}")
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour) and smooth with a 3x3 convolution.
    ``(B, C, H, W) -> (B, C, 2H, 2W)``. Lesson: 04_unet."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """The lecture's DownBlock: a ResidualBlock, then (at the chosen resolutions) an attention layer: an
    AttentionBlock (self-attention) when ``context_dim`` is None, else a SpatialTransformer of
    ``transformer_depth`` blocks (self-attention, cross-attention to the condition, feed-forward).

    ``forward(x (B, C_in, H, W), emb (B, E), context=None (B, M, context_dim), context_mask=None (B, M),
    struct_cond=None)`` -> ``(B, C_out, H, W)``; ``struct_cond`` (lesson 09_stablesr) goes to the residual
    block's SFT layer. Lesson: 04_unet and 07_cross_attention.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, attention: bool,
                 num_heads: int = 4, dropout: float = 0.0, scale_shift: bool = False,
                 context_dim: Optional[int] = None, norm_groups: int = 32, transformer_depth: int = 1,
                 num_head_channels: int = -1, sft_channels: int = 0, sft_hidden: int = 64) -> None:
        super().__init__()
        self.res = ResidualBlock(in_channels, out_channels, emb_channels, dropout, scale_shift, norm_groups,
                                 sft_channels, sft_hidden)
        self.attn: Optional[nn.Module] = None
        if attention:
            heads = attention_heads(out_channels, num_heads, num_head_channels)
            self.attn = (AttentionBlock(out_channels, heads, norm_groups) if context_dim is None else
                         SpatialTransformer(out_channels, heads, context_dim, transformer_depth, norm_groups))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, struct_cond: Optional[StructCond] = None) -> torch.Tensor:
        h = self.res(x, emb, struct_cond)
        if isinstance(self.attn, SpatialTransformer):
            return self.attn(h, context, context_mask)
        return self.attn(h) if self.attn is not None else h


class UpBlock(DownBlock):
    """The lecture's UpBlock: the same structure as a DownBlock, but its input is the previous feature map
    concatenated with a skip connection from the encoder, so ``in_channels = C_prev + C_skip``.

    ``(B, C_prev, H, W), (B, C_skip, H, W) -> (B, C_out, H, W)``; ``context``, ``context_mask`` and
    ``struct_cond`` as for the DownBlock. Lesson: 04_unet.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                skip: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                struct_cond: Optional[StructCond] = None) -> torch.Tensor:
        if skip is None:
            raise ValueError("an UpBlock needs the skip connection from the matching DownBlock")
        if skip.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"skip connection of size {tuple(skip.shape[-2:])} does not match {tuple(x.shape[-2:])}")
        return super().forward(torch.cat([x, skip], dim=1), emb, context, context_mask, struct_cond)
