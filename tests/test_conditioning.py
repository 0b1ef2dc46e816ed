"""Lesson 07_cross_attention: cross-attention with a padding mask, the transformer block, attention maps,
the condition encoders tau_theta(y) and the conditional denoiser."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_course.nn import (GEGLU, BasicTransformerBlock, ClassEmbedder, ConditionalDenoiser, ConditionerConfig,
                                 FeedForward, LayoutEncoder, MultiHeadAttention, SpatialTransformer, TextEncoder,
                                 Tokenizer, UNet, UNetConfig, build_conditioner, record_cross_attention)

VOCAB = ["a", "red", "green", "blue", "circle", "square", "top", "bottom", "left", "right"]


def unzero(net):
    """Give every zero-initialised weight random values, so that every path shows in the output."""
    for p in net.parameters():
        if p.ndim > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return net


def tiny_unet(context_dim=6, **kw):
    cfg = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(2,), num_heads=2, norm_groups=4, context_dim=context_dim)
    cfg.update(kw)
    return UNet(UNetConfig(**cfg))


def hand_attention(attn, x, ctx, mask=None):
    """softmax(Q K^T / sqrt(d)) V per head, written out: Q from the image tokens, K and V from the context."""
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    d = q.shape[-1] // attn.num_heads
    heads, weights = [], []
    for h in range(attn.num_heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)  # (B, N, M)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        w = torch.softmax(scores, dim=-1)
        weights.append(w)
        heads.append(w @ v[..., sl])
    return attn.to_out(torch.cat(heads, dim=-1)), torch.stack(weights, dim=1)


# --- cross-attention ------------------------------------------------------------------------------------------

def test_cross_attention_matches_a_hand_computation_with_and_without_mask():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, num_heads=2, context_dim=6, zero_out=False)
    x, ctx = torch.randn(3, 5, 8), torch.randn(3, 4, 6)
    mask = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, False, True]])
    assert torch.allclose(attn(x, ctx), hand_attention(attn, x, ctx)[0], atol=1e-5)
    want, weights = hand_attention(attn, x, ctx, mask)
    assert torch.allclose(attn(x, ctx, mask), want, atol=1e-5)
    assert torch.allclose(attn.attention_weights(x, ctx, mask), weights, atol=1e-6)
    assert attn.num_heads == 2 and MultiHeadAttention(8, context_dim=6, num_head_channels=2).num_heads == 4


def test_padding_is_ignored_and_token_order_does_not_matter():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, num_heads=2, context_dim=6, zero_out=False)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    out = attn(x, ctx, mask)
    other = torch.where(mask[..., None], ctx, 100 * torch.randn(2, 4, 6))  # new values at the padded positions
    assert torch.allclose(attn(x, other, mask), out, atol=1e-5)
    assert not torch.allclose(attn(x, other), attn(x, ctx))  # without the mask the padding would count
    perm = torch.tensor([3, 1, 0, 2])
    assert torch.allclose(attn(x, ctx[:, perm], mask[:, perm]), out, atol=1e-5)


def test_mask_and_width_errors_say_what_to_do():
    attn = MultiHeadAttention(8, num_heads=2, context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="context has width 7, but this cross-attention layer was built for "
                                         "context_dim 6"):
        attn(x, torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match=r"rows \[1\] .* all False"):
        attn(x, ctx, torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match="bool"):
        attn(x, ctx, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(B, M\) = \(2, 4\)"):
        attn(x, ctx, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads of 3 channels"):
        MultiHeadAttention(8, num_head_channels=3)


# --- the transformer block --------------------------------------------------------------------------------------

def test_geglu_and_feed_forward():
    torch.manual_seed(0)
    g = GEGLU(4, 6)
    x = torch.randn(2, 3, 4)
    a, gate = g.proj(x)[..., :6], g.proj(x)[..., 6:]
    assert torch.allclose(g(x), a * F.gelu(gate))
    ff = FeedForward(4, mult=4)
    assert ff(x).shape == (2, 3, 4) and ff.net[0].proj.out_features == 2 * 16


def test_basic_transformer_block_is_three_pre_norm_residual_steps():
    torch.manual_seed(0)
    block = BasicTransformerBlock(8, num_heads=2, context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    h = x + block.self_attn(block.norm1(x))
    h = h + hand_attention(block.cross_attn, block.norm2(h), ctx, mask)[0]
    h = h + block.ff(block.norm3(h))
    assert torch.allclose(block(x, ctx, mask), h, atol=1e-5)


def test_spatial_transformer_is_the_identity_at_init_and_then_reads_the_context():
    torch.manual_seed(0)
    st = SpatialTransformer(8, num_heads=2, context_dim=6, depth=2, norm_groups=4)
    x, c1, c2 = torch.randn(2, 8, 4, 4), torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    assert torch.equal(st(x, c1), x)
    unzero(st)
    out = st(x, c1)
    assert out.shape == x.shape and not torch.allclose(out, x) and not torch.allclose(out, st(x, c2))
    perm = torch.tensor([2, 0, 1])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.allclose(st(x, c1[:, perm], mask[:, perm]), st(x, c1, mask), atol=1e-5)
    with pytest.raises(ValueError, match="pass context"):
        st(x)


# --- attention maps ---------------------------------------------------------------------------------------------

def test_recorded_weights_equal_a_hand_softmax_and_the_output_is_unchanged():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, num_heads=2, context_dim=6, zero_out=False)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    fast = attn(x, ctx, mask)
    with record_cross_attention(attn) as record:
        slow = attn(x, ctx, mask)
    assert attn.recorder is None  # back on the fused path
    assert torch.allclose(slow, fast, atol=1e-6)
    (w,) = record.maps[""]
    assert w.shape == (2, 5, 4) and w.device.type == "cpu" and not w.requires_grad
    assert torch.allclose(w, hand_attention(attn, x, ctx, mask)[1].mean(dim=1), atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5)) and (w[0, :, 2:] == 0).all()


def test_token_maps_of_a_conditional_unet():
    torch.manual_seed(0)
    net = unzero(tiny_unet(context_dim=6))
    x, t, ctx = torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), torch.randn(2, 3, 6)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    fast = net(x, t, ctx, context_mask=mask)
    with record_cross_attention(net) as record:
        for _ in range(3):  # three "sampling steps"
            slow = net(x, t, ctx, context_mask=mask)
    assert torch.allclose(slow, fast, atol=1e-5)
    assert len(record.layer_names) == 4 and record.num_calls() == 3  # down, middle, two ups at ds = 2
    assert all(name.endswith("cross_attn") for name in record.layer_names)
    maps = record.token_maps(8)
    assert maps.shape == (2, 3, 8, 8)
    assert torch.allclose(maps[0, :2].sum(0), torch.ones(8, 8), atol=1e-5) and (maps[0, 2] == 0).all()
    assert torch.allclose(maps[1].sum(0), torch.ones(8, 8), atol=1e-5)
    one = record.token_maps((16, 16), layers=[record.layer_names[0]], steps=[-1])
    w = record.maps[record.layer_names[0]][-1]  # (2, 16, 3): a 4x4 feature map
    assert one.shape == (2, 3, 16, 16)
    direct = F.interpolate(w.transpose(1, 2).reshape(2, 3, 4, 4), size=(16, 16), mode="bilinear")
    assert torch.allclose(one, direct)
    with pytest.raises(ValueError, match="recorded layers"):
        record.token_maps(8, layers=["nope"])
    with pytest.raises(ValueError, match="out of range"):
        record.token_maps(8, steps=[3])
    assert all(m.recorder is None for m in net.modules() if isinstance(m, MultiHeadAttention))
    with pytest.raises(ValueError, match="no cross-attention"):
        with record_cross_attention(tiny_unet(context_dim=None)):
            pass


# --- the tokenizer ----------------------------------------------------------------------------------------------

def test_tokenizer_encode_decode_and_errors():
    tok = Tokenizer(VOCAB, max_length=5)
    assert tok.vocab_size == len(VOCAB) + 2
    ids, mask = tok.encode(["A red circle, top-left!", "blue square"])
    assert ids.dtype == torch.long and ids.shape == (2, 5) and mask.dtype == torch.bool
    assert ids[0].tolist() == [2, 3, 6, 8, 10] and ids[1].tolist() == [5, 7, 0, 0, 0]
    assert torch.equal(mask, ids != 0)
    assert tok.decode(ids) == ["a red circle top left", "blue square"]
    with pytest.raises(ValueError, match=r"unknown words \['purple', 'triangle'\].*vocabulary.*unknown='unk'"):
        tok.encode("a purple triangle")
    assert tok.encode("a purple circle", unknown="unk")[0][0, :3].tolist() == [2, 1, 6]
    with pytest.raises(ValueError, match="longer than max_length 5"):
        tok.encode("a red circle top left right")
    with pytest.raises(ValueError, match="no words"):
        tok.encode(" ,! ")
    assert Tokenizer.from_dict(tok.to_dict()).encode("red")[0].tolist() == tok.encode("red")[0].tolist()
    with pytest.raises(ValueError, match="more than once"):
        Tokenizer(["red", "red"], 3)
    with pytest.raises(ValueError, match="single lower-case"):
        Tokenizer(["Red"], 3)


# --- the encoders -------------------------------------------------------------------------------------------------

def layout_batch():
    return torch.tensor([[[1, 0.1, 0.1, 0.5, 0.5], [2, 0.5, 0.2, 0.9, 0.8], [0, 0, 0, 0, 0]],
                         [[3, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]])


def test_class_embedder():
    emb = ClassEmbedder(10, 6)
    context, mask = emb(torch.tensor([0, 9, 3]))
    assert context.shape == (3, 1, 6) and mask is None
    assert torch.equal(context[:, 0], emb.embedding.weight[[0, 9, 3]])
    with pytest.raises(ValueError, match=r"\[10\] are out of range: valid classes are 0..9"):
        emb(torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(B,\)"):
        emb(torch.tensor([1.0, 2.0]))


def test_text_encoder_ignores_padding_and_reads_captions():
    torch.manual_seed(0)
    enc = build_conditioner(ConditionerConfig(kind="text", context_dim=8, vocabulary=VOCAB, max_length=6,
                                              depth=2, num_heads=2)).eval()
    assert isinstance(enc, TextEncoder) and enc.tokenizer.vocab_size == enc.vocab_size
    ids = torch.tensor([[2, 3, 6, 0, 0, 0], [5, 7, 9, 10, 0, 0]])
    context, mask = enc(ids)
    assert context.shape == (2, 6, 8) and torch.equal(mask, ids != 0)
    short, _ = enc(ids[:, :4])  # less padding: the real tokens do not change
    assert torch.allclose(short[0, :3], context[0, :3], atol=1e-5)
    assert torch.allclose(short[1], context[1, :4], atol=1e-5)
    assert (context[0, 3:] == 0).all()
    from_text, _ = enc(["a red circle", "blue square bottom left"])
    assert torch.allclose(from_text, context, atol=1e-6)
    with pytest.raises(ValueError, match="all padding"):
        enc(torch.tensor([[2, 0], [0, 0]]))
    with pytest.raises(ValueError, match="max_length 6"):
        enc(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        enc(torch.tensor([[99]]))


def test_layout_encoder_tokens_mask_and_errors():
    torch.manual_seed(0)
    enc = LayoutEncoder(num_classes=3, context_dim=8, max_objects=3)
    boxes = layout_batch()
    context, mask = enc(boxes)
    assert context.shape == (2, 4, 8)
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert torch.equal(context[:, 0], enc.layout_token.expand(2, 1, 8)[:, 0])
    perm = torch.tensor([1, 0, 2])
    permuted, _ = enc(boxes[:, perm])
    assert torch.allclose(permuted[:, 1:][:, perm], context[:, 1:])  # one token per box, independent of order
    with pytest.raises(ValueError, match="max_objects 3"):
        enc(torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match=r"0..3"):
        enc(torch.tensor([[[4, 0.1, 0.1, 0.2, 0.2]]]))
    with pytest.raises(ValueError, match=r"\[0, 1\] with x0 <= x1"):
        enc(torch.tensor([[[1, 0.5, 0.1, 0.2, 0.2]]]))


@pytest.mark.parametrize("kind", ["class", "text", "layout"])
def test_dropped_rows_get_the_learned_null_condition_and_the_rest_are_unchanged(kind):
    torch.manual_seed(0)
    enc = build_conditioner(ConditionerConfig(kind=kind, context_dim=8, num_classes=3, vocabulary=VOCAB,
                                              max_length=4, num_heads=2, max_objects=3)).eval()
    cond = {"class": torch.tensor([0, 2]), "text": ["red circle", "a blue square left"], "layout": layout_batch()}[kind]
    kept, kept_mask = enc(cond)
    context, mask = enc(cond, drop=torch.tensor([True, False]))
    assert torch.equal(context[1], kept[1])
    assert torch.equal(context[0, 0], enc.null[0]) and (context[0, 1:] == 0).all()
    assert not torch.equal(enc.null[0], torch.zeros(8))  # learned, not zeros
    if kind == "class":
        assert mask is None and kept_mask is None
    else:
        assert mask[0].tolist() == [True] + [False] * (mask.shape[1] - 1) and torch.equal(mask[1], kept_mask[1])
    with pytest.raises(ValueError, match=r"bool tensor of shape \(2,\)"):
        enc(cond, drop=torch.tensor([1, 0]))


@pytest.mark.parametrize("kind", ["class", "text", "layout"])
def test_gradients_of_a_unet_loss_reach_every_conditioner_parameter(kind):
    torch.manual_seed(0)
    enc = build_conditioner(ConditionerConfig(kind=kind, context_dim=6, num_classes=3, vocabulary=VOCAB,
                                              max_length=4, num_heads=2, max_objects=3))
    model = ConditionalDenoiser(unzero(tiny_unet(context_dim=6)), enc)
    cond = {"class": torch.tensor([0, 2]), "text": ["red circle", "a blue square left"], "layout": layout_batch()}[kind]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 30])
    model(x, t, cond, drop=torch.tensor([True, False])).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- configuration and the conditional denoiser --------------------------------------------------------------------

def test_conditioner_config_round_trip_and_validation():
    cfg = ConditionerConfig(kind="text", context_dim=8, vocabulary=VOCAB, max_length=4, num_heads=2)
    assert ConditionerConfig.from_dict(cfg.to_dict()) == cfg
    assert build_conditioner(cfg).config == cfg
    assert isinstance(build_conditioner(ConditionerConfig(kind="class", num_classes=4)), ClassEmbedder)
    with pytest.raises(ValueError, match="kind must be one of"):
        ConditionerConfig(kind="audio")
    with pytest.raises(ValueError, match="needs a vocabulary"):
        ConditionerConfig(kind="text")
    with pytest.raises(ValueError, match="num_heads dividing context_dim 8"):
        ConditionerConfig(kind="text", context_dim=8, vocabulary=VOCAB, num_heads=3)
    with pytest.raises(ValueError, match="unknown conditioner configuration keys"):
        ConditionerConfig.from_dict({**cfg.to_dict(), "colour": 1})


def test_conditional_denoiser_wiring_and_errors():
    torch.manual_seed(0)
    unet = unzero(tiny_unet(context_dim=6))
    enc = ClassEmbedder(3, 6)
    model = ConditionalDenoiser(unet, enc)
    assert model.config is unet.config and model.config.in_channels == 1 and model.config.image_size == 8
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    context, _ = enc(y)
    assert torch.equal(model(x, t, y), unet(x, t, context))
    assert not torch.allclose(model(x, t, y), model(x, t, y, drop=torch.tensor([True, True])))
    with pytest.raises(ValueError, match="pass cond"):
        model(x, t)
    plain = tiny_unet(context_dim=None)
    assert torch.equal(ConditionalDenoiser(plain)(x, t), plain(x, t))
    with pytest.raises(ValueError, match="unconditional"):
        ConditionalDenoiser(plain)(x, t, y)
    with pytest.raises(ValueError, match="tokens of width 5, but the U-Net was built for context_dim 6"):
        ConditionalDenoiser(unet, ClassEmbedder(3, 5))
    with pytest.raises(ValueError, match="no cross-attention"):
        ConditionalDenoiser(plain, enc)
    with pytest.raises(ValueError, match="context has width 5, but .* context_dim 6"):
        unet(x, t, torch.randn(2, 1, 5))
