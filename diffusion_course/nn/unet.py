"""The DDPM U-Net eps_theta(x_t, t), configured by a dataclass.

Taught in lesson 04_unet; later lessons extend it without rewriting it: a ``context`` for
cross-attention (lesson 07_cross_attention) and, with ``sft_channels``, an SFT layer in every residual block
that turns the residual branch's output F into (1 + alpha) * F + beta, steered by ``struct_cond``, a dict of
condition features keyed by resolution (StableSR, lesson 09_stablesr).

Layout (image of side S, L = len(channel_mult) levels, ds the current down-sampling rate):

    conv_in (in_channels -> model_channels)
    encoder: per level, num_res_blocks DownBlocks (attention where ds is in attention_resolutions),
             then a Downsample (not after the last level); every output is kept as a skip connection
    middle:  ResidualBlock -> AttentionBlock (SpatialTransformer when conditional) -> ResidualBlock
    decoder: per level (deepest first), num_res_blocks + 1 UpBlocks, each eating one skip connection,
             then an Upsample (not after the first level)
    out:     GroupNorm -> SiLU -> conv (zero-initialised) -> out_channels

With ``context_dim`` set, every attention site (the chosen resolutions and the middle) is a
SpatialTransformer of ``transformer_depth`` blocks (self-attention, cross-attention to the condition's tokens
``context`` (B, M, context_dim), GEGLU feed-forward), as in LDM; without it, exactly the DDPM U-Net of
lesson 04 (an AttentionBlock of self-attention), with the same parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .attention import AttentionBlock, attention_heads, check_mask
from .blocks import DownBlock, Downsample, ResidualBlock, UpBlock, Upsample
from .embedding import TimeEmbedding
from .layers import check_levels, group_norm, zero_module
from .transformer import SpatialTransformer
from ..utils import ConfigDict

StructCond = Dict[str, torch.Tensor]


@dataclass
class UNetConfig(ConfigDict):
    """Every choice of the U-Net. ``attention_resolutions`` lists down-sampling rates ds (1 = full size,
    2 = half, ...), as in the reference implementations. ``out_channels = 0`` means ``in_channels``.

    ``context_dim`` (lesson 07_cross_attention) makes the U-Net conditional: its attention sites become
    SpatialTransformers of ``transformer_depth`` blocks. An attention layer over C channels has
    ``C // num_head_channels`` heads when ``num_head_channels > 0``, else ``num_heads``.

    ``sft_channels > 0`` (lesson 09_stablesr) gives every residual block (encoder, middle and decoder) an
    SFT layer whose M_theta takes condition features of ``sft_channels`` channels through ``sft_hidden``
    channels. Configurations saved before these keys existed load with their defaults. Lesson: 04_unet.
    """

    _what = "U-Net configuration"

    image_size: int = 32
    in_channels: int = 1
    out_channels: int = 0
    model_channels: int = 64
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (2,)
    dropout: float = 0.0
    num_heads: int = 4
    scale_shift: bool = False
    context_dim: Optional[int] = None
    norm_groups: int = 32
    transformer_depth: int = 1
    num_head_channels: int = -1
    sft_channels: int = 0
    sft_hidden: int = 64

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if not self.out_channels:
            self.out_channels = self.in_channels
        if self.in_channels < 1 or self.model_channels < 1 or not self.channel_mult or self.num_res_blocks < 1:
            raise ValueError(f"invalid U-Net configuration: {self}")
        if self.sft_channels < 0 or self.sft_hidden < 1:
            raise ValueError(f"sft_channels must be >= 0 (0: no SFT layers) and sft_hidden >= 1, got "
                             f"{self.sft_channels} and {self.sft_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        rates = check_levels(self.image_size, self.channel_mult, self.attention_resolutions, "U-Net")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be a positive width (or None for an unconditional U-Net), "
                             f"got {self.context_dim}")
        if self.transformer_depth < 1:
            raise ValueError(f"transformer_depth must be at least 1, got {self.transformer_depth}")
        attention_channels = [self.model_channels * m for r, m in zip(rates, self.channel_mult)
                              if r in self.attention_resolutions] + [self.model_channels * self.channel_mult[-1]]
        for ch in attention_channels:
            attention_heads(ch, self.num_heads, self.num_head_channels)  # a clear error if they do not divide

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class UNet(nn.Module):
    """The U-Net noise predictor: ``forward(x (B, C, H, W), t (B,), context=None, struct_cond=None,
    context_mask=None)`` returns eps_theta of shape ``(B, out_channels, H, W)``.

    ``context`` ``(B, M, context_dim)``, the condition's tokens tau_theta(y), feeds the cross-attention
    layers and is required when ``context_dim`` is set (lesson 07_cross_attention); ``context_mask``
    ``(B, M)`` bool marks its real tokens (True) and its padding (False).
    ``struct_cond`` (lesson 09_stablesr; needs ``sft_channels``) maps a resolution (the feature map's height,
    as a string such as ``"16"``) to a condition feature ``(B, sft_channels, h, h)``; every residual block
    working at that resolution modulates its residual branch with it. :meth:`sft_resolutions` lists the keys
    needed; without ``struct_cond`` the U-Net is exactly its unmodulated self. Lesson: 04_unet.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        mc = c.model_channels
        emb = 4 * mc
        self.time_embed = TimeEmbedding(mc, emb)
        self.conv_in = nn.Conv2d(c.in_channels, mc, 3, padding=1)
        kw = dict(num_heads=c.num_heads, dropout=c.dropout, scale_shift=c.scale_shift, context_dim=c.context_dim,
                  norm_groups=c.norm_groups, transformer_depth=c.transformer_depth,
                  num_head_channels=c.num_head_channels, sft_channels=c.sft_channels, sft_hidden=c.sft_hidden)
        res_kw = dict(sft_channels=c.sft_channels, sft_hidden=c.sft_hidden)

        self.down = nn.ModuleList()
        skip_channels: List[int] = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(DownBlock(ch, mult * mc, emb, ds in c.attention_resolutions, **kw))
                ch = mult * mc
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                ds *= 2

        self.mid_res1 = ResidualBlock(ch, ch, emb, c.dropout, c.scale_shift, c.norm_groups, **res_kw)
        heads = attention_heads(ch, c.num_heads, c.num_head_channels)
        self.mid_attn = (AttentionBlock(ch, heads, c.norm_groups) if c.context_dim is None else
                         SpatialTransformer(ch, heads, c.context_dim, c.transformer_depth, c.norm_groups))
        self.mid_res2 = ResidualBlock(ch, ch, emb, c.dropout, c.scale_shift, c.norm_groups, **res_kw)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                self.up.append(UpBlock(ch + skip_channels.pop(), mult * mc, emb, ds in c.attention_resolutions, **kw))
                ch = mult * mc
                if level and i == c.num_res_blocks:
                    self.up.append(Upsample(ch))
                    ds //= 2
        self.out = nn.Sequential(group_norm(ch, c.norm_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1)))

    def sft_resolutions(self, image_size: Optional[int] = None) -> List[str]:
        """The resolutions (feature-map heights as strings, largest first) at which this U-Net's residual
        blocks work for an input of side ``image_size`` (the configured one by default): the keys
        ``struct_cond`` must hold. Lesson: 09_stablesr."""
        size = image_size or self.config.image_size
        return [str(size // 2 ** level) for level in range(len(self.config.channel_mult))]

    def prior_state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights without those of the SFT layers: the frozen prior's part of a StableSR U-Net.
        Lesson: 09_stablesr."""
        return {k: v for k, v in self.state_dict().items() if ".sft." not in k}

    def sft_parameters(self) -> List[nn.Parameter]:
        """The parameters of every SFT layer (empty without ``sft_channels``). Lesson: 09_stablesr."""
        return [p for name, p in self.named_parameters() if ".sft." in name]

    def _check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4:
            raise ValueError(f"the U-Net expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"the U-Net was built for {c.in_channels} input channels, got {x.shape[1]}")
        f = c.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the U-Net's down-sampling "
                             f"factor {f}; resize or pad to a multiple of {f}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")

    def _check_context(self, x: torch.Tensor, context: Optional[torch.Tensor],
                       context_mask: Optional[torch.Tensor]) -> None:
        d = self.config.context_dim
        if d is None:
            if context is not None or context_mask is not None:
                raise ValueError("context was given, but this U-Net has no cross-attention (context_dim is None); "
                                 "build it with UNetConfig(context_dim=...) to condition it")
            return
        if context is None:
            raise ValueError(f"this U-Net was built with context_dim {d}: pass context=(B, M, {d}), the "
                             f"condition's tokens (for the unconditional prediction, the encoder's null condition)")
        if context.ndim != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape (B={x.shape[0]}, M, {d}), got {tuple(context.shape)}")
        if context.shape[-1] != d:
            raise ValueError(f"context has width {context.shape[-1]}, but this U-Net's cross-attention layers "
                             f"were built for context_dim {d}")
        if context_mask is not None:
            check_mask(context_mask, context.shape[0], context.shape[1])

    def _check_struct_cond(self, x: torch.Tensor, struct_cond: Optional[StructCond]) -> None:
        if struct_cond is None:
            return
        c = self.config
        if not c.sft_channels:
            raise ValueError("struct_cond was given, but this U-Net has no SFT layers (sft_channels is 0); build "
                             "it with UNetConfig(sft_channels=...) to steer it with condition features")
        need = self.sft_resolutions(x.shape[-2])
        if sorted(struct_cond, key=int) != sorted(need, key=int):
            raise ValueError(f"struct_cond has features for resolutions {sorted(struct_cond, key=int)}, but this "
                             f"U-Net works at {need} for an input of height {x.shape[-2]}: give one per resolution")
        for key, f in struct_cond.items():
            if f.ndim != 4 or f.shape[0] != x.shape[0] or f.shape[1] != c.sft_channels or f.shape[-2] != int(key):
                raise ValueError(f"struct_cond[{key!r}] must have shape (B={x.shape[0]}, sft_channels="
                                 f"{c.sft_channels}, {key}, w), got {tuple(f.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None,
                struct_cond: Optional[StructCond] = None, context_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(x, t)
        self._check_context(x, context, context_mask)
        self._check_struct_cond(x, struct_cond)
        emb = self.time_embed(t)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb, context, context_mask, struct_cond) if isinstance(block, DownBlock) else block(h)
            skips.append(h)
        h = self.mid_res1(h, emb, struct_cond)
        if isinstance(self.mid_attn, SpatialTransformer):
            h = self.mid_attn(h, context, context_mask)
        else:
            h = self.mid_attn(h)
        h = self.mid_res2(h, emb, struct_cond)
        for block in self.up:
            if isinstance(block, UpBlock):
                h = block(h, emb, context, skip=skips.pop(), context_mask=context_mask, struct_cond=struct_cond)
            else:
                h = block(h)
        return self.out(h)
