"""Each checker accepts the reference, hands back the reference for a stub, and rejects plausible mistakes
(the first with a nudge, the later ones with the full hint)."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_course import checks
from diffusion_course.attend import relation_gap
from diffusion_course.checks import ExerciseFailed
from diffusion_course.ddpm import GaussianDiffusion


def stub(*args, **kwargs):
    raise NotImplementedError("Exercise: stub")


@pytest.fixture(autouse=True)
def fresh_hints():
    """Every test starts with no failures counted, so the tiers it sees are its own."""
    checks.reset_hints()
    yield
    checks.reset_hints()


def _alpha_bar_prev(alpha_bar):
    return torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])


def _bcast(v, x):
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


WRONG = {
    "1.1": [
        lambda betas: 1 - betas,                        # alpha_t instead of abar_t
        lambda betas: torch.cumprod(betas, 0),          # product of betas
        lambda betas: 1 - torch.cumsum(betas, 0),       # first-order approximation
        lambda betas: torch.cumprod(1 - betas.float(), 0),  # float32: the lesson asserts 1e-12 against float64
    ],
    "1.2": [
        lambda T, s=0.008, max_beta=0.999: checks.ref_cosine_betas(T, s, 1.0),           # no clipping
        lambda T, s=0.008, max_beta=0.999: 1 - torch.cos(((torch.arange(1, T + 1, dtype=torch.float64) / T + s) / (1 + s)) * math.pi / 2)
        / torch.cos(((torch.arange(0, T, dtype=torch.float64) / T + s) / (1 + s)) * math.pi / 2),  # cos not squared
        lambda T, s=0.008, max_beta=0.999: checks.ref_cosine_betas(T, 0.0, max_beta),      # offset s ignored
        lambda T, s=0.008, max_beta=0.999: (1 - torch.cos(((torch.arange(1, T + 1) / T + s) / (1 + s)) * math.pi / 2) ** 2
                                            / torch.cos(((torch.arange(0, T) / T + s) / (1 + s)) * math.pi / 2) ** 2
                                            ).clamp(max=max_beta).double(),  # float32 inside, cast at the end
        lambda T, s=0.008, max_beta=0.999: checks.ref_cosine_betas(T, s, 0.999),             # max_beta ignored
    ],
    "1.3": [
        lambda x0, t, noise, alpha_bar: _bcast(alpha_bar[t], x0).sqrt() * x0 + _bcast(1 - alpha_bar[t], x0).sqrt() * noise * 0
        + _bcast(1 - alpha_bar[t], x0) * noise,                                                           # variance instead of std
        lambda x0, t, noise, alpha_bar: _bcast(torch.cat([alpha_bar[:1], alpha_bar])[t], x0).sqrt() * x0
        + _bcast(1 - torch.cat([alpha_bar[:1], alpha_bar])[t], x0).sqrt() * noise,                         # off by one (t - 1)
        lambda x0, t, noise, alpha_bar: checks.ref_q_sample(x0, t, noise, torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])),  # alpha_t
        lambda x0, t, noise, alpha_bar: _bcast(alpha_bar[t], x0).sqrt() * x0 + (1 - alpha_bar[t]).sqrt().reshape(_bcast(alpha_bar[t], x0).shape) * noise,  # float64 out for float32 in
        lambda x0, t, noise, alpha_bar: checks.ref_q_sample(x0.float(), t, noise.float(), alpha_bar),  # always float32
    ],
    "2.1": [
        lambda betas: betas,                                                              # beta_t instead of beta-tilde
        lambda betas: betas * (1 - torch.cumprod(1 - betas, 0)) / (1 - torch.cumprod(1 - betas, 0)),  # abar_t for abar_{t-1}
        lambda betas: betas * (1 - torch.cat([torch.zeros(1, dtype=betas.dtype), torch.cumprod(1 - betas, 0)[:-1]]))
        / (1 - torch.cumprod(1 - betas, 0)),                                             # abar_0 = 0
        lambda betas: checks.ref_posterior_variance(betas.float()),                       # float32 inside
    ],
    "2.2": [
        lambda mean1, logvar1, mean2, logvar2: checks.ref_gaussian_kl(mean2, logvar2, mean1, logvar1),  # reversed
        lambda mean1, logvar1, mean2, logvar2: 2 * checks.ref_gaussian_kl(mean1, logvar1, mean2, logvar2),  # no 1/2
        lambda mean1, logvar1, mean2, logvar2: checks.ref_gaussian_kl(mean1, logvar1, mean2, logvar2) + 0.5,  # forgot -1
        lambda mean1, logvar1, mean2, logvar2: checks.ref_gaussian_kl(mean1.float(), logvar1.float(), mean2.float(),
                                                                      logvar2.float()).double(),  # float32 inside
    ],
    "2.3": [
        lambda x0, xt, t, betas: checks.ref_posterior_mean(xt, x0, t, betas),                     # coefficients swapped
        lambda x0, xt, t, betas: GaussianDiffusion(betas).predict_x0_from_eps(xt, t, torch.zeros_like(xt)),  # x0 from xt
        lambda x0, xt, t, betas: checks.ref_posterior_mean(x0, xt, (t - 1).clamp(min=0), betas),  # off by one
        lambda x0, xt, t, betas: checks.ref_posterior_mean(x0.float(), xt.float(), t, betas.float()).to(x0.dtype),  # float32 inside
        lambda x0, xt, t, betas: checks.ref_posterior_mean(x0.double(), xt.double(), t, betas),   # float64 out for float32 in
    ],
    "3.1": [
        lambda eps_model, x0, t, noise, alpha_bar: ((x0 - eps_model(checks.ref_q_sample(x0, t, noise, alpha_bar), t)) ** 2).mean(),  # x0 target
        lambda eps_model, x0, t, noise, alpha_bar: ((noise - eps_model(x0, t)) ** 2).mean(),       # forgot to noise x0
        lambda eps_model, x0, t, noise, alpha_bar: ((noise - eps_model(checks.ref_q_sample(x0, t, noise, alpha_bar), t)) ** 2).sum(),  # sum not mean
        lambda eps_model, x0, t, noise, alpha_bar: checks.ref_simple_loss(eps_model, x0, t, noise, alpha_bar).detach(),  # no gradient
    ],
    "3.2": [
        lambda eps_model, xt, t, z, betas: checks.ref_sampling_step(eps_model, xt, t, z, betas)
        - (0.0 if t == 0 else math.sqrt(float(betas[t]))) * z
        + (0.0 if t == 0 else math.sqrt(float(GaussianDiffusion(betas).beta_tilde[t]))) * z,   # beta-tilde instead of beta
        lambda eps_model, xt, t, z, betas: checks.ref_sampling_step(eps_model, xt, t, z, betas) + (math.sqrt(float(betas[0])) * z if t == 0 else 0.0),  # noise at the last step
        lambda eps_model, xt, t, z, betas: (1 / torch.cumprod(1 - betas, 0)[t].sqrt()).to(xt) * (xt - (betas[t] / (1 - torch.cumprod(1 - betas, 0)[t]).sqrt()).to(xt) * eps_model(xt, torch.full((xt.shape[0],), t))) + (0.0 if t == 0 else math.sqrt(float(betas[t]))) * z,  # abar_t in front
    ],
    "3.3": [
        lambda eps, xt, alpha_bar_t, alpha_bar_prev: checks.ref_ddim_step(eps, xt, alpha_bar_prev, alpha_bar_t),  # swapped
        lambda eps, xt, alpha_bar_t, alpha_bar_prev: math.sqrt(alpha_bar_prev) * (xt - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t),  # eps not reused
        lambda eps, xt, alpha_bar_t, alpha_bar_prev: (xt - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t),  # returns x0_pred
    ],
    "3.4": [
        lambda score_fn, x, step_size, z: x + step_size * score_fn(x) + math.sqrt(step_size) * z,       # no 1/2
        lambda score_fn, x, step_size, z: x + 0.5 * step_size * score_fn(x) + step_size * z,           # no square root
        lambda score_fn, x, step_size, z: x - 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * z,  # downhill
    ],
    "4.1": [
        lambda t, dim: torch.cat([torch.sin(t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2))[None]),
                                  torch.cos(t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2))[None])]
                                 + ([torch.zeros(len(t), 1)] if dim % 2 else []), 1),           # sines first
        lambda t, dim: checks.ref_timestep_embedding(t + 1, dim),                                # lecture t instead of index
        lambda t, dim: torch.cat([torch.cos(t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2 - 1))[None]),
                                  torch.sin(t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2 - 1))[None])]
                                 + ([torch.zeros(len(t), 1)] if dim % 2 else []), 1),           # (half - 1) denominator
    ],
    "4.5": [
        lambda model_channels, channel_mult, num_res_blocks: checks.ref_up_block_in_channels(model_channels, channel_mult, num_res_blocks) // 2,  # skip forgotten
        lambda model_channels, channel_mult, num_res_blocks: checks.ref_up_block_in_channels(model_channels, channel_mult, num_res_blocks).flip(0),  # wrong order
        lambda model_channels, channel_mult, num_res_blocks: checks.ref_up_block_in_channels(model_channels, channel_mult, max(1, num_res_blocks - 1))[:1].repeat(len(channel_mult) * (num_res_blocks + 1)),  # one size for all
    ],
    "5.1": [
        lambda mu, logvar, eps: mu + torch.exp(logvar) * eps,                    # variance instead of std
        lambda mu, logvar, eps: mu + logvar * eps,                               # logvar used as sigma
        lambda mu, logvar, eps: mu + torch.exp(0.5 * logvar) * torch.randn_like(mu),  # fresh noise, eps ignored
        lambda mu, logvar, eps: (mu + torch.exp(0.5 * logvar) * eps).detach(),   # no gradient to mu and logvar
    ],
    "5.2": [
        lambda mu, logvar: mu ** 2 + torch.exp(logvar) - 1 - logvar,             # no 1/2
        lambda mu, logvar: 0.5 * (mu ** 2 + torch.exp(logvar) ** 2 - 1 - logvar),  # sigma^4 for sigma^2
        lambda mu, logvar: 0.5 * (mu ** 2 + torch.exp(logvar) - 1 + logvar),     # sign of log sigma^2
        lambda mu, logvar: (0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar)).sum(-1),  # summed too early
    ],
    "5.3": [
        lambda x, x_hat, mu, logvar, kl_weight: ((x - x_hat) ** 2).mean()
        + kl_weight * checks.ref_kl_to_standard_normal(mu, logvar).flatten(1).sum(1).mean(),   # mean over pixels
        lambda x, x_hat, mu, logvar, kl_weight: ((x - x_hat) ** 2).sum()
        + kl_weight * checks.ref_kl_to_standard_normal(mu, logvar).sum(),                      # sum over the batch
        lambda x, x_hat, mu, logvar, kl_weight: ((x - x_hat) ** 2).flatten(1).sum(1).mean()
        + kl_weight * checks.ref_kl_to_standard_normal(mu, logvar).mean(),                     # KL mean over dims
        lambda x, x_hat, mu, logvar, kl_weight: checks.ref_vae_loss(x, x_hat, mu, logvar, kl_weight).detach(),  # no gradient
        lambda x, x_hat, mu, logvar, kl_weight: checks.ref_vae_loss(x, x_hat.detach(), mu, logvar, kl_weight),  # decoder cut off
        lambda x, x_hat, mu, logvar, kl_weight: kl_weight * ((x - x_hat) ** 2).flatten(1).sum(1).mean()
        + checks.ref_kl_to_standard_normal(mu, logvar).flatten(1).sum(1).mean(),               # weight on recon
    ],
    "6.1": [
        lambda z, codebook: checks.ref_vq_quantize(z, codebook).detach(),       # no gradient to the encoder
        lambda z, codebook: codebook[(z.permute(0, 2, 3, 1) @ codebook.t()).argmax(-1)].permute(0, 3, 1, 2)
        + 0 * z,                                                                # most similar, not nearest
        lambda z, codebook: z + (codebook[((z.permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1)
                                          .argmin(-1)].permute(0, 3, 1, 2) - z),  # no stop-gradient: grad is 0
        lambda z, codebook: codebook[((z.reshape(-1, z.shape[1])[:, None] - codebook) ** 2).sum(-1).argmin(-1)]
        .reshape(z.shape) + z - z.detach(),                                     # channels not moved last
    ],
    "6.2": [
        lambda logits_real, logits_fake: F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean(),  # no 1/2
        lambda logits_real, logits_fake: 0.5 * (F.relu(1 + logits_real).mean() + F.relu(1 - logits_fake).mean()),  # swapped
        lambda logits_real, logits_fake: 0.5 * ((1 - logits_real).mean() + (1 + logits_fake).mean()),  # no hinge
    ],
    "6.3": [
        lambda rec_loss, g_loss, last_layer: checks.ref_adaptive_weight(g_loss, rec_loss, last_layer),  # inverted
        lambda rec_loss, g_loss, last_layer: (torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].norm()
                                              / (torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].norm()
                                                 + 1e-4)).detach(),              # no clamp
        lambda rec_loss, g_loss, last_layer: (rec_loss.abs() / (g_loss.abs() + 1e-4)).clamp(0, 1e4).detach(),  # losses, not gradients
        lambda rec_loss, g_loss, last_layer: (torch.autograd.grad(rec_loss, last_layer, retain_graph=True, create_graph=True)[0].norm()
                                              / (torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].norm()
                                                 + 1e-4)).clamp(0, 1e4),         # not detached
    ],
    "7.1": [
        lambda q, k, v, mask=None: _sdpa(q, k, v, mask, scale=1.0),                          # no 1/sqrt(d)
        lambda q, k, v, mask=None: _sdpa(q, k, v, mask, scale=1.0 / q.shape[-1]),            # 1/d
        lambda q, k, v, mask=None: _sdpa(q, k, v, mask, axis=-2),                            # softmax over queries
        lambda q, k, v, mask=None: _sdpa(q, k, v, None),                                     # padding attended to
    ],
    "7.2": [
        lambda attn, x, context, mask=None: checks.ref_cross_attention(_self_attention_of(attn), x, x, None),  # K, V from x
        lambda attn, x, context, mask=None: attn.to_out(checks.ref_scaled_dot_product_attention(
            attn.to_q(x), attn.to_k(context), attn.to_v(context), mask)),               # one head of width C
        lambda attn, x, context, mask=None: _no_out(attn, x, context, mask),          # W_out forgotten
    ],
    "7.3": [
        lambda context, mask, u, p_uncond, null: checks.ref_condition_dropout(context, mask, 1 - u, 1 - p_uncond, null),  # u > p kept
        lambda context, mask, u, p_uncond, null: (checks.ref_condition_dropout(context, mask, u, p_uncond, null)[0], mask),  # mask kept
        lambda context, mask, u, p_uncond, null: checks.ref_condition_dropout(context, mask, u, p_uncond, 0 * null),  # zeros
    ],
    "7.4": [
        lambda eps_cond, eps_uncond, scale: eps_cond + scale * (eps_cond - eps_uncond),   # (1 + w) convention
        lambda eps_cond, eps_uncond, scale: eps_uncond + scale * (eps_uncond - eps_cond),  # reversed
        lambda eps_cond, eps_uncond, scale: scale * eps_cond,                              # no baseline
    ],
    "7.5": [
        lambda p_a, p_b, relation, margin: checks.ref_relation_loss(p_b, p_a, relation, margin),  # A and B swapped
        lambda p_a, p_b, relation, margin: checks.ref_relation_loss(                             # x and y swapped
            p_a.T.contiguous(), p_b.T.contiguous(), relation, margin),
        lambda p_a, p_b, relation, margin: margin - relation_gap(p_a, p_b, relation),                  # no max(0, .)
    ],
}


def _sdpa(q, k, v, mask, scale=None, axis=-1):
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return scores.softmax(dim=axis).nan_to_num() @ v


def _self_attention_of(attn):
    """The same weights, but K and V read the image tokens (a wrong cross-attention)."""
    from diffusion_course.nn import MultiHeadAttention

    C = attn.query_dim
    wrong = MultiHeadAttention(C, attn.num_heads)
    wrong.load_state_dict({k: (v[:, :C] if k in ("to_k.weight", "to_v.weight") and v.shape[1] >= C
                               else torch.nn.functional.pad(v, (0, C - v.shape[1])) if k in ("to_k.weight", "to_v.weight")
                               else v) for k, v in attn.state_dict().items()})
    return wrong


def _no_out(attn, x, context, mask):
    """Cross-attention with the heads merged but no output projection."""
    B, N, C = x.shape
    h = attn.num_heads
    q = attn.to_q(x).reshape(B, N, h, C // h).transpose(1, 2)
    k = attn.to_k(context).reshape(B, -1, h, C // h).transpose(1, 2)
    v = attn.to_v(context).reshape(B, -1, h, C // h).transpose(1, 2)
    m = None if mask is None else mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return out.transpose(1, 2).reshape(B, N, C)


@pytest.mark.parametrize("exercise, check, reference", checks.ALL_CHECKS, ids=[c[0] for c in checks.ALL_CHECKS])
def test_checker_accepts_reference(exercise, check, reference, capsys):
    assert check(reference) is reference
    assert f"Exercise {exercise}: correct" in capsys.readouterr().out


@pytest.mark.parametrize("exercise, check, reference", checks.ALL_CHECKS, ids=[c[0] for c in checks.ALL_CHECKS])
def test_checker_hands_back_reference_for_a_stub(exercise, check, reference, capsys):
    assert check(stub) is reference
    assert "not implemented yet" in capsys.readouterr().out


@pytest.mark.parametrize("exercise, check, reference", checks.ALL_CHECKS, ids=[c[0] for c in checks.ALL_CHECKS])
def test_checker_rejects_plausible_mistakes(exercise, check, reference):
    mistakes = WRONG[exercise]
    assert len(mistakes) >= 2
    for k, wrong in enumerate(mistakes):
        with pytest.raises(ExerciseFailed, match=f"(?s)Exercise {exercise}.*on case") as failed:
            check(wrong)
        message = str(failed.value)
        if k == 0:  # a first failure nudges and points at more help; the formula stays hidden
            assert failed.value.tier == "nudge" and "Nudge: " in message and "Hint:" not in message
            assert f'checks.show_hint("{exercise}")' in message
        else:
            assert failed.value.tier == "hint" and "Hint: " in message and "Nudge:" not in message


def test_checker_reports_crashes_and_wrong_shapes():
    with pytest.raises(ExerciseFailed, match="raised ZeroDivisionError"):
        checks.check_compute_alpha_bar(lambda betas: 1 / 0)
    with pytest.raises(ExerciseFailed, match="shape"):
        checks.check_compute_alpha_bar(lambda betas: torch.cumprod(1 - betas, 0)[None])
    with pytest.raises(ExerciseFailed, match="expected a torch.Tensor"):
        checks.check_compute_alpha_bar(lambda betas: (1 - betas).tolist())


def test_every_exercise_is_listed_once():
    ids = [c[0] for c in checks.ALL_CHECKS]
    assert len(ids) == len(set(ids)) and set(ids) <= set(WRONG)
    # a list of mistakes may be written before its exercise joins ALL_CHECKS, but never for one that does not exist
    documented = {v.__doc__.split(":")[0].split()[-1] for k, v in vars(checks).items()
                  if k.startswith("check_") and (v.__doc__ or "").startswith("Exercise ")}
    assert set(WRONG) <= documented, sorted(set(WRONG) - documented)


@pytest.mark.parametrize("exercise, check, reference", checks.ALL_CHECKS, ids=[c[0] for c in checks.ALL_CHECKS])
def test_checker_leaves_the_learners_random_state_alone(exercise, check, reference, capsys):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    check(reference)
    assert torch.equal(torch.get_rng_state(), state)
