import json
import math

import pytest
import torch

from diffusion_course.nn import (AttentionBlock, DownBlock, MultiHeadAttention, ResidualBlock, SpatialTransformer,
                                 TimeEmbedding, UNet, UNetConfig, UpBlock, timestep_embedding)
from diffusion_course.nn.blocks import Downsample, Upsample
from diffusion_course.nn.layers import group_norm


def unzero(net):
    """Give every zero-initialised layer random weights, so that every path shows in the output."""
    for p in net.parameters():
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return net


def small_config(**kw):
    base = dict(image_size=16, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(2,), num_heads=2, norm_groups=8)
    base.update(kw)
    return UNetConfig(**base)


def test_timestep_embedding_convention_cos_first_half_denominator():
    t = torch.tensor([0, 1, 7, 999])
    dim = 8
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, 8)
    half = dim // 2
    for b, tb in enumerate(t.tolist()):
        for k in range(half):
            freq = math.exp(-math.log(10000.0) * k / half)
            assert emb[b, k].item() == pytest.approx(math.cos(tb * freq), abs=1e-5)
            assert emb[b, half + k].item() == pytest.approx(math.sin(tb * freq), abs=1e-5)
    assert timestep_embedding(t, 7).shape == (4, 7) and (timestep_embedding(t, 7)[:, -1] == 0).all()
    # distinct steps get distinct embeddings
    e = timestep_embedding(torch.arange(1000), 32)
    assert torch.cdist(e, e).add(torch.eye(1000) * 10).min() > 1e-3
    with pytest.raises(ValueError, match=r"\(B,\)"):
        timestep_embedding(torch.zeros(2, 2), 8)


def test_time_embedding_mlp_shape():
    assert TimeEmbedding(16)(torch.arange(3)).shape == (3, 64)


@pytest.mark.parametrize("scale_shift", [False, True])
def test_residual_block_starts_as_identity_and_time_changes_output(scale_shift):
    torch.manual_seed(0)
    block = ResidualBlock(8, 8, emb_channels=12, scale_shift=scale_shift, norm_groups=4)
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 12)
    assert torch.equal(block(x, emb), x)  # the last conv is zero-initialised
    torch.nn.init.normal_(block.conv2.weight, std=0.1)
    assert not torch.allclose(block(x, emb), block(x, emb + 1.0))  # time injection matters
    out = block(x, emb)
    out.sum().backward()
    assert block.emb_proj.weight.grad is not None and block.emb_proj.weight.grad.abs().sum() > 0


