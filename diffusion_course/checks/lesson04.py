"""Checkers of lesson 04_unet: the U-Net."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._runner import Case, ExerciseFailed, _gen, _no_grad, _seeded, fail, register_hint, run_check


def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding, cosines first, frequencies exp(-ln(10000) k / half). Lesson: 04_unet."""
    from ..nn import timestep_embedding

    return timestep_embedding(t, dim)


def check_timestep_embedding(fn: Callable) -> Callable:
    """Exercise 4.1: the sinusoidal time-step embedding. Lesson: 04_unet."""
    cases = []
    for seed, n, dim in ((29, 5, 16), (30, 3, 64), (31, 4, 7)):
        g = _gen(seed)
        cases.append(Case({"t": torch.randint(0, 1000, (n,), generator=g), "dim": dim}, f"{n} steps, dim {dim}"))
    return run_check("4.1", fn, ref_timestep_embedding, cases,
                     "half = dim // 2; freqs = torch.exp(-math.log(10000) * torch.arange(half) / half); "
                     "args = t.float()[:, None] * freqs[None]; cat([cos(args), sin(args)], dim=1), cosines first, "
                     "and one zero column when dim is odd.", rtol=1e-4, atol=1e-4,
                     nudge="Compare the order of the two halves (cosines first), the frequency denominator and "
                           "what happens to an odd dim with the formula above the exercise.")


# -- the networks the learner writes: built, loaded with the package's weights, compared -------------------

class _Pair:
    """A reference module and the learner's, loaded with the same weights; calling it runs one of them."""

    def __init__(self, reference: torch.nn.Module, learner: torch.nn.Module) -> None:
        self.reference, self.learner = reference, learner

    def __call__(self, *args, **kwargs):  # makes the runner describe it as "a model"
        return self.reference(*args, **kwargs)


def _built(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``build()`` under a fixed seed of the CPU generator, the learner's random state (every device's) left alone."""
    with _seeded(seed):
        return build()


def _unzero(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every zero-initialised weight (second convolutions, attention outputs, the final convolution)
    small random values, so that every path of the network counts in the comparison."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _build_learner(exercise: str, cls: Callable, kwargs: Dict[str, Any], label: str, nudge: str,
                   hint: str) -> Optional[torch.nn.Module]:
    """The learner's module built with ``kwargs`` (None while its constructor is still a stub)."""
    try:
        return _built(lambda: cls(**kwargs), 0)
    except NotImplementedError:
        return None
    except Exception as e:  # a crash in the learner's __init__: say where, keep the traceback
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        try:
            fail(exercise, f"building {getattr(cls, '__name__', 'your class')}({args}) raised {type(e).__name__}: "
                 f"{e}", f"the case {label}", nudge=nudge, hint=hint)
        except ExerciseFailed as failure:
            raise failure from e


def _same_layers(exercise: str, mine: torch.nn.Module, ref: torch.nn.Module, label: str, nudge: str, hint: str,
                 start_at_zero: Sequence[str] = ()) -> None:
    """The learner's module has exactly the reference's parameter names and shapes, and the layers named in
    ``start_at_zero`` start at zero; then it is loaded with the reference's weights."""
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        fail(exercise, "its layers are not named like the package's, so the package's weights cannot be loaded "
             f"into it: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
             f"{extra[:6]}{' ...' if len(extra) > 6 else ''}", f"the case {label}", nudge=nudge, hint=hint)
    wrong = [f"{k}: {got[k]} instead of {want[k]}" for k in want if got[k] != want[k]]
    if wrong:
        fail(exercise, f"some layers have the wrong shape: {'; '.join(wrong[:4])}", f"the case {label}", nudge=nudge,
             hint=hint)
    mine_state = mine.state_dict()
    for name in start_at_zero:
        if mine_state[name].any():
            fail(exercise, f"{name} does not start at zero, so the block does not start as its skip path",
                 f"the case {label}", nudge=nudge, hint=hint)
    mine.load_state_dict(ref.state_dict())
    mine.eval()


