"""The condition encoders tau_theta(y): a class label, a caption or a layout of boxes becomes M tokens in
R^{d_tau}, the ``context`` the U-Net's cross-attention reads, with a mask that marks its real tokens.

Taught in lesson 07_cross_attention. LDM writes the conditional denoiser as eps_theta(z_t, t, tau_theta(y))
and trains tau_theta jointly with it; so do we:

    ClassEmbedder   y = class index (B,)              -> (B, 1, d), mask None
    TextEncoder     y = token ids (B, L), 0 = padding -> (B, L, d), mask = ids != 0
    LayoutEncoder   y = boxes (B, K, 5)               -> (B, 1 + K, d), mask (a leading layout token + boxes)

Every encoder has a learned null condition, which replaces the condition of the rows chosen by ``drop``:
classifier-free guidance trains one network both conditionally and unconditionally by dropping the
condition of a random share of the batch, and samples with the unconditional prediction as a baseline.
``ConditionalDenoiser`` puts an encoder and a U-Net together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..utils import ConfigDict
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig

Context = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (context (B, M, d), mask (B, M) bool or None)


class ConditionEncoder(nn.Module):
    """The base of every tau_theta: ``forward(cond, drop=None) -> (context (B, M, context_dim), mask)``,
    ``mask`` ``(B, M)`` bool (True = a real token) or None when every token is real.

    Subclasses implement :meth:`encode`. Rows where ``drop`` ``(B,)`` bool is True get the null condition:
    the learned ``null`` token ``(1, context_dim)`` at position 0, zeros elsewhere, and a mask that is True
    only at position 0 (no mask at all when the encoder gives one token). The null condition is a learned
    parameter rather than zeros: a zero context gives K = V = 0 (the projections have no bias), so the
    cross-attention of an unconditional row would output exactly zero and the network could not learn how
    "no condition" should look; a learned token (like LDM's empty-caption embedding or DiT's extra null class)
    gives the unconditional prediction eps_theta(z_t, t, null) its own trainable input. Since the mask hides
    every position but 0, the zeros there are never attended to. Lesson: 07_cross_attention.
    """

    def __init__(self, context_dim: int) -> None:
        super().__init__()
        if context_dim < 1:
            raise ValueError(f"context_dim must be at least 1, got {context_dim}")
        self.context_dim = context_dim
        self.null = nn.Parameter(0.02 * torch.randn(1, context_dim))
        self.config: Optional[ConditionerConfig] = None  # set by build_conditioner

    def encode(self, cond: Any) -> Context:
        """The condition's tokens and mask, ``(B, M, context_dim)`` and ``(B, M)`` or None; subclasses
        implement it. Lesson: 07_cross_attention."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode(cond)")

    def forward(self, cond: Any, drop: Optional[torch.Tensor] = None) -> Context:
        context, mask = self.encode(cond)
        if drop is None:
            return context, mask
        B, M, d = context.shape
        if not isinstance(drop, torch.Tensor) or drop.dtype != torch.bool or tuple(drop.shape) != (B,):
            raise ValueError(f"drop must be a bool tensor of shape ({B},) (True = replace that row's condition by "
                             f"the null condition), got {drop if not isinstance(drop, torch.Tensor) else drop.shape}")
        drop = drop.to(context.device)
        null = torch.cat([self.null.to(context.dtype).expand(B, 1, d), context.new_zeros(B, M - 1, d)], dim=1)
        context = torch.where(drop[:, None, None], null, context)
        if mask is None and M == 1:
            return context, None
        if mask is None:
            mask = torch.ones(B, M, dtype=torch.bool, device=context.device)
        null_mask = torch.zeros_like(mask)
        null_mask[:, 0] = True
        return context, torch.where(drop[:, None], null_mask, mask)


def _check_long(cond: Any, ndim: int, what: str) -> torch.Tensor:
    if (not isinstance(cond, torch.Tensor) or cond.ndim != ndim or cond.dtype.is_floating_point
            or cond.dtype == torch.bool):
        got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise ValueError(f"{what}; got {got}" + (f" {cond.dtype}" if isinstance(cond, torch.Tensor) else ""))
    return cond.long()


