import math
import random

import pytest
import torch

from diffusion_course import attend, ldm, pretrained, shapes
from diffusion_course.attend import CaptionRoles, caption_roles
from diffusion_course.nn import record_cross_attention
from diffusion_course.training import sample_images


@pytest.fixture(scope="module")
def caption_model():
    model, diffusion, _ = pretrained.load_pretrained("shapes_caption32", "cpu")
    return model, diffusion


def test_caption_roles_reads_the_shapes_grammar():
    assert caption_roles("a red circle above a blue square") == CaptionRoles((2, 6), ((1, 2), (5, 6)), "above")
    roles = caption_roles("a cyan diamond left of a yellow square and a red circle")
    assert roles == CaptionRoles((2, 7, 11), ((1, 2), (6, 7), (10, 11)), "left of")
    assert roles.content == (1, 2, 6, 7, 10, 11)
    assert caption_roles("a green triangle in the middle") == CaptionRoles((2,), ((1, 2),), None)
    rng = random.Random(0)  # every caption the generator can write parses back to its objects and relation
    for _ in range(200):
        n = rng.randint(1, 3)
        objects = [(rng.choice(list(shapes.COLOURS)), rng.choice(shapes.SHAPE_KINDS)) for _ in range(n)]
        relation = rng.choice(shapes.RELATIONS) if n > 1 else None
        caption = shapes.make_caption(objects, relation, None if n > 1 else rng.choice(shapes.POSITIONS))
        words, roles = caption.split(), caption_roles(caption)
        assert [(words[c], words[k]) for c, k in roles.pairs] == objects and roles.relation == relation
        assert [words[k] for k in roles.nouns] == [k for _, k in objects]
    with pytest.raises(ValueError, match="no shape word"):
        caption_roles("a red thing")
    with pytest.raises(ValueError, match="not followed by a shape"):
        caption_roles("a red and a blue square")
    with pytest.raises(ValueError, match="relation word"):
        caption_roles("a red circle and a blue square")


def test_token_distributions_renormalise_over_the_colour_and_shape_words():
    roles = caption_roles("a red circle above a blue square")
    maps = torch.rand(8, 6, 6)
    dist = attend.token_distributions(maps, roles)
    content = list(roles.content)
    assert torch.allclose(dist[content].sum(dim=(1, 2)), torch.ones(len(content)))
    others = [i for i in range(8) if i not in content]
    assert torch.all(dist[others] == 0)
    # the attention that other words take does not change the content words' distributions
    scaled = maps.clone()
    scaled[others] *= 7.0
    assert torch.allclose(attend.token_distributions(scaled, roles), dist)
    # without smoothing: at each pixel the share of the word among the content words, then normalised
    raw = attend.token_distributions(maps, roles, smooth=1)
    share = maps[content] / maps[content].sum(dim=0)
    assert torch.allclose(raw[content], share / share.sum(dim=(1, 2), keepdim=True))
    with pytest.raises(ValueError, match="tokens"):
        attend.token_distributions(maps[:4], roles)


def _blob(y: int, x: int, size: int = 8) -> torch.Tensor:
    p = torch.full((size, size), 1e-3)
    p[y, x] = 1.0
    return p / p.sum()


def test_binding_loss_prefers_each_colour_on_its_own_shape():
    roles = caption_roles("a red circle above a blue square")  # red = 1, circle = 2, blue = 5, square = 6
    top, bottom = _blob(1, 4), _blob(6, 4)
    dist = torch.zeros(7, 8, 8)
    dist[1], dist[2], dist[5], dist[6] = top, top, bottom, bottom  # each colour on its shape
    right = attend.binding_loss(dist, roles)
    swapped = dist.clone()
    swapped[1], swapped[5] = bottom, top  # the colours on the wrong shapes
    wrong = attend.binding_loss(swapped, roles)
    d = attend.symmetric_kl(top, bottom)
    assert right.item() == pytest.approx(-d.item(), rel=1e-5) and wrong.item() == pytest.approx(d.item(), rel=1e-5)
    kl = lambda p, q: (p * (p / q).log()).sum()  # noqa: E731
    assert d.item() == pytest.approx(0.5 * (kl(top, bottom) + kl(bottom, top)).item(), rel=1e-6)
    single = caption_roles("a red circle in the middle")
    assert attend.binding_loss(dist, single).item() == pytest.approx(attend.symmetric_kl(top, top).item(), abs=1e-6)


