"""Checkers of lesson 09_stablesr: the SFT layer, the capture of features by resolution, the ``fea_tran``
length check, the time-aware encoder's forward pass and ILVR's swap of low frequencies.

Every checker leaves the learner's random state alone: its small random networks are seeded from forks of
the global generator or from generators of their own. The networks the learner writes are checked the way the
course checks every network the lecture draws: the package's weights are loaded into the learner's module (same
parameter names) and the outputs are compared.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..ddpm import GaussianDiffusion
from ..nn.encoder import EncoderUNetModelWT, TimeAwareEncoderConfig, capture_scales, check_fea_tran
from ..nn.sft import SFTLayer
from ..stablesr import ilvr_swap, wavelet_split
from ._runner import Case, CaseRejected, _gen, _learners_rng_kept, _seeded
from .lesson08 import _run_diagnosed


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter seeded random values (zero-initialised layers too), so every path shows."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


# -- Exercise 9.1: the SFT layer ---------------------------------------------------------------------------

def _sft_output(cls: Callable, state: Any, channels: int, cond_channels: int, hidden: int,
                F_dif: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    layer = cls(channels, cond_channels, hidden)
    if state is not None:
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CaseRejected(f"the package's SFT weights do not fit your module: missing {sorted(missing)}, "
                               f"unexpected {sorted(unexpected)}. Name the parts as the lecture does: `shared` "
                               f"(nn.Sequential of Conv2d(cond_channels, hidden, 3, padding=1) and SiLU), "
                               f"`to_alpha` and `to_beta` (Conv2d(hidden, channels, 3, padding=1) each)")
    with torch.no_grad():
        return layer(F_dif, feature)


def ref_sft_layer(state: Any, channels: int, cond_channels: int, hidden: int, F_dif: torch.Tensor,
                  feature: torch.Tensor) -> torch.Tensor:
    """The package's :class:`~diffusion_course.nn.sft.SFTLayer` with ``state`` loaded (or fresh when None),
    applied to ``F_dif (B, channels, h, w)`` and ``feature (B, cond_channels, h, w)``. Lesson: 09_stablesr."""
    return _sft_output(SFTLayer, state, channels, cond_channels, hidden, F_dif, feature)


def check_sft_layer(cls: Callable) -> Callable:
    """Exercise 9.1: the SFT layer as a module ``cls(channels, cond_channels, hidden)`` with ``forward(F_dif,
    feature)``: at initialisation it must be the identity exactly, and with the package's weights loaded it must
    give (1 + alpha) * F_dif + beta. Returns the class to use from here on (the learner's, or the package's
    SFTLayer when it is still a stub). Lesson: 09_stablesr."""
    cases = []
    with _learners_rng_kept():
        for seed, (C, Cc, hid, B, s), fresh in ((91, (8, 6, 5, 2, 4), True), (92, (8, 6, 5, 2, 4), False),
                                                (93, (4, 3, 7, 3, 6), False), (94, (16, 8, 8, 1, 2), False)):
            g = _gen(seed)
            state = None if fresh else _randomise(SFTLayer(C, Cc, hid), seed).state_dict()
            kw = {"state": state, "channels": C, "cond_channels": Cc, "hidden": hid,
                  "F_dif": torch.randn(B, C, s, s, generator=g) * 2, "feature": torch.randn(B, Cc, s, s, generator=g)}
            label = ("a freshly built layer: it must return F_dif unchanged" if fresh else
                     f"the package's random weights loaded, channels {C}, cond_channels {Cc}, hidden {hid}")
            # a fresh layer must give F_dif back bit for bit: the lesson asserts torch.equal right after
            cases.append(Case(kw, label, **({"rtol": 0.0, "atol": 0.0} if fresh else {})))

        def learner(**kw: Any) -> torch.Tensor:
            return _sft_output(cls, **kw)

        def heads(kw: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
            ref = SFTLayer(kw["channels"], kw["cond_channels"], kw["hidden"])
            if kw["state"] is not None:
                ref.load_state_dict(kw["state"])
            with torch.no_grad():
                return ref.params(kw["feature"])

        def mistake(formula: Callable) -> Callable:
            return lambda **kw: formula(kw["F_dif"], *heads(kw))

        used = _run_diagnosed(
            "9.1 (the SFT layer)", learner, ref_sft_layer, cases,
            "alpha = to_alpha(shared(feature)), beta = to_beta(shared(feature)), and the output is "
            "(1 + alpha) * F_dif + beta. Build to_alpha and to_beta with zero_module(...) so that alpha = beta = 0 "
            "at the start and the layer is the identity.",
            [("the 1 is missing: alpha * F_dif + beta", mistake(lambda F, a, b: a * F + b)),
             ("beta is added before the scaling: (1 + alpha) * (F_dif + beta)", mistake(lambda F, a, b: (1 + a) * (F + b))),
             ("alpha and beta are swapped: (1 + beta) * F_dif + alpha", mistake(lambda F, a, b: (1 + b) * F + a))],
            nudge="the layer predicts a scale and a shift from the condition feature, through one shared trunk and "
                  "two heads; it modulates F_dif around the identity, so with both heads at zero (as freshly "
                  "built) it must hand F_dif back unchanged.",
            rtol=1e-4, atol=1e-5)
    return cls if used is learner else SFTLayer


# -- Exercise 9.2: which feature maps the encoder captures ---------------------------------------------------

def _indices(chosen: Sequence[Any], path: Sequence[torch.Tensor]) -> torch.Tensor:
    """Where each chosen map sits in the path (-1 for one that is not a map of the path)."""
    out = []
    for c in chosen:
        out.append(next((i for i, h in enumerate(path) if h is c), -1))
    return torch.tensor(out, dtype=torch.long)


def ref_capture_scales_indices(path: List[torch.Tensor]) -> torch.Tensor:
    """The positions in ``path`` of the maps :func:`~diffusion_course.nn.encoder.capture_scales` picks.
    Lesson: 09_stablesr."""
    return _indices(capture_scales(path), path)


def _path(sides: Sequence[int], seed: int) -> List[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(1, 2, s, s, generator=g) for s in sides]


def check_capture_scales(fn: Callable) -> Callable:
    """Exercise 9.2: ``capture_scales(path)`` returns, from the maps along the encoder (conv_in's output, every
    block's output, the bottleneck's output last), the last map before every change of resolution and then the
    bottleneck's output, as the very tensors of the path. Returns the function to use. Lesson: 09_stablesr."""
    paths = {"channel_mult (1, 2, 2), one block per level": (32, 32, 16, 16, 8, 8, 8),
             "channel_mult (1, 2), two blocks per level": (16, 16, 16, 8, 8, 8, 8),
             "one level only": (8, 8, 8, 8),
             "four levels, one block each": (32, 32, 16, 16, 8, 8, 4, 4, 4)}
    cases = [Case({"path": _path(sides, 95 + k)}, f"{label}: map sides {sides}")
             for k, (label, sides) in enumerate(paths.items())]

    def learner(path: List[torch.Tensor]) -> torch.Tensor:
        return _indices(list(fn(path)), path)

    def positions(pick: Callable) -> Callable:
        return lambda path: torch.tensor(pick([h.shape[-2] for h in path]), dtype=torch.long)

    with _learners_rng_kept():
        used = _run_diagnosed(
            "9.2 (capture_scales)", learner, ref_capture_scales_indices, cases,
            "walk along the path; keep path[i] when path[i + 1] has a different height (the map from just before a "
            "Downsample), and always keep the last map (the bottleneck's output). Return the tensors themselves, "
            "largest resolution first.",
            [("the first map after each change is kept instead of the last one before it",
              positions(lambda s: [0] + [i for i in range(1, len(s)) if s[i] != s[i - 1]])),
             ("the bottleneck's output is left out",
              positions(lambda s: [i for i in range(len(s) - 1) if s[i + 1] != s[i]])),
             ("every map is kept", positions(lambda s: list(range(len(s)))))],
            nudge="a map is worth keeping when the next map along the path is smaller (a Downsample follows it), "
                  "and the bottleneck's output always ends the list; return the path's own tensors, not copies.",
            rtol=0.0, atol=0.0)
    return fn if used is learner else capture_scales


