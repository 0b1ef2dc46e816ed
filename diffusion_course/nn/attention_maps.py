"""Where does each word look? Recording the cross-attention weights of a conditional U-Net.

Taught in lesson 07_cross_attention. Inside ``with record_cross_attention(model) as record:`` every
cross-attention layer of ``model`` computes softmax(Q K^T / sqrt(d)) explicitly (with the padding mask
applied; the same output as the fused path, only slower) and appends the weights, averaged over heads,
detached and on the CPU (or, with ``keep_graph``, as they are), as a ``(B, N, M)`` tensor under its module
name: one entry per call, so one per U-Net forward pass (a sampling step calls the U-Net once, or twice with
unbatched classifier-free guidance). Row n of such a tensor is how the image token n (one pixel of that
layer's feature map, N = h * w) spreads its attention over the M context tokens.
:meth:`AttentionRecord.token_maps` turns them into one picture per context token.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention


class AttentionRecord:
    """The recorded cross-attention weights: ``maps[layer_name]`` is a list with one ``(B, N, M)`` CPU
    tensor per call of that layer, in call order (averaged over heads, rows summing to 1, 0 on padding).

    Lesson: 07_cross_attention.
    """

    def __init__(self) -> None:
        self.maps: Dict[str, List[torch.Tensor]] = {}

    def append(self, layer: str, weights: torch.Tensor) -> None:
        """Store one call's weights ``(B, N, M)`` of the layer named ``layer``. Lesson: 07_cross_attention."""
        self.maps.setdefault(layer, []).append(weights)

    @property
    def layer_names(self) -> List[str]:
        """The names of the layers that recorded something, in the order they were first called.

        Lesson: 07_cross_attention."""
        return list(self.maps)

    def num_calls(self, layer: Optional[str] = None) -> int:
        """How many calls ``layer`` (by default the first recorded layer) has recorded. Lesson: 07_cross_attention."""
        if not self.maps:
            return 0
        return len(self.maps[layer if layer is not None else self.layer_names[0]])

    def token_maps(self, image_size: Union[int, Tuple[int, int]], layers: Optional[Sequence[str]] = None,
                   steps: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One attention map per context token, ``(B, M, H, W)`` with ``(H, W) = image_size``.

        For each chosen layer, each chosen call's ``(B, N, M)`` weights are reshaped to ``(B, M, h, w)`` (h, w
        the layer's feature-map size, with the image's aspect ratio, N = h * w) and upsampled bilinearly to
        ``(H, W)``; these are averaged over the layer's chosen calls, and the per-layer results are then
        averaged over the chosen layers, each layer weighing the same. ``layers`` (names from
        :attr:`layer_names`, default all) and ``steps`` (call indices per layer, negative ones counting from
        the end; default all) choose. Bilinear upsampling and averaging are convex combinations, so at every
        pixel the maps of the real tokens still sum to 1 and those of padding tokens are 0.
        Lesson: 07_cross_attention.
        """
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if not self.maps:
            raise ValueError("nothing was recorded: run the model inside `with record_cross_attention(model)`")
        names = list(layers) if layers is not None else self.layer_names
        unknown = [n for n in names if n not in self.maps]
        if unknown or not names:
            raise ValueError(f"unknown or no layers {unknown}; recorded layers: {self.layer_names}")
        per_layer = []
        for name in names:
            calls = self.maps[name]
            chosen = list(range(len(calls))) if steps is None else list(steps)
            bad = [s for s in chosen if not -len(calls) <= s < len(calls)]
            if bad or not chosen:
                raise ValueError(f"steps {bad or chosen} out of range: layer {name!r} recorded {len(calls)} calls")
            shapes = {tuple(calls[s].shape) for s in chosen}
            if len(shapes) > 1:
                raise ValueError(f"layer {name!r} recorded calls of different shapes {sorted(shapes)} (a different "
                                 f"batch size or condition length); choose steps of one shape")
            weights = torch.stack([calls[s] for s in chosen]).float().mean(dim=0)  # (B, N, M)
            B, N, M = weights.shape
            h = round(math.sqrt(N * H / W))
            w = N // h if h else 0
            if h * w != N:
                raise ValueError(f"layer {name!r} has {N} image tokens, which is no feature map of the aspect "
                                 f"ratio of image_size {(H, W)}")
            maps = weights.transpose(1, 2).reshape(B, M, h, w)
            per_layer.append(F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False))
        if len({tuple(m.shape) for m in per_layer}) > 1:
            raise ValueError("the chosen layers recorded different batch sizes or condition lengths")
        return torch.stack(per_layer).mean(dim=0)


@contextmanager
def record_cross_attention(model: nn.Module, keep_graph: bool = False) -> Iterator[AttentionRecord]:
    """Record every cross-attention layer of ``model`` while the ``with`` block runs; yields the
    :class:`AttentionRecord` the weights go to. On exit the layers return to their usual path,
    :func:`~diffusion_course.nn.attention.dot_product_attention` (also when the block raises). With ``keep_graph``
    the weights stay on the model's device and in the autograd graph, so that a loss on the maps can be
    differentiated (:mod:`~diffusion_course.attend` steers sampling so); by default they are detached copies on
    the CPU.
    Lesson: 07_cross_attention.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention) and m.is_cross]
    if not layers:
        raise ValueError("this model has no cross-attention layers to record; build the U-Net with "
                         "UNetConfig(context_dim=...)")
    record = AttentionRecord()
    for name, layer in layers:
        layer.recorder = ((lambda weights, name=name: record.append(name, weights)) if keep_graph else
                          (lambda weights, name=name: record.append(name, weights.detach().cpu())))
    try:
        yield record
    finally:
        for _, layer in layers:
            layer.recorder = None