def _compare_modules(exercise: str, pairs: Sequence[Tuple[_Pair, Dict[str, Any], str]], call: Callable,
                     nudge: str, hint: str, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Run both modules of every pair on their inputs; True when the learner's agree (False for a stub)."""
    cases = [Case({"pair": pair, **inputs}, label) for pair, inputs, label in pairs]
    reference = lambda pair, **kw: _no_grad(lambda: call(pair.reference, **kw))  # noqa: E731
    learner = lambda pair, **kw: _no_grad(lambda: call(pair.learner, **kw))  # noqa: E731
    return run_check(exercise, learner, reference, cases, hint, rtol=rtol, atol=atol, nudge=nudge) is learner


def _class_check(exercise: str, specs: Sequence[Tuple[Callable, type, Sequence[Tuple[Dict[str, Any], str]], Callable]],
                 call: Callable, nudge: str, hint: str,
                 start_at_zero: Callable[[torch.nn.Module], Sequence[str]] = lambda m: ()) -> List[type]:
    """The learner's classes against the package's: each ``(learner class, package class, builds, inputs)`` of
    ``specs`` is built with every keyword set of ``builds``, must have the same parameter names and shapes (and
    zero starts), is loaded with the package's weights and must give the same outputs on ``inputs(kwargs,
    seed)``. Returns the learner's classes when they are right, the package's while any is a stub."""
    register_hint(exercise, hint, nudge)  # show_hint knows it even while the exercise is a stub
    fallback = [package_cls for _, package_cls, _, _ in specs]
    with _seeded(0):  # the learner's random state (every device's) is the same afterwards
        pairs = []
        for cls, package_cls, builds, inputs in specs:
            for kwargs, label in builds:
                k = len(pairs)
                mine = _build_learner(exercise, cls, kwargs, label, nudge, hint)
                if mine is None:
                    print(f"… Exercise {exercise}: not implemented yet. The lesson carries on with the package's "
                          f"{', '.join(c.__name__ for c in fallback)}; come back to it when you are ready.")
                    return fallback
                ref = _unzero(_built(lambda: package_cls(**kwargs), 100 + k), 200 + k)
                _same_layers(exercise, mine, ref, label, nudge, hint, start_at_zero(mine))
                pairs.append((_Pair(ref, mine), inputs(kwargs, 300 + k), label))
        if not _compare_modules(exercise, pairs, call, nudge, hint):
            return fallback
    return [cls for cls, _, _, _ in specs]


def check_residual_block(cls: type) -> type:
    """Exercise 4.2: the ResidualBlock class, ``cls(in_channels, out_channels, emb_channels, dropout=0.0,
    norm_groups=32)`` with ``forward(x, emb)``, against :class:`~diffusion_course.nn.ResidualBlock`: the same
    layer names, ``conv2`` starting at zero, the same outputs once loaded with the package's weights.
    Returns the class the lesson builds its U-Net from. Lesson: 04_unet."""
    from ..nn import ResidualBlock

    builds = [(dict(in_channels=8, out_channels=8, emb_channels=12, dropout=0.0, norm_groups=4), "8 -> 8 channels"),
              (dict(in_channels=8, out_channels=16, emb_channels=12, dropout=0.0, norm_groups=4),
               "8 -> 16 channels, a 1x1 convolution on the skip path")]

    def inputs(kw, seed):
        g = _gen(seed)
        return {"x": torch.randn(3, kw["in_channels"], 5, 6, generator=g),
                "emb": torch.randn(3, kw["emb_channels"], generator=g)}

    return _class_check(
        "4.2", [(cls, ResidualBlock, builds, inputs)], lambda m, x, emb: m(x, emb),
        nudge="Follow the block's equation in the markdown above line by line: where is the time vector added, "
              "which layers start at zero, and what does the skip path do when the channel count changes?",
        hint="__init__: self.norm1 = group_norm(in_channels, norm_groups); self.conv1 = nn.Conv2d(in_channels, "
             "out_channels, 3, padding=1); self.emb_proj = nn.Linear(emb_channels, out_channels); self.norm2 = "
             "group_norm(out_channels, norm_groups); self.dropout = nn.Dropout(dropout); self.conv2 = zero_module("
             "nn.Conv2d(out_channels, out_channels, 3, padding=1)); self.skip = nn.Identity() if in_channels == "
             "out_channels else nn.Conv2d(in_channels, out_channels, 1). forward: h = self.conv1(F.silu(self.norm1("
             "x))); h = h + self.emb_proj(F.silu(emb))[:, :, None, None]; h = self.conv2(self.dropout(F.silu("
             "self.norm2(h)))); return self.skip(x) + h.",
        start_at_zero=lambda m: [k for k in ("conv2.weight", "conv2.bias") if k in m.state_dict()])[0]


def check_attention_block(cls: type) -> type:
    """Exercise 4.3: the AttentionBlock class, ``cls(channels, num_heads=4, norm_groups=32)`` with
    ``forward(x)``, against :class:`~diffusion_course.nn.AttentionBlock` (self-attention over the H*W
    positions, added to the input). Returns the class the lesson uses. Lesson: 04_unet."""
    from ..nn import AttentionBlock

    builds = [(dict(channels=8, num_heads=2, norm_groups=4), "8 channels, 2 heads, a 4x4 map"),
              (dict(channels=16, num_heads=4, norm_groups=4), "16 channels, 4 heads, a 3x5 map")]
    sizes = {8: (4, 4), 16: (3, 5)}

    def inputs(kw, seed):
        return {"x": torch.randn(2, kw["channels"], *sizes[kw["channels"]], generator=_gen(seed))}

    return _class_check(
        "4.3", [(cls, AttentionBlock, builds, inputs)], lambda m, x: m(x),
        nudge="Check how the (B, C, H, W) map becomes H*W tokens of C channels and back, how each head gets its own "
              "slice of the channels, and what the softmax is taken over.",
        hint="tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2); q, k, v = self.self_attn.to_q(tokens), "
             "...to_k(tokens), ...to_v(tokens); split heads with .reshape(B, H * W, heads, C // heads).transpose(1, 2);"
             " w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // heads), dim=-1); out = (w @ v).transpose(1, "
             "2).reshape(B, H * W, C); return x + self.self_attn.to_out(out).transpose(1, 2).reshape(B, C, H, W).")[0]


def check_down_up_blocks(down_cls: type, up_cls: type) -> Tuple[type, type]:
    """Exercise 4.4: the DownBlock and UpBlock classes, ``cls(in_channels, out_channels, emb_channels,
    attention, num_heads=4, dropout=0.0, norm_groups=32)``, ``down(x, emb)`` and ``up(x, emb, skip=...)``,
    against the package's. Returns the two classes the U-Net is built from. Lesson: 04_unet."""
    from ..nn import DownBlock, UpBlock

    nudge = ("A DownBlock is a residual block followed, only where attention is asked for, by an attention block; "
             "an UpBlock does the same to its input concatenated with the skip connection (in which order?).")
    hint = ("__init__: self.res = ResBlock(in_channels, out_channels, emb_channels=emb_channels, dropout=dropout, "
            "norm_groups=norm_groups); self.attn = AttnBlock(out_channels, num_heads=num_heads, norm_groups="
            "norm_groups) if attention else None. forward: h = self.res(x, emb); return self.attn(h) if self.attn is "
            "not None else h. UpBlock.forward(x, emb, skip): return super().forward(torch.cat([x, skip], dim=1), emb).")
    common = dict(emb_channels=12, num_heads=2, dropout=0.0, norm_groups=4)
    down_builds = [(dict(in_channels=8, out_channels=16, attention=True, **common), "8 -> 16, with attention"),
                   (dict(in_channels=16, out_channels=16, attention=False, **common), "16 -> 16, no attention")]
    up_builds = [(dict(in_channels=16 + 8, out_channels=8, attention=True, **common),
                  "16 + 8 skip channels -> 8, with attention"),
                 (dict(in_channels=8 + 8, out_channels=8, attention=False, **common), "8 + 8 -> 8, no attention")]

    def down_inputs(kw, seed):
        g = _gen(seed)
        return {"x": torch.randn(2, kw["in_channels"], 4, 4, generator=g), "emb": torch.randn(2, 12, generator=g)}

    def up_inputs(kw, seed):  # the decoder's features and an encoder skip of 8 channels
        g = _gen(seed)
        return {"x": torch.randn(2, kw["in_channels"] - 8, 4, 4, generator=g), "emb": torch.randn(2, 12, generator=g),
                "skip": torch.randn(2, 8, 4, 4, generator=g)}

    def call(m, x, emb, skip=None):
        return m(x, emb) if skip is None else m(x, emb, skip=skip)

    down, up = _class_check("4.4", [(down_cls, DownBlock, down_builds, down_inputs),
                                    (up_cls, UpBlock, up_builds, up_inputs)], call, nudge, hint)
    return down, up


def ref_up_block_in_channels(model_channels: int, channel_mult: Tuple[int, ...], num_res_blocks: int) -> torch.Tensor:
    """The input channels of every UpBlock of the U-Net, in the order the decoder runs them, as a long
    tensor (previous feature map + skip connection). Lesson: 04_unet."""
    from ..nn import UNet, UNetConfig, UpBlock

    cfg = UNetConfig(image_size=2 ** (len(channel_mult) + 1), model_channels=model_channels,
                     channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_resolutions=(),
                     norm_groups=1)
    with _seeded(0):  # building the U-Net draws its weights: leave the caller's random state alone
        unet = UNet(cfg)
    return torch.tensor([b.res.in_channels for b in unet.up if isinstance(b, UpBlock)])


def check_up_block_in_channels(fn: Callable) -> Callable:
    """Exercise 4.5: the skip wiring, as the UpBlocks' input channels. Lesson: 04_unet."""
    cases = [Case({"model_channels": mc, "channel_mult": mult, "num_res_blocks": n}, f"{mc}, {mult}, {n} blocks")
             for mc, mult, n in ((32, (1, 2, 2), 2), (16, (1, 2, 4, 8), 1), (8, (1,), 3), (64, (1, 1, 2), 2))]
    wrapped = lambda **kw: torch.as_tensor(fn(**kw))  # noqa: E731
    used = run_check("4.5", wrapped, ref_up_block_in_channels, cases,
                     "list the skip channels as the encoder pushes them (conv_in, each DownBlock, each "
                     "Downsample); the decoder pops them from the end, num_res_blocks + 1 per level, deepest level "
                     "first, and each UpBlock's input is the current channels plus the popped skip's.",
                     nudge="List what the encoder pushes, in order, and remember that the decoder pops from the end; "
                           "then ask what the decoder's own width is just before each UpBlock.")
    return fn if used is wrapped else used


def check_unet(cls: type) -> type:
    """Exercise 4.6: the U-Net's forward pass. ``cls(config)`` is the lesson's U-Net class (built from the
    learner's blocks) with ``forward(x (B, C, H, W), t (B,)) -> (B, C, H, W)``; for two configurations it must
    have the package's parameter names and, loaded with the weights of :class:`~diffusion_course.nn.UNet`, give
    its outputs. Returns the class the lesson trains. Lesson: 04_unet."""
    from ..nn import UNet, UNetConfig

    configs = [(UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(2,), num_heads=2, norm_groups=4), "two levels, attention at 4x4"),
               (UNetConfig(image_size=8, in_channels=3, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=2,
                           attention_resolutions=(1, 4), num_heads=2, norm_groups=4),
                "three levels, two blocks each, attention at 8x8 and 2x2")]

    def inputs(kw, seed):
        g, c = _gen(seed), kw["config"]
        return {"x": torch.randn(3, c.in_channels, c.image_size, c.image_size, generator=g),
                "t": torch.randint(0, 1000, (3,), generator=g)}

    return _class_check(
        "4.6", [(cls, UNet, [(dict(config=c), label) for c, label in configs], inputs)], lambda m, x, t: m(x, t),
        nudge="Walk the data through the U-Net as the layout in section 5 draws it: which outputs are kept as skips, "
              "which blocks need the time embedding, and in which order the decoder takes the skips back.",
        hint="emb = self.time_embed.mlp(my_timestep_embedding(t, self.config.model_channels)) (or self.time_embed(t), "
             "the package's embedding and the same MLP); h = self.conv_in(x); skips = [h]; for block in self.down: h = block(h) if "
             "isinstance(block, Downsample) else block(h, emb); skips.append(h). Middle: h = self.mid_res1(h, emb); "
             "h = self.mid_attn(h); h = self.mid_res2(h, emb). for block in self.up: h = block(h) if isinstance(block, "
             "Upsample) else block(h, emb, skip=skips.pop()). return self.out(h).")[0]


# (exercise, checker, reference) of this lesson's one-function checkers, for tests/test_checks.py; the class
# checkers (4.2, 4.3, 4.4, 4.6) are tested in tests/test_checks_lesson04.py
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("4.1", check_timestep_embedding, ref_timestep_embedding),
    ("4.5", check_up_block_in_channels, ref_up_block_in_channels),
]