# -- Exercise 9.3: one fea_tran block per captured scale -------------------------------------------------------

def _fea_tran_verdict(fn: Callable, n_blocks: int, sides: Sequence[int]) -> torch.Tensor:
    """[raised a ValueError, its message names both counts] as a tensor of 0/1."""
    captured = [torch.zeros(1, 1, s, s) for s in sides]
    fea_tran = [nn.Identity() for _ in range(n_blocks)]
    try:
        fn(fea_tran, captured)
    except ValueError as e:
        words = str(e).replace("(", " ").replace(")", " ").replace(",", " ").split()
        names_both = str(n_blocks) in words and str(len(sides)) in words
        return torch.tensor([1.0, float(names_both)])
    return torch.tensor([0.0, 0.0])


def ref_fea_tran_verdict(n_blocks: int, sides: List[int]) -> torch.Tensor:
    """What :func:`~diffusion_course.nn.encoder.check_fea_tran` does with ``n_blocks`` blocks and captured maps
    of the given sides: ``[1, 1]`` (a ValueError naming both counts) or ``[0, 0]`` (no error). Lesson: 09_stablesr."""
    return _fea_tran_verdict(check_fea_tran, n_blocks, sides)


def check_fea_tran_length(fn: Callable) -> Callable:
    """Exercise 9.3: ``check_fea_tran(fea_tran, captured)`` raises a ValueError whose message names both counts
    when there is not exactly one ``fea_tran`` block per captured scale, and returns quietly otherwise.
    Returns the function to use. Lesson: 09_stablesr."""
    cases = [Case({"n_blocks": n, "sides": sides}, f"{n} fea_tran blocks, captured sides {sides}")
             for n, sides in ((3, [32, 16, 8]), (2, [32, 16, 8]), (4, [32, 16, 8]), (1, [8]), (0, [16, 8]))]

    def learner(n_blocks: int, sides: List[int]) -> torch.Tensor:
        return _fea_tran_verdict(fn, n_blocks, sides)

    with _learners_rng_kept():
        used = _run_diagnosed(
            "9.3 (check_fea_tran)", learner, ref_fea_tran_verdict, cases,
            "compare len(fea_tran) with len(captured); when they differ, raise ValueError with a message that "
            "states both numbers (and the captured resolutions, str(h.shape[-2]) for each map) and says to build "
            "one fea_tran block per level of channel_mult. Raise nothing when they agree.",
            [("nothing is ever raised", lambda n_blocks, sides: torch.tensor([0.0, 0.0])),
             ("an error is raised even when the counts agree", lambda n_blocks, sides: torch.tensor([1.0, 1.0]))],
            nudge="the check must raise a ValueError exactly when the two counts differ, with a message that states "
                  "both numbers so that the reader sees which configuration is off; agreeing counts raise nothing.",
            rtol=0.0, atol=0.0)
    return fn if used is learner else check_fea_tran