class ClassEmbedder(ConditionEncoder):
    """tau_theta(y) for a class label: a learned vector per class. ``cond`` ``(B,)`` long in
    ``0..num_classes-1`` -> ``(B, 1, context_dim)``, mask None. Lesson: 07_cross_attention.
    """

    def __init__(self, num_classes: int, context_dim: int) -> None:
        super().__init__(context_dim)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes, context_dim)

    def encode(self, cond: torch.Tensor) -> Context:
        """Class indices ``(B,)`` -> ``((B, 1, context_dim), None)``. Lesson: 07_cross_attention."""
        y = _check_long(cond, 1, "class labels must be an integer tensor of shape (B,)")
        bad = y[(y < 0) | (y >= self.num_classes)].tolist()
        if bad:
            raise ValueError(f"class labels {sorted(set(bad))} are out of range: valid classes are "
                             f"0..{self.num_classes - 1}")
        return self.embedding(y.to(self.null.device))[:, None], None


class TextEncoder(ConditionEncoder):
    """tau_theta(y) for a caption: token embedding + learned positional embedding -> ``depth`` pre-norm
    transformer encoder layers (self-attention that ignores padding, GELU MLP) -> LayerNorm.

    ``cond`` = token ids ``(B, L)`` long, 0 = padding, L <= max_length -> ``(B, L, context_dim)`` (zeros at
    the padded positions) and mask ``ids != 0``. When built by :func:`build_conditioner` it owns its
    :class:`Tokenizer` as ``tokenizer``, and ``cond`` may also be a caption or a list of captions. Trained
    jointly with the denoiser, as LDM trains its own transformer for text. Lesson: 07_cross_attention.
    """

    def __init__(self, vocab_size: int, context_dim: int, max_length: int, depth: int = 2, num_heads: int = 4) -> None:
        super().__init__(context_dim)
        if vocab_size < 2 or max_length < 1 or depth < 1:
            raise ValueError(f"TextEncoder needs vocab_size >= 2, max_length >= 1 and depth >= 1, got "
                             f"{vocab_size}, {max_length}, {depth}")
        if num_heads < 1 or context_dim % num_heads:
            raise ValueError(f"context_dim {context_dim} cannot be split into {num_heads} heads")
        self.vocab_size, self.max_length = vocab_size, max_length
        self.tokenizer: Optional[Tokenizer] = None
        self.token_embedding = nn.Embedding(vocab_size, context_dim)
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, max_length, context_dim))
        layer = nn.TransformerEncoderLayer(context_dim, num_heads, dim_feedforward=4 * context_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(context_dim)

    def encode(self, cond: Union[torch.Tensor, str, Sequence[str]]) -> Context:
        """Token ids ``(B, L)`` (or captions, with a tokenizer) -> ``((B, L, context_dim), mask (B, L))``.

        Lesson: 07_cross_attention."""
        if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str)):
            if self.tokenizer is None:
                raise ValueError("this TextEncoder has no tokenizer: pass token ids (B, L), or build it with "
                                 "build_conditioner(ConditionerConfig(kind='text', vocabulary=...))")
            cond = self.tokenizer.encode(cond)[0]
        ids = _check_long(cond, 2, "token ids must be an integer tensor of shape (B, L)")
        B, L = ids.shape
        if L > self.max_length:
            raise ValueError(f"{L} tokens per caption, but this TextEncoder was built for max_length "
                             f"{self.max_length}; shorten the captions or build a larger encoder")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)].tolist()
        if bad:
            raise ValueError(f"token ids {sorted(set(bad))} are outside the vocabulary 0..{self.vocab_size - 1}")
        ids = ids.to(self.null.device)
        mask = ids != 0
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"captions {empty} are all padding (id 0); every caption needs at least one token")
        h = self.token_embedding(ids) + self.pos_embedding[:, :L]  # (B, L, d)
        h = self.encoder(h, src_key_padding_mask=~mask)  # PyTorch's convention: True = ignore
        return self.norm(h).masked_fill(~mask[..., None], 0.0), mask  # padding carries zeros


