"""From a data set to the conditions y that a conditional denoiser is trained on, one tensor per image,
and the network that reads them.

Taught in lesson 07_cross_attention.

=========  =========================================  ==========================================
kind       y (one row per image)                      tau_theta
=========  =========================================  ==========================================
class      the class label, ``(N,)`` long              ``ClassEmbedder``: one token
caption    the caption's token ids, ``(N, L)`` long    ``TextEncoder``: one token per word
layout     boxes with labels, ``(N, K, 5)`` float      ``LayoutEncoder``: one token per box
=========  =========================================  ==========================================

Class labels exist for every labelled data set (digits, MNIST, ...); captions and layouts come with the
procedurally generated ``shapes`` (:mod:`diffusion_course.shapes`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

from .nn import ConditionalDenoiser, UNet, UNetConfig
from .nn.conditioning import ConditionerConfig, Tokenizer, build_conditioner
from .shapes import PAIRS, POSITIONS, RELATIONS, caption_vocabulary, make_caption

CONDITIONS = ("none", "class", "caption", "layout")
ENCODER_KIND = {"class": "class", "caption": "text", "layout": "layout"}  # condition -> ConditionerConfig.kind


def _check_kind(kind: str) -> None:
    if kind not in CONDITIONS:
        raise ValueError(f"unknown condition {kind!r}; valid: {', '.join(CONDITIONS)}")


def conditioner_config_for(data: Any, kind: str, context_dim: int = 64, depth: int = 2, num_heads: int = 4,
                           max_length: int = 0) -> Optional[ConditionerConfig]:
    """The condition encoder's configuration for ``kind`` on ``data`` (an ``ImageData`` or ``ShapesData``),
    or None for ``kind="none"``. Captions use the shapes grammar's whole vocabulary, so held-out captions
    tokenize too; ``max_length`` 0 means the longest caption the grammar makes. Lesson: 07_cross_attention."""
    _check_kind(kind)
    if kind == "none":
        return None
    if kind == "class":
        return ConditionerConfig(kind="class", context_dim=context_dim, num_classes=len(data.classes))
    if kind == "caption":
        if getattr(data, "captions", None) is None:
            raise ValueError(f"the data set {data.name!r} has no captions; captions come with 'shapes'")
        vocab = caption_vocabulary()
        return ConditionerConfig(kind="text", context_dim=context_dim, vocabulary=list(vocab),
                                 max_length=max_length or longest_caption(), depth=depth, num_heads=num_heads)
    if getattr(data, "layout", None) is None:
        raise ValueError(f"the data set {data.name!r} has no layouts (boxes with labels); layouts come with 'shapes'")
    return ConditionerConfig(kind="layout", context_dim=context_dim, num_classes=len(data.classes),
                             max_objects=int(data.layout.shape[1]))


def longest_caption() -> int:
    """The number of words in the longest caption the shapes grammar can make. Lesson: 07_cross_attention."""
    objects = [PAIRS[0]] * 3  # every colour and every kind is one word
    return max([len(make_caption(objects, relation).split()) for relation in RELATIONS]
               + [len(make_caption(objects[:1], position=p).split()) for p in POSITIONS])


def condition_tensor(data: Any, config: Optional[ConditionerConfig]) -> Optional[torch.Tensor]:
    """The conditions of every image of ``data`` as one tensor (see the module's table), or None without a
    conditioner. Lesson: 07_cross_attention."""
    if config is None:
        return None
    if config.kind == "class":
        return data.labels.long()
    if config.kind == "text":
        return encode_captions(data.captions, config)
    return data.layout.float()


def encode_captions(captions: Sequence[str], config: ConditionerConfig) -> torch.Tensor:
    """Token ids ``(N, max_length)`` of ``captions`` under the conditioner's tokenizer; an unknown word is
    an error that names it. Lesson: 07_cross_attention."""
    ids, _ = Tokenizer(config.vocabulary, config.max_length).encode(list(captions))
    return ids


def conditional_data(data: Any, kind: str, context_dim: int = 64, **encoder: Any
                     ) -> Tuple[Optional[torch.Tensor], Optional[ConditionerConfig]]:
    """``(conditions, conditioner config)`` of ``data`` for ``kind`` (both None for ``"none"``).

    Lesson: 07_cross_attention.
    """
    config = conditioner_config_for(data, kind, context_dim, **encoder)
    return condition_tensor(data, config), config


def build_model(unet_config: UNetConfig, conditioner_config: Optional[ConditionerConfig] = None,
                unet_class: Callable[[UNetConfig], nn.Module] = UNet) -> nn.Module:
    """The network a run trains: the U-Net alone, or (with a conditioner) the
    :class:`~diffusion_course.nn.ConditionalDenoiser` of condition encoder tau_theta and U-Net, whose widths
    must agree. ``unet_class`` builds the U-Net from its configuration: the package's :class:`UNet`, or a class
    of the same parameter names, such as the one a learner writes in lesson 04. Lesson: 07_cross_attention."""
    if conditioner_config is None:
        return unet_class(unet_config)
    if unet_config.context_dim != conditioner_config.context_dim:
        raise ValueError(f"the condition encoder gives tokens of width {conditioner_config.context_dim}, but the "
                         f"U-Net's cross-attention expects context_dim {unet_config.context_dim}; make them equal")
    return ConditionalDenoiser(unet_class(unet_config), build_conditioner(conditioner_config))