def test_residual_block_channel_change_and_errors():
    block = ResidualBlock(8, 16, emb_channels=4, norm_groups=4)
    assert block(torch.randn(2, 8, 4, 4), torch.randn(2, 4)).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match="8 input channels"):
        block(torch.randn(2, 3, 4, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="time embedding"):
        block(torch.randn(2, 8, 4, 4))
    assert ResidualBlock(8, 8, norm_groups=4)(torch.randn(1, 8, 3, 3)).shape == (1, 8, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        group_norm(12, 8)


def test_attention_matches_a_hand_computation():
    torch.manual_seed(0)
    attn = MultiHeadAttention(4, num_heads=2, context_dim=3)
    torch.nn.init.normal_(attn.to_out.weight)
    x, ctx = torch.randn(2, 5, 4), torch.randn(2, 6, 3)
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    heads = []
    for h in range(2):
        sl = slice(2 * h, 2 * h + 2)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(2), dim=-1)
        heads.append(w @ v[..., sl])
    want = attn.to_out(torch.cat(heads, -1))
    assert torch.allclose(attn(x, ctx), want, atol=1e-5)
    with pytest.raises(ValueError, match="context has width 4, but this cross-attention layer was built for "
                                         "context_dim 3"):
        attn(x, torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="context must have shape"):
        attn(x, torch.randn(3, 6, 3))
    with pytest.raises(ValueError, match="needs context"):
        attn(x)


def test_attention_picks_the_explicit_softmax_only_for_small_low_precision_cpu_training():
    from diffusion_course.nn.attention import CPU_EXPLICIT_MAX_PAIRS, explicit_attention_pays

    def qkv(n, m, dtype, grad):
        q = torch.randn(1, 2, n, 4, dtype=dtype, requires_grad=grad)
        return q, torch.randn(1, 2, m, 4, dtype=dtype), torch.randn(1, 2, m, 4, dtype=dtype)

    assert explicit_attention_pays(*qkv(256, 256, torch.bfloat16, True))
    assert explicit_attention_pays(*qkv(256, 16, torch.float16, True))
    assert not explicit_attention_pays(*qkv(256, 256, torch.float32, True))     # float32: the fused kernel
    assert not explicit_attention_pays(*qkv(256, 256, torch.bfloat16, False))   # no backward pass: fused
    with torch.no_grad():
        assert not explicit_attention_pays(*qkv(256, 256, torch.bfloat16, True))
    edge = math.isqrt(CPU_EXPLICIT_MAX_PAIRS)
    assert explicit_attention_pays(*qkv(edge, edge, torch.bfloat16, True))     # the largest explicit case
    big = edge * 2
    assert not explicit_attention_pays(*qkv(big, big, torch.bfloat16, True))    # a large score matrix: fused


@pytest.mark.parametrize("masked", [False, True])
def test_attention_explicit_path_is_as_accurate_as_the_fused_kernel_in_bf16(masked):
    from diffusion_course.nn.attention import dot_product_attention, explicit_attention_pays

    torch.manual_seed(0)
    q64, k64, v64 = (torch.randn(2, 4, n, 16, dtype=torch.float64) for n in (64, 48, 48))
    mask = torch.rand(2, 48) < 0.7 if masked else None
    if masked:
        mask[:, 0] = True
    g = torch.randn(2, 4, 64, 16, dtype=torch.float64)

    def run(dtype, fused):
        q, k, v = (t.to(dtype).clone().requires_grad_() for t in (q64, k64, v64))
        if fused:   # the kernel dot_product_attention calls everywhere the explicit path does not pay
            am = None if mask is None else mask[:, None, None, :]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am)
        else:
            assert explicit_attention_pays(q, k, v) == (dtype == torch.bfloat16)
            out = dot_product_attention(q, k, v, mask)
        out.backward(g.to(dtype))
        return [t.double() for t in (out, q.grad, k.grad, v.grad)]

    exact = run(torch.float64, fused=False)
    explicit, fused = run(torch.bfloat16, fused=False), run(torch.bfloat16, fused=True)
    for want, a, b in zip(exact, explicit, fused):
        err_explicit, err_fused = (a - want).abs().max().item(), (b - want).abs().max().item()
        scale = want.abs().max().item()
        assert err_explicit < 0.05 * scale                  # bf16 keeps 8 bits: errors of a few per cent at most
        assert err_explicit < 3 * err_fused + 1e-3 * scale  # and of the same size as the fused kernel's


def test_attention_block_is_self_attention_only_and_identity_at_init():
    torch.manual_seed(0)
    block = AttentionBlock(8, num_heads=2, norm_groups=4)
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(block(x), x)
    assert sorted(n for n, _ in block.named_children()) == ["norm", "self_attn"]  # cross-attention moved out
    assert not block.self_attn.is_cross
    unzero(block)
    tokens = block.norm(x).reshape(2, 8, 16).transpose(1, 2)
    want = x + block.self_attn(tokens).transpose(1, 2).reshape(2, 8, 4, 4)
    assert torch.allclose(block(x), want, atol=1e-6) and not torch.allclose(block(x), x)
    with pytest.raises(ValueError, match="8 channels"):
        block(torch.randn(2, 4, 4, 4))


def test_down_and_up_blocks():
    d = DownBlock(8, 16, emb_channels=4, attention=True, num_heads=2, norm_groups=4)
    u = UpBlock(16 + 8, 8, emb_channels=4, attention=False, norm_groups=4)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
    h = d(x, emb)
    assert h.shape == (2, 16, 4, 4) and d.attn is not None and u.attn is None
    assert u(h, emb, skip=x).shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match="skip connection"):
        u(h, emb)
    assert Downsample(8)(x).shape == (2, 8, 2, 2) and Upsample(8)(x).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="even"):
        Downsample(8)(torch.randn(1, 8, 5, 5))


def test_unet_shapes_gradients_and_zero_output_at_init():
    torch.manual_seed(0)
    net = UNet(small_config())
    x, t = torch.randn(3, 1, 16, 16), torch.randint(0, 1000, (3,))
    out = net(x, t)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # the output conv starts at zero
    unzero(net)
    out = net(x, t)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert not torch.allclose(net(x, t), net(x, (t + 500) % 1000))  # the time step changes the output


