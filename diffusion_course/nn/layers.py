"""The two small layer helpers every other network module uses: a GroupNorm that checks its groups, and
the zero initialisation that makes a residual branch start as the identity.

Taught in lesson 04_unet. This module imports no other module of ``diffusion_course.nn``, so the blocks,
the attention layers and the transformer can all build on it without importing each other in a circle.
"""
from __future__ import annotations

from typing import List, Sequence

from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``min(groups, channels)`` groups; a clear error when they do not divide the channels.

    Lesson: 04_unet.
    """
    g = min(groups, channels)
    if channels % g:
        raise ValueError(f"GroupNorm: {channels} channels cannot be split into {g} groups; choose channel "
                         f"counts that are multiples of {g} (or set norm_groups)")
    return nn.GroupNorm(g, channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it. A residual branch that ends in a zeroed
    layer starts as the identity map. Lesson: 04_unet."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def check_levels(image_size: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int],
                 what: str) -> List[int]:
    """The checks every multi-level network of the course shares (the U-Net of lesson 04, the time-aware
    encoder of lesson 09): ``image_size`` divisible by the total down-sampling 2 ** (len(channel_mult) - 1),
    and ``attention_resolutions`` among the levels' down-sampling rates. Returns those rates ``[1, 2, 4, ...]``;
    a clear error names ``what`` was being built. Lesson: 04_unet."""
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by the {what}'s total down-sampling "
                         f"{factor} (2 ** (len(channel_mult) - 1)); use a multiple of {factor} or fewer levels")
    rates = [2 ** level for level in range(len(channel_mult))]
    bad = [r for r in attention_resolutions if r not in rates]
    if bad:
        raise ValueError(f"attention_resolutions {bad} are not down-sampling rates of this {what} ({rates}); "
                         f"they are rates ds (1 = full size, 2 = half, ...), not image sides")
    return rates
