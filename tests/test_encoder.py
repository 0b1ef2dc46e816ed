"""The time-aware encoder of StableSR (lesson 09_stablesr): scales and shapes, the capture rule, the fea_tran
check, time conditioning, gradients, half precision and the configuration."""
import copy
import json

import pytest
import torch
from torch import nn

from diffusion_course.nn import (AttentionBlock, Downsample, EncoderUNetModelWT, ResidualBlock, TimeAwareEncoderConfig,
                                 TimeEmbedding, TimestepEmbedSequential, capture_scales, check_fea_tran)

# fp16 vs fp32 on this CPU, with unzeroed weights: max |difference| / max |fp32 output| measured at 0.8e-3 to
# 1.7e-3 per scale over five seeds; the bound below leaves a margin of about 6.
FP16_REL_TOL = 1e-2


def unzero(net):
    """Give every zero-initialised layer random weights, so that every path (time included) shows in the output."""
    for p in net.parameters():
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return net


def small(**kw):
    base = dict(image_size=16, in_channels=3, model_channels=16, out_channels=16, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(2,), num_heads=2, norm_groups=8)
    base.update(kw)
    return TimeAwareEncoderConfig(**base)


def path_modules(enc):
    """The converted part: conv_in, input_blocks, middle_block."""
    return [enc.conv_in, enc.input_blocks, enc.middle_block]


@pytest.mark.parametrize("cfg, size, keys", [
    (TimeAwareEncoderConfig(), 32, ["32", "16", "8"]),
    (small(), 16, ["16", "8"]),
    (small(), 24, ["24", "12"]),  # another size than config.image_size, still a multiple of 2
    (small(channel_mult=(1, 1, 2, 2), attention_resolutions=(4, 8), model_channels=8, norm_groups=4,
           out_channels=8, image_size=32), 32,
     ["32", "16", "8", "4"]),
    (small(channel_mult=(2,), attention_resolutions=(1,), num_res_blocks=2), 12, ["12"]),
])
def test_keys_and_shapes(cfg, size, keys):
    torch.manual_seed(0)
    enc = EncoderUNetModelWT(cfg)
    out = enc(torch.randn(2, cfg.in_channels, size, size), torch.tensor([0, 10]))
    assert list(out) == keys
    assert enc.resolutions(size) == keys
    for k, v in out.items():
        assert v.shape == (2, cfg.out_channels, int(k), int(k)) and v.dtype == torch.float32
    assert len(enc.fea_tran) == len(cfg.channel_mult)


def test_out_channels_non_square_input_and_default_resolutions():
    enc = EncoderUNetModelWT(small(out_channels=24))
    out = enc(torch.randn(1, 3, 16, 24), torch.tensor([5]))
    assert list(out) == ["16", "8"]  # keyed by the height
    assert out["16"].shape == (1, 24, 16, 24) and out["8"].shape == (1, 24, 8, 12)
    assert enc.resolutions() == ["16", "8"]
    with pytest.raises(ValueError, match="multiple"):
        enc.resolutions(15)


def test_layout_of_the_path():
    cfg = TimeAwareEncoderConfig(num_res_blocks=2, attention_resolutions=(2, 4))
    enc = EncoderUNetModelWT(cfg)
    assert isinstance(enc.time_embed, TimeEmbedding) and enc.time_embed.mlp[-1].out_features == 4 * 32
    kinds = [[type(layer).__name__ for layer in block] for block in enc.input_blocks]
    assert kinds == [["ResidualBlock"], ["ResidualBlock"], ["Downsample"],
                     ["ResidualBlock", "AttentionBlock"], ["ResidualBlock", "AttentionBlock"], ["Downsample"],
                     ["ResidualBlock", "AttentionBlock"], ["ResidualBlock", "AttentionBlock"]]
    assert [type(m) for m in enc.middle_block] == [ResidualBlock, AttentionBlock, ResidualBlock]
    assert [(b.in_channels, b.out_channels) for b in enc.fea_tran] == [(32, 64), (64, 64), (64, 64)]
    # the GroupNorm swap inside the encoder keeps the parameter names of the plain blocks
    keys = enc.state_dict().keys()
    assert "input_blocks.0.0.norm1.weight" in keys and "middle_block.1.norm.bias" in keys
    EncoderUNetModelWT(cfg).load_state_dict(enc.state_dict())