# -- Exercise 9.4: the time-aware encoder's forward pass ------------------------------------------------------

def _flatten_features(features: Any) -> torch.Tensor:
    """The resolution keys (as numbers) then every feature map, flattened, in the dict's order."""
    if not isinstance(features, dict):
        raise CaseRejected(f"the forward pass must return a dict keyed by resolution, got {type(features).__name__}")
    if not all(isinstance(k, str) for k in features):
        raise CaseRejected(f"the keys must be the heights as strings, str(h) ('32', not 32): the U-Net looks its "
                           f"condition features up by those; got keys {list(features)}")
    keys = torch.tensor([float(k) for k in features], dtype=torch.float32)
    return torch.cat([keys] + [v.detach().float().flatten() for v in features.values()])


def ref_encoder_forward(encoder: EncoderUNetModelWT, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The package's time-aware encoder on ``x (B, C, H, W)`` and ``t (B,)``, flattened as the keys followed by
    every feature map. Lesson: 09_stablesr."""
    with torch.no_grad():
        return _flatten_features(encoder(x, t))


def check_encoder_forward(fn: Callable) -> Callable:
    """Exercise 9.4: ``encoder_forward(encoder, x, t)`` runs the package's EncoderUNetModelWT layer by layer
    (time_embed, conv_in, input_blocks, middle_block, capture, fea_tran) and returns ``{str(h): (B,
    out_channels, h, w)}``, largest resolution first. Returns the function to use (it takes the encoder, x and
    t). Lesson: 09_stablesr."""
    cases = []
    with _learners_rng_kept():
        for seed, (mult, n_res, attn, size, B) in ((96, ((1, 2, 2), 1, (4,), 16, 2)),
                                                   (97, ((1, 2), 2, (1, 2), 8, 3)),
                                                   (98, ((1, 1, 2, 2), 1, (8,), 16, 1))):
            config = TimeAwareEncoderConfig(image_size=size, in_channels=3, model_channels=8, out_channels=12,
                                            channel_mult=mult, num_res_blocks=n_res, attention_resolutions=attn,
                                            num_heads=2, norm_groups=4)
            with _seeded(seed):
                encoder = _randomise(EncoderUNetModelWT(config), seed).eval()
            g = _gen(seed)
            x, t = torch.randn(B, 3, size, size, generator=g), torch.randint(0, 1000, (B,), generator=g)
            cases.append(Case({"encoder": encoder, "x": x, "t": t},
                              f"channel_mult {mult}, {n_res} block(s) per level, attention at ds {attn}, {size}x{size}"))

        def learner(encoder: EncoderUNetModelWT, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return _flatten_features(fn(encoder, x, t))

        def with_t(t_of: Callable) -> Callable:
            def wrong(encoder: EncoderUNetModelWT, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return _flatten_features(encoder(x, t_of(t)))
            return wrong

        used = _run_diagnosed(
            "9.4 (the time-aware encoder's forward pass)", learner, ref_encoder_forward, cases,
            "emb = encoder.time_embed(t); h = encoder.conv_in(x); path = [h]; for each block of encoder.input_blocks: "
            "h = block(h, emb) and append it; append encoder.middle_block(h, emb); captured = capture_scales(path); "
            "check_fea_tran(encoder.fea_tran, captured); return {str(f.shape[-2]): tran(f, emb)} over "
            "zip(captured, encoder.fea_tran). Every block takes the same time embedding.",
            [("the encoder is not told the time step (t = 0 everywhere)", with_t(torch.zeros_like))],
            nudge="follow the encoder's modules in the order the diagram lists them, feeding every block the same "
                  "time embedding; capture and check with your two functions, and key the result by the heights "
                  "of the captured maps, as strings, largest first.",
            rtol=1e-5, atol=1e-6)
    return fn if used is learner else (lambda encoder, x, t: encoder(x, t))


# -- Exercise 9.5: ILVR's swap of low frequencies ----------------------------------------------------------------

def ref_ilvr_swap(x: torch.Tensor, c_lr: torch.Tensor, t: int, levels: int, diffusion: GaussianDiffusion,
                  noise: torch.Tensor) -> torch.Tensor:
    """:func:`~diffusion_course.stablesr.ilvr_swap`: the high band of ``x`` plus the low band of y_t ~ q(y_t |
    c_LR) drawn with ``noise`` (at ``t = -1``, c_LR itself). Lesson: 09_stablesr."""
    return ilvr_swap(x, c_lr, t, levels, diffusion, noise if t >= 0 else None)


def check_ilvr_swap(fn: Callable) -> Callable:
    """Exercise 9.5: ``ilvr_swap(x, c_lr, t, levels, diffusion, noise)`` keeps the high band of the state ``x`` and
    takes the low band of ``c_lr`` noised to step ``t`` with ``noise`` (of ``c_lr`` itself at ``t = -1``, the
    end of sampling). Returns the function to use. Lesson: 09_stablesr."""
    diffusion = GaussianDiffusion("linear", 1000)
    cases = []
    for seed, (t, levels, B) in ((99, (600, 2, 2)), (100, (50, 1, 1)), (101, (0, 3, 2)), (102, (-1, 2, 2))):
        g = _gen(seed)
        x, c_lr, noise = (torch.randn(B, 3, 16, 16, generator=g) for _ in range(3))
        cases.append(Case({"x": x, "c_lr": c_lr, "t": t, "levels": levels, "diffusion": diffusion, "noise": noise},
                          f"{B} random 3x16x16 states, t = {t}{' (the end: x_0)' if t < 0 else ''}, {levels} levels"))

    def swap(high_of: Callable, low_of: Callable) -> Callable:
        return lambda x, c_lr, t, levels, diffusion, noise: (wavelet_split(high_of(x, c_lr, t, diffusion, noise),
                                                                             levels)[0]
                                                              + wavelet_split(low_of(x, c_lr, t, diffusion, noise),
                                                                              levels)[1])

    def y_of(x: torch.Tensor, c_lr: torch.Tensor, t: int, diffusion: GaussianDiffusion,
             noise: torch.Tensor) -> torch.Tensor:
        return c_lr if t < 0 else diffusion.q_sample(c_lr, t, noise)

    def unscaled(x: torch.Tensor, c_lr: torch.Tensor, t: int, diffusion: GaussianDiffusion,
                 noise: torch.Tensor) -> torch.Tensor:
        return c_lr if t < 0 else c_lr + float(1 - diffusion.alpha_bar[t]) ** 0.5 * noise

    def noised_at_the_end(x: torch.Tensor, c_lr: torch.Tensor, t: int, diffusion: GaussianDiffusion,
                          noise: torch.Tensor) -> torch.Tensor:
        return diffusion.q_sample(c_lr, t % diffusion.T, noise)

    state = lambda x, c_lr, t, diffusion, noise: x  # noqa: E731
    with _learners_rng_kept():
        used = _run_diagnosed(
            "9.5 (the ILVR swap)", fn, ref_ilvr_swap, cases,
            "y = c_lr if t < 0 else diffusion.q_sample(c_lr, t, noise); high, _ = stablesr.wavelet_split(x, levels); "
            "_, low = stablesr.wavelet_split(y, levels); return high + low.",
            [("the bands are swapped (the state's low band and the LR image's high band are kept)",
              swap(y_of, state)),
             ("the LR image goes in unnoised at every step, instead of noised to the step the state is at",
              swap(state, lambda x, c_lr, t, diffusion, noise: c_lr)),
             ("the noise is added without scaling the LR image by sqrt(alpha_bar_t)", swap(state, unscaled)),
             ("at the end (t = -1) the LR image is noised too: alpha_bar[-1] is the last, noisiest level, while t = -1 "
              "means x_0 itself", swap(state, noised_at_the_end)),
             ("the whole state is replaced by y, the model's detail (its high band) with it",
              lambda x, c_lr, t, levels, diffusion, noise: y_of(x, c_lr, t, diffusion, noise))],
            nudge="the state keeps what the model drew finer than the LR pixels (its high band) and takes its coarse "
                  "content from the LR image brought to the same noise level as the state; at the very end that "
                  "level is zero.",
            rtol=1e-5, atol=1e-6)
    return fn if used is fn else ref_ilvr_swap


__all__ = ["check_sft_layer", "ref_sft_layer", "check_capture_scales", "ref_capture_scales_indices",
           "check_fea_tran_length", "ref_fea_tran_verdict", "check_encoder_forward", "ref_encoder_forward",
           "check_ilvr_swap", "ref_ilvr_swap"]