def test_unet_skip_wiring_and_attention_placement():
    cfg = small_config(channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2,), image_size=16)
    net = UNet(cfg)
    downs = [m for m in net.down if isinstance(m, DownBlock)]
    ups = [m for m in net.up if isinstance(m, UpBlock)]
    assert len(downs) == 6 and len(ups) == 9
    # attention exactly at ds = 2: the second level, both ways
    assert [d.attn is not None for d in downs] == [False, False, True, True, False, False]
    assert [u.attn is not None for u in ups] == [False] * 3 + [True] * 3 + [False] * 3
    # every UpBlock eats a skip connection: its input channels exceed its output channels
    assert all(u.res.in_channels > u.res.out_channels or u.res.in_channels == 2 * u.res.out_channels for u in ups)
    assert net(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long)).shape == (2, 1, 16, 16)


def test_unet_context_hook():
    torch.manual_seed(0)
    net = unzero(UNet(small_config(context_dim=6)))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    c1, c2 = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    assert not torch.allclose(net(x, t, c1), net(x, t, c2))
    with pytest.raises(ValueError, match="no cross-attention"):
        UNet(small_config())(x, t, c1)
    with pytest.raises(ValueError, match="built with context_dim 6"):
        net(x, t)
    with pytest.raises(ValueError, match="context has width 7, but .* context_dim 6"):
        net(x, t, torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="all False"):
        net(x, t, c1, context_mask=torch.tensor([[True] * 4, [False] * 4]))
    # context_mask: the padded tokens' values do not matter
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    c3 = torch.where(mask[..., None], c1, torch.randn(2, 4, 6))
    assert torch.allclose(net(x, t, c1, context_mask=mask), net(x, t, c3, context_mask=mask), atol=1e-5)
    assert not torch.allclose(net(x, t, c1), net(x, t, c3))


def test_unet_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        small_config(image_size=18, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="down-sampling rates"):
        small_config(attention_resolutions=(8,))
    net = UNet(small_config())
    with pytest.raises(ValueError, match="1 input channels"):
        net(torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 15, 16), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"t must have shape \(1,\)"):
        net(torch.randn(1, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    cfg = small_config()
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="heads of 12 channels"):
        small_config(num_head_channels=12)
    with pytest.raises(ValueError, match="3 heads"):
        small_config(num_heads=3)
    with pytest.raises(ValueError, match="transformer_depth"):
        small_config(context_dim=4, transformer_depth=0)


def test_old_configs_load_and_the_unconditional_unet_keeps_its_parameter_names():
    """A configuration saved before transformer_depth/num_head_channels existed loads with their defaults,
    and an unconditional U-Net has exactly the parameters of the shipped asset (AttentionBlocks, no
    transformer), so it loads strictly."""
    from safetensors.torch import load_file

    from diffusion_course import pretrained

    folder = pretrained.ASSETS / "ddpm_digits16"
    saved = json.loads((folder / "config.json").read_text())["unet"]
    assert "transformer_depth" not in saved and "num_head_channels" not in saved
    cfg = UNetConfig.from_dict(saved)
    assert cfg.transformer_depth == 1 and cfg.num_head_channels == -1 and cfg.context_dim is None
    net = UNet(cfg)
    weights = load_file(str(folder / "model.safetensors"))
    assert sorted(net.state_dict()) == sorted(weights)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {k: tuple(v.shape) for k, v in weights.items()}
    net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    assert isinstance(net.mid_attn, AttentionBlock)
    assert not any(isinstance(m, SpatialTransformer) for m in net.modules())
    assert not any(isinstance(m, MultiHeadAttention) and m.is_cross for m in net.modules())


def test_conditional_unet_with_deeper_transformers_and_head_width():
    torch.manual_seed(0)
    cfg = small_config(context_dim=6, transformer_depth=2, num_head_channels=8)
    net = unzero(UNet(cfg))
    sites = [d.attn for d in net.down if isinstance(d, DownBlock) and d.attn is not None]
    sites += [u.attn for u in net.up if isinstance(u, UpBlock) and u.attn is not None] + [net.mid_attn]
    assert len(sites) == 1 + 2 + 1  # one DownBlock and two UpBlocks at ds = 2, plus the middle
    assert all(isinstance(s, SpatialTransformer) and len(s.blocks) == 2 for s in sites)
    assert not any(isinstance(m, AttentionBlock) for m in net.modules())
    # 32 channels at ds = 2 and in the middle: 32 // 8 = 4 heads of 8 channels
    assert {b.self_attn.num_heads for s in sites for b in s.blocks} == {4}
    assert {b.cross_attn.num_heads for s in sites for b in s.blocks} == {4}
    x, t, ctx = torch.randn(2, 1, 16, 16), torch.tensor([1, 900]), torch.randn(2, 3, 6)
    out = net(x, t, ctx)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in net.named_parameters() if "cross_attn" in n)


