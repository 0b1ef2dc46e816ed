"""The time-aware encoder of StableSR (Wang et al., 2023, "Exploiting Diffusion Prior for Real-World Image
Super-Resolution"): the encoder half of a U-Net, conditioned on the time step t, used as a multi-scale
feature extractor. It has no decoder and no output head; instead every scale it passes through is mapped
to ``out_channels`` by its own time-conditioned residual block, and the features are returned per
resolution, ready to modulate the decoder of a frozen diffusion U-Net.

Taught in lesson 09_stablesr (the lecture calls the network ``EncoderUNetModelWT``).

Layout (input of side S, L = len(channel_mult) levels, mc = model_channels, ds the current
down-sampling rate, emb = 4 * mc):

    t (B,) -> time_embed: sinusoid (mc) -> Linear -> SiLU -> Linear (emb)      [stays float32]
    x (B, in_channels, S, S)
      conv_in (in_channels -> mc)                                              [input path]
      input_blocks, per level l = 0..L-1 (ds = 2**l, side S / ds):
          num_res_blocks x [ResidualBlock(-> mc * channel_mult[l], emb)
                            (+ AttentionBlock when ds is in attention_resolutions)]
          Downsample (stride-2 conv), not after the last level   --> capture the map from before it
      middle_block: ResidualBlock -> AttentionBlock -> ResidualBlock         --> capture its output
      fea_tran[i]: ResidualBlock(captured channels -> out_channels, emb), one per captured scale
    -> {"S": (B, out_channels, S, S), "S/2": ..., ..., "S/2**(L-1)": (B, out_channels, ...)}

The captured scales are found from the path itself (:func:`capture_scales`): the last map before every
change of resolution, and the bottleneck's output. Their number must equal ``len(fea_tran)``
(:func:`check_fea_tran`), which is ``len(channel_mult)`` for an encoder built from its configuration.

Half precision, as in the reference: :meth:`EncoderUNetModelWT.convert_to_fp16` turns the convolutions and
linear layers of the input path and the bottleneck to float16, while the time embedding and ``fea_tran``
stay float32; the group norms of the converted part compute in float32 and hand back float16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBlock, attention_heads
from .blocks import Downsample, ResidualBlock
from .embedding import TimeEmbedding
from .layers import check_levels, group_norm
from ..utils import ConfigDict


@dataclass
class TimeAwareEncoderConfig(ConfigDict):
    """Every choice of the time-aware encoder. ``attention_resolutions`` lists down-sampling rates ds
    (1 = full size, 2 = half, ...), as for the U-Net. An attention layer over C channels has
    ``C // num_head_channels`` heads when ``num_head_channels > 0``, else ``num_heads``; every GroupNorm has
    ``min(norm_groups, C)`` groups. A ResidualBlock adds the time embedding per channel right before a
    GroupNorm, so a block with one channel per group (C <= norm_groups) ignores t: this is an error for the
    ``fea_tran`` blocks (``out_channels``), and worth avoiding for the levels (``model_channels * mult``).
    The encoder returns ``len(channel_mult)`` feature maps of ``out_channels`` channels each, at sides
    ``image_size / 2**l`` for ``l = 0..len(channel_mult)-1``.

    Lesson: 09_stablesr.
    """

    _what = "time-aware encoder configuration"

    image_size: int = 32
    in_channels: int = 3
    model_channels: int = 32
    out_channels: int = 64
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: Tuple[int, ...] = (4,)
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = -1
    norm_groups: int = 8

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
                     "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must list one positive multiplier per level, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        rates = check_levels(self.image_size, self.channel_mult, self.attention_resolutions, "encoder")
        level_channels = [self.model_channels * m for m in self.channel_mult]
        for ch in level_channels + [self.out_channels]:
            group_norm(ch, self.norm_groups)  # a clear error when the groups do not divide the channels
        if self.out_channels <= self.norm_groups:
            # A ResidualBlock adds the time embedding per channel just before a GroupNorm; with one channel per
            # group the norm subtracts it again, and fea_tran would not be time-conditioned at all.
            raise ValueError(f"out_channels {self.out_channels} with norm_groups {self.norm_groups} leaves one channel "
                             f"per group in every fea_tran block, where GroupNorm removes the time embedding (added "
                             f"per channel before the norm), so fea_tran would ignore t; use norm_groups smaller "
                             f"than out_channels (dividing it) or more out_channels")
        attention_channels = [ch for r, ch in zip(rates, level_channels) if r in self.attention_resolutions]
        for ch in attention_channels + [level_channels[-1]]:  # the chosen levels and the bottleneck
            attention_heads(ch, self.num_heads, self.num_head_channels)  # a clear error if they do not divide

    @property
    def downsampling_factor(self) -> int:
        """The total down-sampling 2 ** (len(channel_mult) - 1); input sides must be multiples of it.
        Lesson: 09_stablesr."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def downsampling_rates(self) -> List[int]:
        """The down-sampling rate ds of every level, ``[1, 2, 4, ...]``. Lesson: 09_stablesr."""
        return [2 ** level for level in range(len(self.channel_mult))]