class LayoutEncoder(ConditionEncoder):
    """tau_theta(y) for a layout of boxes. ``cond`` ``(B, K, 5)`` float, rows ``[class, x0, y0, x1, y1]`` with
    class in 1..num_classes (0 = padding) and coordinates in [0, 1] -> ``(B, 1 + K, context_dim)`` and mask.

    Each box becomes one token: its class embedding plus an MLP of the Fourier features
    [sin(2^k pi c), cos(2^k pi c)], k < num_frequencies, of its four coordinates c. A learned leading
    "layout" token is always present, so no row of the mask is empty (an empty layout is still a condition).
    Lesson: 07_cross_attention.
    """

    def __init__(self, num_classes: int, context_dim: int, max_objects: int, num_frequencies: int = 6) -> None:
        super().__init__(context_dim)
        if num_classes < 1 or max_objects < 1 or num_frequencies < 1:
            raise ValueError(f"LayoutEncoder needs num_classes, max_objects and num_frequencies >= 1, got "
                             f"{num_classes}, {max_objects}, {num_frequencies}")
        self.num_classes, self.max_objects = num_classes, max_objects
        self.class_embedding = nn.Embedding(num_classes + 1, context_dim)  # row 0: padding, never attended
        self.box_mlp = nn.Sequential(nn.Linear(8 * num_frequencies, context_dim), nn.SiLU(),
                                     nn.Linear(context_dim, context_dim))
        self.layout_token = nn.Parameter(0.02 * torch.randn(1, 1, context_dim))
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_frequencies), persistent=False)

    def fourier_features(self, coords: torch.Tensor) -> torch.Tensor:
        """``(B, K, 4)`` coordinates -> ``(B, K, 8 * num_frequencies)`` sines and cosines.

        Lesson: 07_cross_attention."""
        args = coords[..., None] * self.freqs  # (B, K, 4, F)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1).flatten(-2)

    def encode(self, cond: torch.Tensor) -> Context:
        """Boxes ``(B, K, 5)`` -> ``((B, 1 + K, context_dim), mask (B, 1 + K))``. Lesson: 07_cross_attention."""
        if not isinstance(cond, torch.Tensor) or cond.ndim != 3 or cond.shape[-1] != 5:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"a layout must be a float tensor of shape (B, K, 5), rows [class, x0, y0, x1, y1]; "
                             f"got {got}")
        B, K, _ = cond.shape
        if K > self.max_objects:
            raise ValueError(f"{K} boxes per layout, but this LayoutEncoder was built for max_objects "
                             f"{self.max_objects}")
        cond = cond.float().to(self.null.device)
        cls, coords = cond[..., 0], cond[..., 1:]
        if (cls != cls.round()).any() or (cls < 0).any() or (cls > self.num_classes).any():
            raise ValueError(f"box classes must be whole numbers in 0..{self.num_classes} (0 = padding), got "
                             f"{sorted(set(cls.flatten().tolist()))}")
        real = cls != 0  # (B, K)
        c = coords[real]
        if ((c < 0) | (c > 1)).any() or (c[:, 2] < c[:, 0]).any() or (c[:, 3] < c[:, 1]).any():
            raise ValueError("box coordinates must lie in [0, 1] with x0 <= x1 and y0 <= y1 (fractions of the "
                             "image width and height)")
        tokens = self.class_embedding(cls.long()) + self.box_mlp(self.fourier_features(coords))  # (B, K, d)
        context = torch.cat([self.layout_token.expand(B, 1, -1), tokens], dim=1)
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=real.device), real], dim=1)
        return context, mask


KINDS = ("class", "text", "layout")


@dataclass
class ConditionerConfig(ConfigDict):
    """Which tau_theta to build and its sizes. ``kind`` is ``"class"`` (uses ``num_classes``), ``"text"``
    (``vocabulary``, ``max_length``, ``depth``, ``num_heads``) or ``"layout"`` (``num_classes``,
    ``max_objects``); ``context_dim`` is the token width d_tau, the U-Net's ``context_dim``.

    Lesson: 07_cross_attention.
    """

    _what = "conditioner configuration"

    kind: str = "class"
    context_dim: int = 64
    num_classes: int = 10
    vocabulary: List[str] = field(default_factory=list)
    max_length: int = 8
    depth: int = 2
    num_heads: int = 4
    max_objects: int = 4

    def __post_init__(self) -> None:
        self.vocabulary = [str(w) for w in self.vocabulary]
        if self.kind not in KINDS:
            raise ValueError(f"conditioner kind must be one of {KINDS}, got {self.kind!r}")
        if self.context_dim < 1:
            raise ValueError(f"context_dim must be at least 1, got {self.context_dim}")
        if self.kind in ("class", "layout") and self.num_classes < 1:
            raise ValueError(f"a {self.kind} conditioner needs num_classes >= 1, got {self.num_classes}")
        if self.kind == "text":
            if not self.vocabulary:
                raise ValueError("a text conditioner needs a vocabulary: the list of words its captions use")
            Tokenizer(self.vocabulary, self.max_length)  # validates the words and max_length
            if self.depth < 1 or self.num_heads < 1 or self.context_dim % self.num_heads:
                raise ValueError(f"a text conditioner needs depth >= 1 and num_heads dividing context_dim "
                                 f"{self.context_dim}, got depth {self.depth}, num_heads {self.num_heads}")
        if self.kind == "layout" and self.max_objects < 1:
            raise ValueError(f"a layout conditioner needs max_objects >= 1, got {self.max_objects}")


