"""The two small layer helpers every other network module uses: a GroupNorm that checks its groups, and
the zero initialisation that makes a residual branch start as the identity.

Taught in lesson 04_unet. This module imports no other module of ``diffusion_course.nn``, so the blocks,
the attention layers and the transformer can all build on it without importing each other in a circle.
"""
from __future__ import annotations

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
