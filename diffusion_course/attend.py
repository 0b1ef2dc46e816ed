"""Attention guidance: steering a caption model's sampling by its own cross-attention maps.

Taught in lesson 07_cross_attention. A caption-conditional U-Net often draws the right shapes with the
colours on the wrong ones, or the right pair the wrong way round: its text encoder hands cross-attention
tokens that barely know their neighbours. The cross-attention maps say, while the image is still noise, where
each word is being drawn; attention guidance corrects the noisy image so that the maps agree with the
caption, with no retraining.

At the first ``guided_steps`` DDIM steps, before the usual update, the conditional network runs once more
with its cross-attention weights recorded in the autograd graph (:func:`~diffusion_course.nn.record_cross_attention`
with ``keep_graph``). Each word's map, renormalised over the caption's colour and shape words and read as a
distribution p_w over the pixels (:func:`token_distributions`), enters two losses:

* binding (after the linguistic-binding loss of Rassin et al. 2023, "SynGen"): a colour's map should match the
  map of its own shape and differ from those of the caption's other shapes,
  ``L_bind = mean over (c, k) of D(p_c, p_k) - mean over (c, k' != k) of D(p_c, p_k')``, with D the symmetric
  KL divergence;
* relation (in the spirit of the cross-attention layout losses of Chen et al. 2023, "Training-Free Layout
  Control with Cross-Attention Guidance"): for "A above B" the centre of mass of A's map should lie at least
  ``margin`` (a share of the image height) above B's, ``L_rel = max(0, margin - (y_B - y_A))``, and alike
  for below, left of and right of.

The image moves against the gradient g of ``w_bind L_bind + w_rel L_rel``, normalised per image:
``x_t <- x_t - step_size sqrt(1 - abar_t) g / rms(g)``. Attend-and-Excite (Chefer et al. 2023) updates the latent
the same way to make every subject's map strong. ``step_size = 0`` is plain DDIM with classifier-free guidance,
exactly (:func:`~diffusion_course.training.sample_images` with the same seed).

The caption's roles (which word is a colour of which shape, which relation joins the first two shapes) are
read from the shapes captions' grammar by :func:`caption_roles`: the guidance knows the grammar, the network
does not.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import shapes
from .ddpm import GaussianDiffusion
from .guidance import ClassifierFreeGuidance
from .nn.attention_maps import record_cross_attention

RELATION_WORDS = {"above": "above", "below": "below", "left": "left of", "right": "right of"}


class CaptionRoles(NamedTuple):
    """The word positions (token indices) that attention guidance reads in one caption: ``nouns``, the
    shape words in caption order; ``pairs``, (colour position, shape position) for each coloured shape;
    ``relation``, the relation of the first shape to the second (``"above"``, ``"left of"``, ...), or None.
    Lesson: 07_cross_attention."""
    nouns: Tuple[int, ...]
    pairs: Tuple[Tuple[int, int], ...]
    relation: Optional[str]

    @property
    def content(self) -> Tuple[int, ...]:
        """The colour and shape word positions, sorted: the tokens the maps are renormalised over."""
        return tuple(sorted(set(self.nouns) | {c for c, _ in self.pairs}))


def caption_roles(caption: str) -> CaptionRoles:
    """Parse a shapes caption (:func:`shapes.make_caption`'s grammar) into :class:`CaptionRoles`. Word i is
    token i of the caption encoder (its tokenizer splits on whitespace and adds no start token).
    Lesson: 07_cross_attention."""
    words = caption.lower().split()
    nouns = tuple(i for i, w in enumerate(words) if w in shapes.SHAPE_KINDS)
    if not nouns:
        raise ValueError(f"no shape word ({', '.join(shapes.SHAPE_KINDS)}) in the caption {caption!r}")
    pairs = []
    for i, w in enumerate(words):
        if w in shapes.COLOURS:
            if i + 1 >= len(words) or words[i + 1] not in shapes.SHAPE_KINDS:
                raise ValueError(f"the colour {w!r} in {caption!r} is not followed by a shape word")
            pairs.append((i, i + 1))
    relation = None
    if len(nouns) >= 2:
        between = [RELATION_WORDS[w] for w in words[nouns[0] + 1:nouns[1]] if w in RELATION_WORDS]
        if len(between) != 1:
            raise ValueError(f"two shapes but no single relation word (above, below, left, right) between the "
                             f"first two in {caption!r}")
        relation = between[0]
    return CaptionRoles(nouns, tuple(pairs), relation)


def token_distributions(maps: torch.Tensor, roles: CaptionRoles, smooth: int = 3) -> torch.Tensor:
    """One image's token maps ``(M, H, W)`` (:meth:`~diffusion_course.nn.AttentionRecord.token_maps`) ->
    ``(M, H, W)``: at every pixel the colour and shape words' attention renormalised to sum to 1 over them,
    smoothed by a ``smooth`` x ``smooth`` box filter, and each word's map then scaled to a distribution over
    the pixels (sum 1); the other tokens' maps are zero. Lesson: 07_cross_attention."""
    if maps.ndim != 3:
        raise ValueError(f"token maps must have shape (M, H, W), got {tuple(maps.shape)}")
    content = list(roles.content)
    if max(content) >= maps.shape[0]:
        raise ValueError(f"the caption's words reach token {max(content)}, but the maps have {maps.shape[0]} tokens")
    a = maps[content]
    a = a / a.sum(dim=0, keepdim=True).clamp_min(1e-8)
    if smooth > 1:
        a = F.avg_pool2d(a[None], smooth, 1, smooth // 2, count_include_pad=False)[0]
    a = a / a.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    out = torch.zeros_like(maps)
    out[content] = a
    return out


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(KL(p || q) + KL(q || p)) / 2 of two distributions over the same pixels. Lesson: 07_cross_attention."""
    p, q = p.clamp_min(eps), q.clamp_min(eps)
    return 0.5 * ((p * (p / q).log()).sum() + (q * (q / p).log()).sum())


def binding_loss(dist: torch.Tensor, roles: CaptionRoles) -> torch.Tensor:
    """mean over (colour c, its shape k) of D(p_c, p_k) minus the mean over (c, another shape k') of
    D(p_c, p_k'), D the symmetric KL; ``dist`` from :func:`token_distributions`. Lesson: 07_cross_attention."""
    if not roles.pairs:
        return dist.sum() * 0.0
    loss = torch.stack([symmetric_kl(dist[c], dist[k]) for c, k in roles.pairs]).mean()
    others = [(c, k2) for c, k in roles.pairs for k2 in roles.nouns if k2 != k]
    if others:
        loss = loss - torch.stack([symmetric_kl(dist[c], dist[k2]) for c, k2 in others]).mean()
    return loss


def centre_of_mass(p: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The centre ``(y, x)`` of a distribution ``(H, W)`` over the pixels, each in [0, 1] (pixel centres at
    (i + 0.5) / H; y grows downwards). Lesson: 07_cross_attention."""
    H, W = p.shape
    ys = (torch.arange(H, dtype=p.dtype, device=p.device) + 0.5) / H
    xs = (torch.arange(W, dtype=p.dtype, device=p.device) + 0.5) / W
    return (p.sum(dim=1) * ys).sum(), (p.sum(dim=0) * xs).sum()


def relation_loss(dist: torch.Tensor, roles: CaptionRoles, margin: float = 0.15,
                  relation_fn: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
    """max(0, margin - gap), the gap being how far the first shape's map lies in the caption's direction from
    the second's (for "above": y_B - y_A of :func:`centre_of_mass`); zero without a relation.
    ``relation_fn(p_a, p_b, relation, margin)`` replaces :func:`pair_relation_loss` (lesson 07 passes the
    learner's own). Lesson: 07_cross_attention."""
    if roles.relation is None:
        return dist.sum() * 0.0
    return (relation_fn or pair_relation_loss)(dist[roles.nouns[0]], dist[roles.nouns[1]], roles.relation, margin)


def pair_relation_loss(p_a: torch.Tensor, p_b: torch.Tensor, relation: str, margin: float = 0.15) -> torch.Tensor:
    """max(0, margin - gap) for "A relation B", A and B given as distributions ``(H, W)`` over the pixels and
    the gap from :func:`relation_gap`. Lesson: 07_cross_attention."""
    return F.relu(margin - relation_gap(p_a, p_b, relation))


def relation_gap(p_a: torch.Tensor, p_b: torch.Tensor, relation: str) -> torch.Tensor:
    """How far A's centre of mass lies from B's in the direction of "A relation B", as a share of the image
    (:func:`centre_of_mass`): y_B - y_A for "above", y_A - y_B for "below", x_B - x_A for "left of",
    x_A - x_B for "right of". Lesson: 07_cross_attention."""
    if relation not in shapes.RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(shapes.RELATIONS)}")
    (ya, xa), (yb, xb) = centre_of_mass(p_a), centre_of_mass(p_b)
    return {"above": yb - ya, "below": ya - yb, "left of": xb - xa, "right of": xa - xb}[relation]


def attention_loss(maps: torch.Tensor, roles: Sequence[CaptionRoles], bind_weight: float = 1.0,
                   relation_weight: float = 2.0, margin: float = 0.15,
                   relation_fn: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
    """Per image ``(B,)``: w_bind L_bind + w_rel L_rel of the token maps ``(B, M, H, W)`` of B captions with
    roles ``roles`` (``relation_fn`` as in :func:`relation_loss`). Lesson: 07_cross_attention."""
    if maps.ndim != 4 or len(roles) != maps.shape[0]:
        raise ValueError(f"need token maps (B, M, H, W) and one CaptionRoles per image; got maps of shape "
                         f"{tuple(maps.shape)} and {len(roles)} roles")
    losses = []
    for m, r in zip(maps, roles):
        dist = token_distributions(m, r)
        losses.append(bind_weight * binding_loss(dist, r)
                      + relation_weight * relation_loss(dist, r, margin, relation_fn))
    return torch.stack(losses)


def _text_model(model: nn.Module) -> nn.Module:
    encoder = getattr(model, "conditioner", None)
    if encoder is None or getattr(encoder, "tokenizer", None) is None:
        raise ValueError("attention guidance needs a caption-conditional model (a ConditionalDenoiser whose "
                         "conditioner is a TextEncoder with its tokenizer), such as the shipped shapes_caption32")
    return encoder


def attention_guided_sample(model: nn.Module, diffusion: GaussianDiffusion, captions: Sequence[str], steps: int = 50,
                            guidance_scale: float = 3.0, step_size: float = 0.015, guided_steps: int = 10,
                            bind_weight: float = 1.0, relation_weight: float = 2.0, margin: float = 0.15,
                            map_size: int = 16, seed: int = 0, batch_size: int = 50,
                            x_T: Optional[torch.Tensor] = None,
                            relation_fn: Optional[Callable[..., torch.Tensor]] = None,
                            shape: Optional[Sequence[int]] = None, model_kwargs: Optional[Dict[str, Any]] = None,
                            clip: bool = True) -> torch.Tensor:
    """One image per caption, ``(n, C, S, S)`` in [-1, 1] on the CPU, by DDIM with ``steps`` steps and
    classifier-free guidance of scale ``guidance_scale``, the first ``guided_steps`` of them (all of them when
    ``guided_steps >= steps``) preceded by an
    attention-guidance update of size ``step_size`` (see the module's docstring). The noise comes from a
    generator seeded by ``seed`` (or from ``x_T``) as in :func:`~diffusion_course.training.sample_images`, so
    ``step_size = 0`` gives the same images. Each guided step costs one more forward and backward pass of the
    conditional network. ``relation_fn(p_a, p_b, relation, margin)`` replaces :func:`pair_relation_loss`.

    A latent model steers its latents the same way
    (:meth:`~diffusion_course.ldm.LatentDiffusion.attention_guided_sample`): it passes ``shape``, the
    ``(c, h, w)`` of one sample (default: the U-Net's channels and image size), ``model_kwargs``, further inputs
    of every network call with one row per caption (such as an inpainting model's ``concat``), and
    ``clip=False`` to get the samples unclamped (default: clamped to [-1, 1]).
    Lesson: 07_cross_attention.
    """
    encoder = _text_model(model)
    if not captions:
        raise ValueError("give at least one caption")
    if guided_steps < 0:
        raise ValueError(f"guided_steps must be >= 0 (0: plain DDIM), got {guided_steps}")
    if min(step_size, bind_weight, relation_weight, margin) < 0 or batch_size < 1 or map_size < 1:
        raise ValueError("step_size, bind_weight, relation_weight and margin must be >= 0, batch_size and "
                         "map_size >= 1")
    roles = [caption_roles(c) for c in captions]
    ids = encoder.tokenizer.encode(list(captions))[0]
    device = next(model.parameters()).device
    c = model.config
    shape = (len(captions),) + tuple(shape or (c.in_channels, c.image_size, c.image_size))
    extra = dict(model_kwargs or {})
    for key, value in extra.items():
        if len(value) != len(captions):
            raise ValueError(f"model_kwargs[{key!r}] has {len(value)} rows for {len(captions)} captions; give one "
                             f"row per caption")
    x_all = diffusion._start(model, shape, x_T, torch.Generator().manual_seed(seed), device)
    seq = diffusion.ddim_timesteps(steps)
    guided = ClassifierFreeGuidance(model, guidance_scale)
    out: List[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(captions), batch_size):
            x, cond = x_all[start:start + batch_size], ids[start:start + batch_size].to(device)
            part, B = roles[start:start + batch_size], len(cond)
            kwargs = {key: value[start:start + batch_size].to(device) for key, value in extra.items()}
            keep = torch.zeros(B, dtype=torch.bool, device=device)
            for k, t in enumerate(seq):
                t_prev = seq[k + 1] if k + 1 < len(seq) else -1
                if k < guided_steps and step_size > 0:
                    x = x.detach().requires_grad_(True)
                    with torch.enable_grad(), record_cross_attention(model, keep_graph=True) as record:
                        model(x, torch.full((B,), t, dtype=torch.long, device=device), cond=cond, drop=keep,
                              **kwargs)
                        loss = attention_loss(record.token_maps(map_size), part, bind_weight, relation_weight,
                                              margin, relation_fn)
                        grad, = torch.autograd.grad(loss.sum(), x)
                    rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
                    x = (x - step_size * math.sqrt(1.0 - float(diffusion.alpha_bar[t])) * grad / rms).detach()
                x = diffusion.ddim_step(guided, x, t, t_prev, model_kwargs={"cond": cond, **kwargs})
            out.append((x.clamp(-1.0, 1.0) if clip else x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