def build_conditioner(config: ConditionerConfig) -> ConditionEncoder:
    """The encoder ``config`` describes, with ``config`` kept as its ``config``; a text encoder also gets its
    ``tokenizer``. Lesson: 07_cross_attention."""
    c = config
    encoder: ConditionEncoder
    if c.kind == "class":
        encoder = ClassEmbedder(c.num_classes, c.context_dim)
    elif c.kind == "text":
        tokenizer = Tokenizer(c.vocabulary, c.max_length)
        encoder = TextEncoder(tokenizer.vocab_size, c.context_dim, c.max_length, c.depth, c.num_heads)
        encoder.tokenizer = tokenizer
    else:
        encoder = LayoutEncoder(c.num_classes, c.context_dim, c.max_objects)
    encoder.config = c
    return encoder


class ConditionalDenoiser(nn.Module):
    """eps_theta(x_t, t, tau_theta(y)): a U-Net and (optionally) the condition encoder that feeds it.

    ``forward(x (B, C, H, W), t (B,), cond=None, drop=None (B,) bool, concat=None)`` -> ``(B, C_out, H, W)``;
    ``concat`` (lesson 08) is a spatial condition ``(B, C_c, H, W)`` stacked onto x first. With a
    conditioner, ``cond`` is required and ``drop`` selects rows that get the null condition (for
    classifier-free guidance); without one, ``cond`` must be None and this is ``unet(x, t)``. ``config`` is
    the U-Net's configuration (samplers read ``config.in_channels`` and ``config.image_size``).
    Lesson: 07_cross_attention.
    """

    def __init__(self, unet: UNet, conditioner: Optional[ConditionEncoder] = None) -> None:
        super().__init__()
        d = unet.config.context_dim
        if conditioner is not None and d is None:
            raise ValueError("this U-Net has no cross-attention; build it with UNetConfig(context_dim="
                             f"{conditioner.context_dim}) to use a conditioner")
        if conditioner is None and d is not None:
            raise ValueError(f"this U-Net was built with context_dim {d}; give it a conditioner of that width")
        if conditioner is not None and conditioner.context_dim != d:
            raise ValueError(f"the conditioner makes tokens of width {conditioner.context_dim}, but the U-Net was "
                             f"built for context_dim {d}; make them equal")
        self.unet, self.conditioner = unet, conditioner

    @property
    def config(self) -> UNetConfig:
        """The U-Net's configuration. Lesson: 07_cross_attention."""
        return self.unet.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None,
                drop: Optional[torch.Tensor] = None, concat: Optional[torch.Tensor] = None) -> torch.Tensor:
        if concat is not None:  # a spatial condition (lesson 08): stacked onto x_t along the channels
            x = concat_condition(x, concat, self.unet.config.in_channels)
        if self.conditioner is None:
            if cond is not None or drop is not None:
                raise ValueError("this denoiser is unconditional (no conditioner): call it without cond and drop")
            return self.unet(x, t)
        if cond is None:
            raise ValueError("this denoiser is conditional: pass cond (use drop=torch.ones(B, dtype=torch.bool) "
                             "for the unconditional prediction)")
        context, mask = self.conditioner(cond, drop)
        return self.unet(x, t, context=context, context_mask=mask)


def concat_condition(x: torch.Tensor, concat: torch.Tensor, in_channels: int) -> torch.Tensor:
    """``cat([x (B, C, H, W), concat (B, C_c, H, W)], dim=1)``, checked: a spatial condition must match x in
    batch, height and width, and C + C_c must be the U-Net's ``in_channels``. Lesson: 08_latent_diffusion."""
    if concat.ndim != 4 or concat.shape[0] != x.shape[0] or concat.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"a spatial condition must have shape (B, C_c, H, W) = ({x.shape[0]}, C_c, "
                         f"{x.shape[-2]}, {x.shape[-1]}) to be concatenated to x_t {tuple(x.shape)}; got "
                         f"{tuple(concat.shape)}")
    if x.shape[1] + concat.shape[1] != in_channels:
        raise ValueError(f"x_t has {x.shape[1]} channels and the spatial condition {concat.shape[1]}, together "
                         f"{x.shape[1] + concat.shape[1]}, but the U-Net takes in_channels = {in_channels}")
    return torch.cat([x, concat.to(x.dtype)], dim=1)