def test_timestep_embed_sequential_hands_emb_to_residual_blocks_only():
    torch.manual_seed(0)
    seq = TimestepEmbedSequential(ResidualBlock(8, 8, 12, norm_groups=4), Downsample(8))
    unzero(seq)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    out = seq(x, emb)
    assert out.shape == (2, 8, 3, 3)
    assert torch.allclose(out, seq[1](seq[0](x, emb)))
    assert not torch.allclose(out, seq(x, emb + 1.0))


def test_capture_scales_on_hand_made_paths():
    def m(side, c=4):
        return torch.zeros(1, c, side, side)

    a, b, c, d, e = m(32), m(32, 8), m(16, 8), m(16), m(8)
    got = capture_scales([a, b, c, d, e])
    assert len(got) == 3 and got[0] is b and got[1] is d and got[2] is e
    got = capture_scales([a, c])
    assert len(got) == 2 and got[0] is a and got[1] is c
    got = capture_scales([a, b, m(32)])  # no change of resolution: only the last map
    assert len(got) == 1 and got[0].shape == (1, 4, 32, 32)
    single = m(5)
    assert len(capture_scales([single])) == 1 and capture_scales([single])[0] is single
    # the bottleneck at the last resolution is captured even after the last down-sampling (as in the encoder)
    got = capture_scales([a, b, c, e, m(8), m(8, 2)])
    assert [g.shape[-2] for g in got] == [32, 16, 8] and got[1] is c and got[2].shape[1] == 2
    # width does not count: the rule looks at heights
    assert len(capture_scales([torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 2)])) == 1
    with pytest.raises(ValueError, match="empty"):
        capture_scales([])


def test_check_fea_tran_counts():
    captured = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4)]
    check_fea_tran([None, None], captured)  # equal counts pass
    with pytest.raises(ValueError) as err:
        check_fea_tran([None], captured)
    msg = str(err.value)
    assert "1 fea_tran" in msg and "2 scales" in msg and "'8'" in msg and "'4'" in msg and "channel_mult" in msg


