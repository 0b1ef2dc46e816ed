"""The class checkers of lesson 04 (4.2 ResidualBlock, 4.3 AttentionBlock, 4.4 DownBlock/UpBlock, 4.6 the U-Net's
forward pass): each accepts a correct class, hands back the package's class for a stub, rejects plausible mistakes
with a message naming the exercise, and leaves the learner's random state alone; and the Trainer trains a U-Net
class of the learner's."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion_course import checks
from diffusion_course.checks import ExerciseFailed
from diffusion_course.nn import (AttentionBlock, DownBlock, Downsample, MultiHeadAttention, ResidualBlock,
                                 TimeEmbedding, UNet, UNetConfig, UpBlock, Upsample)
from diffusion_course.nn.layers import group_norm, zero_module
from diffusion_course.training import TrainConfig, Trainer


pytestmark = pytest.mark.usefixtures("full_hints")


# -- a learner's correct classes, and variants with one mistake each ----------------------------------------------

def make_residual(time_after_norm=False, zero_conv2=True, skip=True, names=True):
    class Res(nn.Module):
        def __init__(self, in_channels, out_channels, emb_channels, dropout=0.0, norm_groups=32):
            super().__init__()
            self.norm1 = group_norm(in_channels, norm_groups)
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            proj = nn.Linear(emb_channels, out_channels)
            if names:
                self.emb_proj = proj
            else:
                self.time_proj = proj
            self.norm2 = group_norm(out_channels, norm_groups)
            self.dropout = nn.Dropout(dropout)
            conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
            self.conv2 = zero_module(conv2) if zero_conv2 else conv2
            self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

        def forward(self, x, emb):
            e = (self.emb_proj if names else self.time_proj)(F.silu(emb))[:, :, None, None]
            h = self.conv1(F.silu(self.norm1(x)))
            h = self.norm2(h) + e if time_after_norm else self.norm2(h + e)
            h = self.conv2(self.dropout(F.silu(h)))
            return self.skip(x) + h if skip else h
    return Res


def make_attention(scale=True, softmax_dim=-1, residual=True):
    class Attn(nn.Module):
        def __init__(self, channels, num_heads=4, norm_groups=32):
            super().__init__()
            self.num_heads = num_heads
            self.norm = group_norm(channels, norm_groups)
            self.self_attn = MultiHeadAttention(channels, num_heads)

        def forward(self, x):
            B, C, H, W = x.shape
            heads, d = self.num_heads, C // self.num_heads
            tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2)
            split = lambda y: y.reshape(B, H * W, heads, d).transpose(1, 2)  # noqa: E731
            q, k, v = (split(f(tokens)) for f in (self.self_attn.to_q, self.self_attn.to_k, self.self_attn.to_v))
            w = torch.softmax(q @ k.transpose(-2, -1) / (math.sqrt(d) if scale else 1.0), dim=softmax_dim)
            out = self.self_attn.to_out((w @ v).transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2)
            return (x if residual else 0) + out.reshape(B, C, H, W)
    return Attn


def make_blocks(res_cls=ResidualBlock, attn_cls=AttentionBlock, skip_first=False):
    class Down(nn.Module):
        def __init__(self, in_channels, out_channels, emb_channels, attention, num_heads=4, dropout=0.0,
                     norm_groups=32):
            super().__init__()
            self.res = res_cls(in_channels, out_channels, emb_channels=emb_channels, dropout=dropout,
                               norm_groups=norm_groups)
            self.attn = attn_cls(out_channels, num_heads=num_heads, norm_groups=norm_groups) if attention else None

        def forward(self, x, emb):
            h = self.res(x, emb)
            return self.attn(h) if self.attn is not None else h

    class Up(Down):
        def forward(self, x, emb, skip):
            return super().forward(torch.cat([skip, x] if skip_first else [x, skip], dim=1), emb)
    return Down, Up


def make_unet(down_cls=DownBlock, up_cls=UpBlock, mistake=None):
    class Net(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = c = config
            mc = c.model_channels
            emb = 4 * mc
            kw = dict(emb_channels=emb, num_heads=c.num_heads, dropout=c.dropout, norm_groups=c.norm_groups)
            self.time_embed = TimeEmbedding(mc, emb)
            self.conv_in = nn.Conv2d(c.in_channels, mc, 3, padding=1)
            self.down, ch, ds = nn.ModuleList(), mc, 1
            for level, mult in enumerate(c.channel_mult):
                for _ in range(c.num_res_blocks):
                    self.down.append(down_cls(ch, mult * mc, attention=ds in c.attention_resolutions, **kw))
                    ch = mult * mc
                if level < len(c.channel_mult) - 1:
                    self.down.append(Downsample(ch))
                    ds *= 2
            self.mid_res1 = ResidualBlock(ch, ch, emb, norm_groups=c.norm_groups)
            self.mid_attn = AttentionBlock(ch, c.num_heads, c.norm_groups)
            self.mid_res2 = ResidualBlock(ch, ch, emb, norm_groups=c.norm_groups)
            widths = iter(checks.ref_up_block_in_channels(mc, c.channel_mult, c.num_res_blocks).tolist())
            self.up = nn.ModuleList()
            for level, mult in reversed(list(enumerate(c.channel_mult))):
                for _ in range(c.num_res_blocks + 1):
                    self.up.append(up_cls(next(widths), mult * mc, attention=ds in c.attention_resolutions, **kw))
                if level:
                    self.up.append(Upsample(mult * mc))
                    ds //= 2
            ch = c.channel_mult[0] * mc
            self.out = nn.Sequential(group_norm(ch, c.norm_groups), nn.SiLU(),
                                     zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1)))

        def forward(self, x, t):
            emb = self.time_embed(t if mistake != "lecture t" else t + 1)
            h = self.conv_in(x)
            skips = [h]
            for block in self.down:
                h = block(h) if isinstance(block, Downsample) else block(h, emb)
                skips.append(h)
            h = self.mid_res1(h, emb)
            if mistake != "no middle attention":
                h = self.mid_attn(h)
            h = self.mid_res2(h, emb)
            for block in self.up:
                if isinstance(block, Upsample):
                    h = block(h)
                else:
                    h = block(h, emb, skip=skips.pop(0) if mistake == "skips in encoder order" else skips.pop())
            return self.out(h)
    return Net


class Stub(nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("Exercise 4.x: write me")


class ForwardStub(make_unet()):
    def forward(self, x, t):
        raise NotImplementedError("Exercise 4.6")


# -- the checkers ---------------------------------------------------------------------------------------------------

def test_residual_block_checker(capsys):
    good = make_residual()
    assert checks.check_residual_block(good) is good
    assert "Exercise 4.2: correct" in capsys.readouterr().out
    assert checks.check_residual_block(Stub) is ResidualBlock
    assert "not implemented yet" in capsys.readouterr().out
    for wrong, why in ((make_residual(time_after_norm=True), "values differ"), (make_residual(skip=False), "values differ"),
                       (make_residual(zero_conv2=False), "does not start at zero"),
                       (make_residual(names=False), "not named like the package's")):
        with pytest.raises(ExerciseFailed, match=f"(?s)Exercise 4.2: .*{why}.*Hint: "):
            checks.check_residual_block(wrong)


def test_attention_block_checker(capsys):
    good = make_attention()
    assert checks.check_attention_block(good) is good
    assert "Exercise 4.3: correct" in capsys.readouterr().out
    assert checks.check_attention_block(Stub) is AttentionBlock
    for wrong in (make_attention(scale=False), make_attention(softmax_dim=-2), make_attention(residual=False)):
        with pytest.raises(ExerciseFailed, match="(?s)Exercise 4.3: values differ.*Hint: "):
            checks.check_attention_block(wrong)


def test_down_up_checker_uses_the_learners_blocks(capsys):
    down, up = make_blocks(make_residual(), make_attention())
    assert checks.check_down_up_blocks(down, up) == (down, up)
    assert "Exercise 4.4: correct" in capsys.readouterr().out
    assert checks.check_down_up_blocks(Stub, up) == (DownBlock, UpBlock)
    assert "not implemented yet" in capsys.readouterr().out
    down, up = make_blocks(skip_first=True)
    with pytest.raises(ExerciseFailed, match="(?s)Exercise 4.4: values differ.*skip"):
        checks.check_down_up_blocks(down, up)


def test_unet_checker(capsys):
    down, up = make_blocks(make_residual(), make_attention())
    good = make_unet(down, up)
    assert checks.check_unet(good) is good
    assert "Exercise 4.6: correct" in capsys.readouterr().out
    assert checks.check_unet(ForwardStub) is UNet
    assert "not implemented yet" in capsys.readouterr().out
    for mistake in ("lecture t", "no middle attention", "skips in encoder order"):
        with pytest.raises(ExerciseFailed, match="(?s)Exercise 4.6: .*Hint: "):
            checks.check_unet(make_unet(mistake=mistake))


def test_first_failure_gives_a_nudge_only():
    checks.reset_hints()
    with pytest.raises(ExerciseFailed) as first:
        checks.check_residual_block(make_residual(time_after_norm=True))
    assert "Nudge:" in str(first.value) and "Hint:" not in str(first.value)
    with pytest.raises(ExerciseFailed, match="Hint: "):
        checks.check_residual_block(make_residual(time_after_norm=True))


@pytest.mark.parametrize("check, args", [(checks.check_residual_block, (make_residual(),)),
                                         (checks.check_attention_block, (make_attention(),)),
                                         (checks.check_down_up_blocks, make_blocks()),
                                         (checks.check_unet, (make_unet(),))])
def test_class_checkers_leave_the_random_state_alone(check, args, capsys):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    check(*args)
    assert torch.equal(torch.get_rng_state(), state)


def test_trainer_trains_the_learners_unet_class():
    cfg = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_heads=2, norm_groups=4)
    cls = make_unet(*make_blocks(make_residual(), make_attention()))
    tcfg = TrainConfig(dataset="digits", image_size=8, batch_size=8, steps=2, T=50, seed=0, sample_every=0,
                       checkpoint_every=0, out=None, progress=False)
    mine, package = Trainer(tcfg, cfg, unet_class=cls), Trainer(tcfg, cfg)
    assert type(mine.model) is cls and type(mine.ema) is cls and type(package.model) is UNet
    assert mine.train() == pytest.approx(package.train(), rel=1e-4, abs=1e-6)   # same seed, same network: same losses
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.allclose(mine.model(x, t), package.model(x, t), atol=1e-5)