def test_relation_loss_is_zero_when_the_relation_holds_with_its_margin():
    H = 10
    y, x = attend.centre_of_mass(_blob(2, 7, H) * 0 + torch.nn.functional.one_hot(torch.tensor(27), H * H)
                                 .float().view(H, H))
    assert (y.item(), x.item()) == pytest.approx(((2 + 0.5) / H, (7 + 0.5) / H))
    roles = caption_roles("a red circle above a blue square")
    dist = torch.zeros(7, H, H)
    dist[2], dist[6] = _blob(1, 5, H), _blob(8, 5, H)  # circle high, square low
    assert attend.relation_loss(dist, roles, 0.15).item() == 0.0
    (ya, _), (yb, _) = attend.centre_of_mass(dist[2]), attend.centre_of_mass(dist[6])
    below = roles._replace(relation="below")
    assert attend.relation_loss(dist, below, 0.15).item() == pytest.approx(0.15 + (yb - ya).item(), rel=1e-5)
    left = roles._replace(relation="left of")  # same column: the gap is 0, the loss the margin
    assert attend.relation_loss(dist, left, 0.2).item() == pytest.approx(0.2, abs=1e-5)
    assert attend.relation_loss(dist, caption_roles("a red circle in the middle")).item() == 0.0
    assert attend.relation_gap(dist[2], dist[6], "above").item() == pytest.approx((yb - ya).item())
    with pytest.raises(ValueError, match="unknown relation"):
        attend.relation_gap(dist[2], dist[6], "beside")
    with pytest.raises(ValueError, match="one CaptionRoles per image"):
        attend.attention_loss(dist[None], [roles, roles])


def test_recording_can_keep_the_autograd_graph(caption_model):
    model, _ = caption_model
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    cond = model.conditioner.tokenizer.encode(["a red circle above a blue square", "a blue square"])[0]
    t, keep = torch.tensor([500, 500]), torch.zeros(2, dtype=torch.bool)
    with record_cross_attention(model) as plain:
        model(x, t, cond=cond, drop=keep)
    with record_cross_attention(model, keep_graph=True) as kept:
        model(x, t, cond=cond, drop=keep)
    for name in plain.layer_names:
        assert plain.maps[name][0].grad_fn is None and kept.maps[name][0].grad_fn is not None
        assert torch.allclose(plain.maps[name][0], kept.maps[name][0].detach())
    grad, = torch.autograd.grad(kept.token_maps(16)[:, 2].sum(), x)
    assert grad.abs().sum() > 0