def capture_scales(path: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The feature maps the encoder hands to ``fea_tran``, picked from its path.

    ``path`` holds the maps along the encoder in order, each ``(B, C_i, H_i, W_i)``: conv_in's output, then
    every input block's output, the last item the bottleneck's output. Returned: every map whose successor
    has a different height (the last map before each change of resolution), then the last map, in path
    order (largest resolution first). A single map is returned alone; an empty path is a ValueError.
    Lesson: 09_stablesr.
    """
    if len(path) == 0:
        raise ValueError("capture_scales needs at least one feature map; the path is empty")
    for i, h in enumerate(path):
        if h.ndim < 2:
            raise ValueError(f"path[{i}] has shape {tuple(h.shape)}; expected feature maps (B, C, H, W)")
    captured = [h for h, nxt in zip(path[:-1], path[1:]) if nxt.shape[-2] != h.shape[-2]]
    captured.append(path[-1])
    return captured


def check_fea_tran(fea_tran: Sequence[Any], captured: Sequence[torch.Tensor]) -> None:
    """Check that there is one ``fea_tran`` block per captured scale (the reference asserts the same).

    ``fea_tran``: the per-scale blocks; ``captured``: the maps from :func:`capture_scales`, each
    ``(B, C_i, H_i, W_i)``. A ValueError naming both counts, the captured resolutions and the remedy when
    the counts differ. Lesson: 09_stablesr.
    """
    if len(fea_tran) != len(captured):
        sides = [str(h.shape[-2]) for h in captured]
        raise ValueError(f"the encoder has {len(fea_tran)} fea_tran blocks but captured {len(captured)} scales "
                         f"(resolutions {sides}); there must be one fea_tran block per captured scale. channel_mult "
                         f"has one scale per level, so build fea_tran with len(channel_mult) blocks (rebuild the "
                         f"encoder from its TimeAwareEncoderConfig rather than editing fea_tran)")


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers run one after the other, handing the time embedding to the layers that take
    one (the ResidualBlocks) and not to the others (AttentionBlock, Downsample).

    ``forward(x (B, C_in, H, W), emb (B, E))`` -> ``(B, C_out, H', W')``: one step of the encoder's path,
    returning one feature map. Lesson: 09_stablesr.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResidualBlock) else layer(x)
        return x


class _Float32GroupNorm(nn.GroupNorm):
    """GroupNorm that normalises in float32 and returns the input's dtype (the reference's GroupNorm32), so a
    float16 input path can keep float32 norm parameters on any device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def _float32_norms(module: nn.Module) -> None:
    """Replace every GroupNorm inside ``module`` by a :class:`_Float32GroupNorm` with the same parameters."""
    for name, child in module.named_children():
        if type(child) is nn.GroupNorm:
            norm = _Float32GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            _float32_norms(child)