def _sft_net(**kw):
    torch.manual_seed(0)
    prior = unzero(UNet(small_config(**kw)))
    steered = UNet(small_config(sft_channels=5, sft_hidden=8, **kw))
    missing, unexpected = steered.load_state_dict(prior.state_dict(), strict=False)
    assert not unexpected and missing and all(".sft." in k for k in missing)
    return prior, steered


def test_sft_modulate_is_the_lecture_formula():
    from diffusion_course.nn.sft import sft_modulate
    F, a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(sft_modulate(F, a, b), (1 + a) * F + b)
    assert torch.allclose(sft_modulate(F, a, b), F + a * F + b)


def test_sft_layer_starts_as_identity_and_reference_variant_does_not():
    from diffusion_course.nn.sft import SFTLayer
    torch.manual_seed(0)
    F, feat = torch.randn(2, 8, 4, 4) * 3 + 1, torch.randn(2, 5, 4, 4)
    layer = SFTLayer(8, 5, hidden=6)
    assert torch.equal(layer(F, feat), F)  # alpha = beta = 0 exactly at initialisation
    ref = SFTLayer(8, 5, hidden=6, normalize=True, norm_groups=4)
    assert not torch.allclose(ref(F, feat), F, atol=1e-2)  # GroupNorm(F) != F: not the identity
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    alpha, beta = layer.params(feat)
    assert torch.allclose(layer(F, feat), (1 + alpha) * F + beta)
    with pytest.raises(ValueError, match="out_channels must equal"):
        layer(F, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        layer(F, torch.randn(2, 5, 2, 2))


def test_unet_sft_starts_as_the_prior_and_is_steered_after_training():
    prior, steered = _sft_net()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    assert steered.sft_resolutions() == ["16", "8"] and steered.sft_resolutions(32) == ["32", "16"]
    cond = {"16": torch.randn(2, 5, 16, 16), "8": torch.randn(2, 5, 8, 8)}
    assert torch.equal(steered(x, t, struct_cond=cond), prior(x, t))  # identity at initialisation, exactly
    assert torch.equal(steered(x, t), prior(x, t))  # without struct_cond: the plain U-Net
    # every residual block (encoder, middle, decoder) owns an SFT layer
    blocks = [m for m in steered.modules() if isinstance(m, ResidualBlock)]
    assert blocks and all(b.sft is not None for b in blocks)
    assert len(steered.sft_parameters()) == 6 * len(blocks)  # shared conv, alpha head, beta head: weight + bias
    assert set(steered.prior_state_dict()) == set(prior.state_dict())
    # train the SFT layers only: the output moves, and it depends on the condition
    opt = torch.optim.SGD(steered.sft_parameters(), lr=0.5)
    loss = (steered(x, t, struct_cond=cond) - 1).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in steered.sft_parameters())
    opt.step()
    assert not torch.allclose(steered(x, t, struct_cond=cond), prior(x, t))
    other = {k: torch.randn_like(v) for k, v in cond.items()}
    assert not torch.allclose(steered(x, t, struct_cond=cond), steered(x, t, struct_cond=other))
    # a modulation at one resolution only changes the output too (every block at "8" is steered)
    only8 = {"16": torch.zeros(2, 5, 16, 16), "8": cond["8"]}
    assert not torch.allclose(steered(x, t, struct_cond=only8), steered(x, t, struct_cond={**only8, "8": other["8"]}))


def test_unet_sft_clear_errors():
    prior, steered = _sft_net()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    cond = {"16": torch.randn(2, 5, 16, 16), "8": torch.randn(2, 5, 8, 8)}
    with pytest.raises(ValueError, match="no SFT layers"):
        prior(x, t, struct_cond=cond)
    with pytest.raises(ValueError, match="works at"):
        steered(x, t, struct_cond={"16": cond["16"]})
    with pytest.raises(ValueError, match="must have shape"):
        steered(x, t, struct_cond={**cond, "8": torch.randn(2, 4, 8, 8)})
    with pytest.raises(ValueError, match="sft_channels must be"):
        small_config(sft_channels=-1)