def test_attention_guided_sampling(caption_model):
    model, diffusion = caption_model
    captions = ["a red circle above a blue square", "a cyan diamond left of a yellow square and a red circle"]
    plain = attend.attention_guided_sample(model, diffusion, captions, steps=4, step_size=0.0)
    ids = model.conditioner.tokenizer.encode(captions)[0]
    assert torch.equal(plain, sample_images(model, diffusion, 2, "ddim", 4, seed=0, progress=False, cond=ids,
                                            guidance_scale=3.0))
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the noise that seed 0 draws
    assert torch.equal(attend.attention_guided_sample(model, diffusion, captions, steps=4, step_size=0.0, x_T=x_T),
                       plain)
    steered = attend.attention_guided_sample(model, diffusion, captions, steps=4, guided_steps=2, batch_size=1)
    assert steered.shape == plain.shape and not torch.allclose(steered, plain)
    assert torch.equal(steered, attend.attention_guided_sample(model, diffusion, captions, steps=4, guided_steps=2,
                                                               batch_size=1))
    batched = attend.attention_guided_sample(model, diffusion, captions, steps=4, guided_steps=2)
    # a relation loss of one's own (lesson 07's exercise) takes the package's place
    same = attend.attention_guided_sample(model, diffusion, captions, steps=4, guided_steps=2,
                                          relation_fn=attend.pair_relation_loss)
    assert torch.equal(same, batched)
    no_relation = attend.attention_guided_sample(model, diffusion, captions, steps=4, guided_steps=2,
                                                 relation_fn=lambda p_a, p_b, relation, margin: p_a.sum() * 0.0)
    assert not torch.allclose(no_relation, batched)
    assert torch.allclose(steered, batched, atol=1e-3)  # the batch size changes only the rounding
    assert steered.min() >= -1 and steered.max() <= 1

    # one guided update lowers the attention loss of the noisy images (a small step along the gradient)
    roles = [caption_roles(c) for c in captions]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t, keep = torch.tensor([900, 900]), torch.zeros(2, dtype=torch.bool)

    def loss_at(z: torch.Tensor) -> torch.Tensor:
        with record_cross_attention(model, keep_graph=True) as record:
            model(z, t, cond=ids, drop=keep)
        return attend.attention_loss(record.token_maps(16), roles)

    z = x.clone().requires_grad_(True)
    before = loss_at(z)
    grad, = torch.autograd.grad(before.sum(), z)
    after = loss_at(x - 1e-3 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * math.sqrt(x[0].numel()))
    assert torch.all(after < before.detach()), (before, after)

    digits, digit_diffusion, _ = pretrained.load_pretrained("cond_digits16", "cpu")
    with pytest.raises(ValueError, match="caption-conditional"):
        attend.attention_guided_sample(digits, digit_diffusion, captions)
    with pytest.raises(ValueError, match="step_size"):
        attend.attention_guided_sample(model, diffusion, captions, step_size=-1.0)
    with pytest.raises(ValueError, match="guided_steps"):
        attend.attention_guided_sample(model, diffusion, captions, guided_steps=-1)
    with pytest.raises(ValueError, match="at least one caption"):
        attend.attention_guided_sample(model, diffusion, [])


def test_attention_guided_sampling_of_a_latent_model():
    torch.set_num_threads(1)
    latent, _ = ldm.load_latent_diffusion("ldm_shapes32", "cpu")  # caption and inpainting, over 4x8x8 latents
    captions = ["a red circle above a blue square", "a green triangle in the middle"]
    images = latent.attention_guided_sample(captions, steps=3, step_size=0.0, seed=2)
    ids = latent.denoiser.conditioner.tokenizer.encode(captions)[0]
    assert torch.equal(images, latent.sample(2, cond=ids, guidance_scale=3.0, steps=3, seed=2))  # plain DDIM
    z = latent.attention_guided_sample(captions, steps=3, guided_steps=1, map_size=8, decode=False)
    assert z.shape == (2, 4, 8, 8) and z.abs().max() > 1  # latents, not clamped to [-1, 1]
    plain_z = latent.attention_guided_sample(captions, steps=3, step_size=0.0, decode=False)
    assert not torch.allclose(z, plain_z)
    steered = latent.attention_guided_sample(captions, steps=3, guided_steps=1, map_size=8)
    assert torch.equal(steered, latent.decode(z).clamp(-1, 1))
    with pytest.raises(ValueError, match="rows for 2 captions"):
        attend.attention_guided_sample(latent.denoiser, latent.diffusion, captions, shape=latent.latent_shape,
                                       model_kwargs={"concat": torch.zeros(3, 5, 8, 8)})
    semantic, _ = ldm.load_latent_diffusion("ldm_shapes32_semantic", "cpu")
    with pytest.raises(ValueError, match="caption-conditional"):  # a semantic-map model reads no caption
        semantic.attention_guided_sample(captions)