def _convert_weights(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights and biases of every Conv2d and Linear inside ``module`` to ``dtype``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.to(dtype)


class EncoderUNetModelWT(nn.Module):
    """The time-aware encoder: ``forward(x (B, in_channels, H, W), t (B,))`` returns a dict mapping each
    captured resolution (the feature map's height as a string, from the largest to the smallest, e.g. the
    keys ``"32", "16", "8"`` for ``channel_mult=(1, 2, 2)`` at H = 32) to a tensor ``(B, out_channels, h, w)``
    in x's dtype. H and W need not equal ``config.image_size``; they must be multiples of the
    down-sampling factor.

    Attributes: ``time_embed`` (:class:`TimeEmbedding`, mc -> 4 mc), ``conv_in``, ``input_blocks`` (one
    :class:`TimestepEmbedSequential` per step of the path: ResidualBlock [+ AttentionBlock], or Downsample),
    ``middle_block`` (ResidualBlock, AttentionBlock, ResidualBlock) and ``fea_tran`` (one time-conditioned
    ResidualBlock per captured scale, to ``out_channels``). Lesson: 09_stablesr.
    """

    def __init__(self, config: TimeAwareEncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        mc = c.model_channels
        emb = 4 * mc
        self.time_embed = TimeEmbedding(mc, emb)
        self.conv_in = nn.Conv2d(c.in_channels, mc, 3, padding=1)

        self.input_blocks = nn.ModuleList()
        captured_channels: List[int] = []  # the channels of every map that capture_scales will pick
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: List[nn.Module] = [ResidualBlock(ch, mult * mc, emb, c.dropout, norm_groups=c.norm_groups)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    heads = attention_heads(ch, c.num_heads, c.num_head_channels)
                    layers.append(AttentionBlock(ch, heads, c.norm_groups))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != len(c.channel_mult) - 1:
                captured_channels.append(ch)  # the map before this Downsample is captured
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                ds *= 2

        heads = attention_heads(ch, c.num_heads, c.num_head_channels)
        self.middle_block = TimestepEmbedSequential(
            ResidualBlock(ch, ch, emb, c.dropout, norm_groups=c.norm_groups),
            AttentionBlock(ch, heads, c.norm_groups),
            ResidualBlock(ch, ch, emb, c.dropout, norm_groups=c.norm_groups))
        captured_channels.append(ch)  # the bottleneck's output

        self.fea_tran = nn.ModuleList([ResidualBlock(cc, c.out_channels, emb, c.dropout, norm_groups=c.norm_groups)
                                       for cc in captured_channels])
        _float32_norms(self.input_blocks)
        _float32_norms(self.middle_block)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the input path and bottleneck: float32, or float16 after :meth:`convert_to_fp16`.
        Lesson: 09_stablesr."""
        return self.conv_in.weight.dtype

    def convert_to_fp16(self) -> None:
        """Cast the convolutions and linear layers of the input path (conv_in, input_blocks) and the
        bottleneck (middle_block) to float16, as the reference does; their group norms keep float32
        parameters and compute in float32. ``time_embed`` and ``fea_tran`` stay float32. Lesson: 09_stablesr.
        """
        for part in (self.conv_in, self.input_blocks, self.middle_block):
            _convert_weights(part, torch.float16)

    def convert_to_fp32(self) -> None:
        """Undo :meth:`convert_to_fp16`: the input path and bottleneck back to float32. Lesson: 09_stablesr."""
        for part in (self.conv_in, self.input_blocks, self.middle_block):
            _convert_weights(part, torch.float32)

    def resolutions(self, image_size: Optional[int] = None) -> List[str]:
        """The keys :meth:`forward` returns for an input of height ``image_size`` (the configured size by
        default), largest first: ``[str(image_size // 2**l) for l in range(len(channel_mult))]``.
        Lesson: 09_stablesr."""
        size = self.config.image_size if image_size is None else image_size
        f = self.config.downsampling_factor
        if size < 1 or size % f:
            raise ValueError(f"image size {size} is not a positive multiple of the encoder's down-sampling "
                             f"factor {f}")
        return [str(size // ds) for ds in self.config.downsampling_rates]

    def _check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4:
            raise ValueError(f"the time-aware encoder expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"the time-aware encoder expects a floating-point image, got {x.dtype}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"the time-aware encoder was built for {c.in_channels} input channels, "
                             f"got {x.shape[1]}")
        f = c.downsampling_factor
        if x.shape[-1] % f or x.shape[-2] % f or x.shape[-1] == 0 or x.shape[-2] == 0:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the encoder's down-sampling "
                             f"factor {f}; resize or pad to a multiple of {f}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},), one time step per image, got {tuple(t.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._check_input(x, t)
        emb = self.time_embed(t)  # (B, 4 mc), float32 like time_embed and fea_tran
        emb_path = emb.to(self.dtype)  # the input path's ResidualBlocks project it with their own weights
        h = self.conv_in(x.to(self.dtype))
        path = [h]
        for block in self.input_blocks:
            h = block(h, emb_path)
            path.append(h)
        path.append(self.middle_block(h, emb_path))
        captured = capture_scales(path)
        check_fea_tran(self.fea_tran, captured)
        # back to float32 for fea_tran (the input's dtype in the usual float32 case); results in x's dtype
        return {str(feat.shape[-2]): tran(feat.to(emb.dtype), emb).to(x.dtype)
                for feat, tran in zip(captured, self.fea_tran)}
