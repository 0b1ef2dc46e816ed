"""Checkers of lesson 04_unet: the U-Net."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from ._runner import Case, _gen, _no_grad, run_check


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
                     "and one zero column when dim is odd.", rtol=1e-4, atol=1e-4)


def _random_residual_block(seed: int, in_ch: int, out_ch: int, emb: int):
    from ..nn import ResidualBlock

    with torch.random.fork_rng(devices=[]):  # seeded weights; the learner's random state is left alone
        torch.manual_seed(seed)
        block = ResidualBlock(in_ch, out_ch, emb_channels=emb, norm_groups=4).eval()
        torch.nn.init.normal_(block.conv2.weight, std=0.05)  # undo the zero init so that every path counts
    return block


def ref_residual_forward(block: torch.nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The forward pass of a :class:`~diffusion_course.nn.ResidualBlock` (DDPM's additive time injection).

    Lesson: 04_unet.
    """
    with torch.no_grad():
        return block(x, emb)


def check_residual_forward(fn: Callable) -> Callable:
    """Exercise 4.2: the residual block's forward pass from its layers. Lesson: 04_unet."""
    cases = []
    for seed, in_ch, out_ch in ((32, 8, 8), (33, 8, 16)):
        g = _gen(seed)
        cases.append(Case({"block": _random_residual_block(seed, in_ch, out_ch, 12),
                           "x": torch.randn(3, in_ch, 5, 5, generator=g), "emb": torch.randn(3, 12, generator=g)},
                          f"{in_ch} -> {out_ch} channels"))
    wrapped = lambda block, x, emb: _no_grad(fn, block, x, emb)  # noqa: E731
    used = run_check("4.2", wrapped, ref_residual_forward, cases,
                     "h = block.conv1(F.silu(block.norm1(x))); add block.emb_proj(F.silu(emb))[:, :, None, None]; "
                     "then block.norm2, F.silu, block.dropout, block.conv2; return block.skip(x) + h. The time "
                     "vector is added after the first convolution and before the second normalisation.",
                     rtol=1e-4, atol=1e-5)
    return fn if used is wrapped else used


def ref_up_block_in_channels(model_channels: int, channel_mult: Tuple[int, ...], num_res_blocks: int) -> torch.Tensor:
    """The input channels of every UpBlock of the U-Net, in the order the decoder runs them, as a long
    tensor (previous feature map + skip connection). Lesson: 04_unet."""
    from ..nn import UNet, UNetConfig, UpBlock

    cfg = UNetConfig(image_size=2 ** (len(channel_mult) + 1), model_channels=model_channels,
                     channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_resolutions=(),
                     norm_groups=1)
    return torch.tensor([b.res.in_channels for b in UNet(cfg).up if isinstance(b, UpBlock)])


def check_up_block_in_channels(fn: Callable) -> Callable:
    """Exercise 4.3: the skip wiring, as the UpBlocks' input channels. Lesson: 04_unet."""
    cases = [Case({"model_channels": mc, "channel_mult": mult, "num_res_blocks": n}, f"{mc}, {mult}, {n} blocks")
             for mc, mult, n in ((32, (1, 2, 2), 2), (16, (1, 2, 4, 8), 1), (8, (1,), 3), (64, (1, 1, 2), 2))]
    wrapped = lambda **kw: torch.as_tensor(fn(**kw))  # noqa: E731
    used = run_check("4.3", wrapped, ref_up_block_in_channels, cases,
                     "list the skip channels as the encoder pushes them (conv_in, each DownBlock, each "
                     "Downsample); the decoder pops them from the end, num_res_blocks + 1 per level, deepest level "
                     "first, and each UpBlock's input is the current channels plus the popped skip's.")
    return fn if used is wrapped else used


# (exercise, checker, reference) of this lesson, for the tests
CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("4.1", check_timestep_embedding, ref_timestep_embedding),
    ("4.2", check_residual_forward, ref_residual_forward),
    ("4.3", check_up_block_in_channels, ref_up_block_in_channels),
]
