"""Checkers of lesson 07_cross_attention: attention, cross-attention, condition dropout, guidance."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from ..attend import pair_relation_loss, relation_gap
from ..guidance import guided_eps
from ..nn.attention import MultiHeadAttention
from ..shapes import opposite_relation
from ._runner import Case, _gen, _no_grad, _seeded, run_check


def _random_mask(g: torch.Generator, B: int, M: int) -> torch.Tensor:
    """(B, M) bool with a random number (at least one) of leading real tokens per row, the rest padding."""
    lengths = torch.randint(1, M + 1, (B,), generator=g)
    return torch.arange(M)[None] < lengths[:, None]


def ref_scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V over the last two axes, with padding (mask False) never attended to:
    ``q (B, N, d), k (B, M, d), v (B, M, e), mask (B, M) bool -> (B, N, e)``. Lesson: 07_cross_attention."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, N, M)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def check_scaled_dot_product_attention(fn: Callable) -> Callable:
    """Exercise 7.1: scaled dot-product attention with a key padding mask. Lesson: 07_cross_attention."""
    cases = []
    for seed, B, N, M, d, e, masked in ((70, 2, 5, 7, 16, 16, False), (71, 3, 6, 4, 8, 5, True),
                                        (72, 2, 9, 9, 32, 12, True)):
        g = _gen(seed)
        mask = _random_mask(g, B, M) if masked else None
        cases.append(Case({"q": 2 * torch.randn(B, N, d, generator=g), "k": 2 * torch.randn(B, M, d, generator=g),
                           "v": torch.randn(B, M, e, generator=g), "mask": mask},
                          f"N={N} queries, M={M} keys of width d={d}" + (", with padding" if masked else "")))
    return run_check("7.1", fn, ref_scaled_dot_product_attention, cases,
                     "scores = q @ k.transpose(-2, -1) / math.sqrt(d) with d = q.shape[-1] (the width of one "
                     "query, not N or M); where mask is False set the score to -inf (scores.masked_fill(~mask[:, "
                     "None, :], float('-inf'))); softmax over the LAST axis (each query's weights over the keys sum "
                     "to 1); then @ v.", rtol=1e-5, atol=1e-5,
                     nudge="each query's weights over the keys must sum to 1, the scores are scaled by the width of "
                           "one query vector, and a padding key (mask False) must get exactly zero weight; the "
                           "failing case says whether padding was involved.")


def _random_cross_attention(seed: int, query_dim: int, context_dim: int, heads: int) -> MultiHeadAttention:
    with _seeded(seed):  # seeded weights; the learner's random state (CPU and CUDA) is left alone
        attn = MultiHeadAttention(query_dim, heads, context_dim).eval()
        torch.nn.init.normal_(attn.to_out.weight, std=0.3)  # undo the zero init so that every path counts
        torch.nn.init.normal_(attn.to_out.bias, std=0.1)
    return attn


def ref_cross_attention(attn: MultiHeadAttention, x: torch.Tensor, context: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The forward pass of a cross-attention layer from its weights: Q = W_Q x, K = W_K context,
    V = W_V context, split into ``attn.num_heads`` heads, attention per head, heads merged, W_out.
    ``x (B, N, C), context (B, M, D), mask (B, M) -> (B, N, C)``. Lesson: 07_cross_attention."""
    B, N, C = x.shape
    h = attn.num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B * h, L, C / h)
        return t.reshape(B, t.shape[1], h, C // h).transpose(1, 2).reshape(B * h, t.shape[1], C // h)

    q, k, v = heads(attn.to_q(x)), heads(attn.to_k(context)), heads(attn.to_v(context))
    m = None if mask is None else mask.repeat_interleave(h, dim=0)
    out = ref_scaled_dot_product_attention(q, k, v, m)  # (B * h, N, C / h)
    return attn.to_out(out.reshape(B, h, N, C // h).transpose(1, 2).reshape(B, N, C))


def check_cross_attention(fn: Callable) -> Callable:
    """Exercise 7.2: a cross-attention layer, K and V from the condition. Lesson: 07_cross_attention."""
    cases = []
    for seed, C, D, heads, masked in ((73, 16, 16, 2, False), (74, 16, 8, 4, True), (75, 8, 12, 1, True)):
        g = _gen(seed)
        B, N, M = 2, 6, 5
        cases.append(Case({"attn": _random_cross_attention(seed, C, D, heads),
                           "x": torch.randn(B, N, C, generator=g), "context": torch.randn(B, M, D, generator=g),
                           "mask": _random_mask(g, B, M) if masked else None},
                          f"{N} image tokens of width {C}, {M} condition tokens of width {D}, {heads} heads"
                          + (", with padding" if masked else "")))
    wrapped = lambda attn, x, context, mask: _no_grad(fn, attn, x, context, mask)  # noqa: E731
    used = run_check("7.2", wrapped, lambda **kw: _no_grad(ref_cross_attention, *kw.values()), cases,
                     "Q comes from the image tokens: attn.to_q(x); K and V from the condition: attn.to_k(context), "
                     "attn.to_v(context). Split the channels into attn.num_heads heads of width C // num_heads "
                     "((B, L, C) -> (B, heads, L, C/heads)), run your scaled_dot_product_attention per head "
                     "(with the mask), merge the heads back to (B, N, C) and finish with attn.to_out.",
                     rtol=1e-5, atol=1e-5,
                     nudge="the queries come from the image tokens, the keys and values from the condition's tokens; "
                           "the heads split the channels, so fold them into the batch, attend with the mask, and "
                           "merge them back before the output layer.")
    return fn if used is wrapped else ref_cross_attention


def ref_condition_dropout(context: torch.Tensor, mask: torch.Tensor, u: torch.Tensor, p_uncond: float,
                          null: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance's condition dropout: rows with ``u < p_uncond`` get the null condition (the
    learned ``null`` token ``(1, d)`` at position 0, zeros elsewhere, mask True only at position 0); the
    others are unchanged. ``context (B, M, d), mask (B, M) bool, u (B,)`` -> ``(context, mask)``.
    Lesson: 07_cross_attention."""
    drop = u < p_uncond
    B, M, d = context.shape
    null_context = torch.cat([null.expand(B, 1, d), context.new_zeros(B, M - 1, d)], dim=1)
    null_mask = torch.zeros_like(mask)
    null_mask[:, 0] = True
    return (torch.where(drop[:, None, None], null_context, context), torch.where(drop[:, None], null_mask, mask))


def _as_one_tensor(fn: Callable, **kw) -> torch.Tensor:
    out = fn(**kw)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out)):
        return out  # the comparison says what is wrong
    context, mask = out
    if mask.dtype != torch.bool or mask.shape != kw["mask"].shape:
        return mask  # the comparison reports the wrong shape or values
    return torch.cat([context, mask.to(context.dtype)[..., None]], dim=-1)  # (B, M, d + 1)


def check_condition_dropout(fn: Callable) -> Callable:
    """Exercise 7.3: condition dropout to the learned null condition. Lesson: 07_cross_attention."""
    cases = []
    for seed, B, M, d, p in ((76, 8, 5, 6, 0.5), (77, 16, 3, 4, 0.1), (78, 6, 1, 3, 0.9)):
        g = _gen(seed)
        cases.append(Case({"context": torch.randn(B, M, d, generator=g), "mask": _random_mask(g, B, M),
                           "u": torch.rand(B, generator=g), "p_uncond": p, "null": torch.randn(1, d, generator=g)},
                          f"{B} conditions of {M} tokens, p_uncond = {p}"))
    wrapped = lambda **kw: _as_one_tensor(fn, **kw)  # noqa: E731
    used = run_check("7.3", wrapped, lambda **kw: _as_one_tensor(ref_condition_dropout, **kw), cases,
                     "drop = u < p_uncond (True with probability p_uncond). A dropped row's context is the null "
                     "token at position 0 and zeros after it (torch.cat([null.expand(B, 1, d), zeros], dim=1)), and "
                     "its mask is True at position 0 only; use torch.where(drop[:, None, None], ...) for the context "
                     "and torch.where(drop[:, None], ...) for the mask. Rows that are kept stay exactly as they were.",
                     nudge="a row is dropped when its u is below p_uncond, and a dropped row must look like an empty "
                           "condition: the learned null token first, nothing after it, and a mask that shows that one "
                           "token only; the rows that are kept do not change at all.")
    return fn if used is wrapped else ref_condition_dropout


def ref_guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u). Lesson: 07_cross_attention."""
    return guided_eps(eps_cond, eps_uncond, scale)


def check_guided_eps(fn: Callable) -> Callable:
    """Exercise 7.4: the guidance combination. Lesson: 07_cross_attention."""
    cases = []
    for seed, shape, s in ((79, (2, 1, 4, 4), 3.0), (80, (3, 3, 2, 2), 0.0), (81, (1, 4, 3, 3), 1.0),
                           (82, (2, 2, 2, 2), 7.5)):
        g = _gen(seed)
        cases.append(Case({"eps_cond": torch.randn(shape, generator=g), "eps_uncond": torch.randn(shape, generator=g),
                           "scale": s}, f"scale s = {s}"))
    return run_check("7.4", fn, ref_guided_eps, cases,
                     "start from the unconditional prediction and move s times the difference towards the "
                     "conditional one: eps_uncond + scale * (eps_cond - eps_uncond). s = 0 must give eps_uncond, "
                     "s = 1 eps_cond. (Ho & Salimans write (1 + w) eps_c - w eps_u, which is the same with s = 1 + w.)",
                     nudge="start from the unconditional prediction and move along the direction that leads to the "
                           "conditional one; scale 0 must give back the unconditional prediction exactly and scale 1 "
                           "the conditional one.")


def ref_relation_loss(p_a: torch.Tensor, p_b: torch.Tensor, relation: str, margin: float) -> torch.Tensor:
    """Attention guidance's relation loss max(0, margin - gap) for "A relation B" from the two shapes'
    distributions ``(H, W)`` over the pixels (:func:`~diffusion_course.attend.pair_relation_loss`).
    Lesson: 07_cross_attention."""
    return pair_relation_loss(p_a, p_b, relation, margin)


def _peaked(g: torch.Generator, H: int, W: int) -> torch.Tensor:
    """A random distribution over H x W pixels with a clear bump somewhere."""
    y, x = torch.randint(0, H, (1,), generator=g).item(), torch.randint(0, W, (1,), generator=g).item()
    logits = torch.randn(H, W, generator=g)
    logits[y, x] += 6.0
    return logits.flatten().softmax(0).view(H, W)


def _relation_mistakes(p_a: torch.Tensor, p_b: torch.Tensor, relation: str, margin: float
                       ) -> List[Tuple[str, torch.Tensor]]:
    H, W = p_a.shape
    swap = {"above": "left of", "below": "right of", "left of": "above", "right of": "below"}
    gap = relation_gap(p_a, p_b, relation)
    return [("the direction is reversed (y grows downwards: A above B means y_A < y_B)",
             pair_relation_loss(p_a, p_b, opposite_relation(relation), margin)),
            ("x and y are swapped (the sum over dim=1 of an (H, W) map is its profile along y, the rows)",
             pair_relation_loss(p_a, p_b, swap[relation], margin)),
            ("the max(0, .) is missing, so a relation that already holds is still pushed", margin - gap),
            ("the centres are in pixels, not in shares of the image (divide by H and W, pixel centres at i + 0.5)",
             torch.clamp(margin - gap * (H if relation in ("above", "below") else W), min=0))]


def check_relation_loss(fn: Callable) -> Callable:
    """Exercise 7.5: attention guidance's relation loss. Lesson: 07_cross_attention."""
    cases = []
    for seed, H, W, relation, margin in ((90, 8, 8, "above", 0.15), (91, 16, 16, "below", 0.15),
                                         (92, 8, 12, "left of", 0.3), (93, 16, 16, "right of", 0.15),
                                         (94, 6, 6, "above", 0.6)):
        g = _gen(seed)
        cases.append(Case({"p_a": _peaked(g, H, W), "p_b": _peaked(g, H, W), "relation": relation, "margin": margin},
                          f'"A {relation} B" on {H}x{W} maps, margin {margin}'))
    top, bottom = torch.zeros(8, 8), torch.zeros(8, 8)
    top[0, 3], bottom[7, 3] = 1.0, 1.0
    cases.append(Case({"p_a": top, "p_b": bottom, "relation": "above", "margin": 0.15},
                      "A at the top, B at the bottom: the relation holds"))

    def diagnose(kwargs: dict, got: object) -> Optional[str]:
        if not isinstance(got, torch.Tensor):
            return None
        for name, wrong in _relation_mistakes(**kwargs):
            if got.shape == wrong.shape and torch.allclose(got.double(), wrong.double(), rtol=1e-5, atol=1e-7) and \
                    not torch.allclose(wrong.double(), ref_relation_loss(**kwargs).double()):
                return name
        return None

    return run_check("7.5", fn, ref_relation_loss, cases,
                     "with ys = (arange(H) + 0.5) / H and xs = (arange(W) + 0.5) / W (on p_a's device), a map's "
                     "centre is y = (p.sum(dim=1) * ys).sum() and x = (p.sum(dim=0) * xs).sum(). The gap is "
                     "y_B - y_A for above, y_A - y_B for below, x_B - x_A for left of, x_A - x_B for right of; return "
                     "torch.clamp(margin - gap, min=0).",
                     nudge="find where each map's mass sits (its centre of mass, as a share of the image's height "
                           "and width), measure how far A is from B in the direction the relation names (remember "
                           "that rows count downwards), and charge only the part of the margin that is missing.",
                     diagnose=diagnose, rtol=1e-5, atol=1e-7)


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("7.1", check_scaled_dot_product_attention, ref_scaled_dot_product_attention),
    ("7.2", check_cross_attention, ref_cross_attention),
    ("7.3", check_condition_dropout, ref_condition_dropout),
    ("7.4", check_guided_eps, ref_guided_eps),
    ("7.5", check_relation_loss, ref_relation_loss),
]