def test_a_missing_fea_tran_block_is_a_clear_error():
    enc = EncoderUNetModelWT(TimeAwareEncoderConfig())
    del enc.fea_tran[-1]
    with pytest.raises(ValueError) as err:
        enc(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    msg = str(err.value)
    assert "2 fea_tran" in msg and "3 scales" in msg and "['32', '16', '8']" in msg


def test_time_awareness():
    torch.manual_seed(0)
    cfg = small()
    enc = unzero(EncoderUNetModelWT(cfg))
    x = torch.randn(2, 3, 16, 16)
    a, b = enc(x, torch.tensor([3, 3])), enc(x, torch.tensor([700, 700]))
    for k in a:
        assert (a[k] - b[k]).abs().max() > 1e-3, k
    # same t, same output (deterministic); batch items get their own t
    assert all(torch.equal(a[k], enc(x, torch.tensor([3, 3]))[k]) for k in a)
    mixed = enc(x, torch.tensor([3, 700]))
    assert all(torch.allclose(mixed[k][0], a[k][0], atol=1e-5) and torch.allclose(mixed[k][1], b[k][1], atol=1e-5)
               for k in a)
    # fea_tran alone is time-conditioned: each block takes the 4 * model_channels embedding
    emb_a, emb_b = enc.time_embed(torch.tensor([3])), enc.time_embed(torch.tensor([700]))
    for tran in enc.fea_tran:
        assert tran.emb_channels == 4 * cfg.model_channels
        feat = torch.randn(1, tran.in_channels, 8, 8)
        assert not torch.allclose(tran(feat, emb_a), tran(feat, emb_b))


@pytest.mark.parametrize("unzeroed", [False, True])
def test_gradients_reach_every_parameter(unzeroed):
    torch.manual_seed(0)
    enc = EncoderUNetModelWT(small(num_res_blocks=2, attention_resolutions=(1, 2)))
    if unzeroed:
        unzero(enc)
    out = enc(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    sum(v.sum() for v in out.values()).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, missing
    if unzeroed:  # with no zeroed layer in the way, every gradient is non-zero
        dead = [n for n, p in enc.named_parameters() if p.grad.abs().sum() == 0]
        assert not dead, dead


def test_fp16_conversion():
    torch.manual_seed(0)
    enc = unzero(EncoderUNetModelWT(TimeAwareEncoderConfig()))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    ref = enc(x, t)
    rounded = copy.deepcopy(enc)  # what convert_to_fp32 should give back: the weights rounded through float16
    assert enc.dtype == torch.float32

    enc.convert_to_fp16()
    assert enc.dtype == torch.float16
    for part in path_modules(enc):
        for m in part.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                assert all(p.dtype == torch.float16 for p in m.parameters())
            if isinstance(m, nn.GroupNorm):
                assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in enc.time_embed.parameters())
    assert all(p.dtype == torch.float32 for p in enc.fea_tran.parameters())

    out = enc(x, t)
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].dtype == torch.float32
        err = (out[k] - ref[k]).abs().max()
        assert 0 < err <= FP16_REL_TOL * ref[k].abs().max(), (k, err.item())
    assert all(v.dtype == torch.float64 for v in enc(x.double(), t).values())

    enc.convert_to_fp32()
    assert enc.dtype == torch.float32 and all(p.dtype == torch.float32 for p in enc.parameters())
    for part in path_modules(rounded):
        for m in part.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                for p in m.parameters():
                    p.data = p.data.half().float()
    back, expected = enc(x, t), rounded(x, t)
    assert all(torch.equal(back[k], expected[k]) for k in ref)


def test_input_errors():
    enc = EncoderUNetModelWT(TimeAwareEncoderConfig())
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        enc(torch.randn(3, 32, 32), t)
    with pytest.raises(ValueError, match="3 input channels"):
        enc(torch.randn(2, 1, 32, 32), t)
    with pytest.raises(ValueError, match="divisible by the encoder's down-sampling factor 4"):
        enc(torch.randn(2, 3, 30, 32), t)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        enc(torch.randn(2, 3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        enc(torch.randn(2, 3, 32, 32), t[:, None])
    with pytest.raises(ValueError, match="floating-point"):
        enc(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), t)


@pytest.mark.parametrize("kw, match", [
    (dict(image_size=30), "not divisible"),
    (dict(attention_resolutions=(8,)), "not down-sampling rates"),
    (dict(model_channels=12), "groups"),
    (dict(out_channels=12), "groups"),
    (dict(out_channels=8), "one channel per group"),  # GroupNorm would erase fea_tran's time embedding
    (dict(num_heads=3), "heads"),
    (dict(num_head_channels=24, attention_resolutions=()), "heads of 24"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(channel_mult=(1, 0)), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(out_channels=0), "out_channels"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TimeAwareEncoderConfig(**kw)


def test_config_round_trip():
    cfg = TimeAwareEncoderConfig(channel_mult=[1, 2, 4, 4], attention_resolutions=[2, 8], num_head_channels=16,
                                 out_channels=16, dropout=0.1)
    assert cfg.channel_mult == (1, 2, 4, 4) and cfg.attention_resolutions == (2, 8)
    assert cfg.downsampling_factor == 8
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mult"] == [1, 2, 4, 4]
    assert TimeAwareEncoderConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown time-aware encoder configuration keys"):
        TimeAwareEncoderConfig.from_dict({**d, "use_fp16": True})
