"""Checkers for the lessons' exercises.

Each ``check_*`` function takes the learner's function, runs it against the package's reference on
seeded random inputs and prints a verdict:

* correct: it says so and returns the learner's function, which the lesson then uses;
* still a stub (it raises ``NotImplementedError``): it says "not implemented yet" and returns the
  reference, so the lesson carries on;
* wrong: it raises :class:`ExerciseFailed` (an ``AssertionError``) naming the first failing case and
  a hint. Fix the function, or put the stub back to skip the exercise.

The exercise mechanism itself (solution markers, the generated learner notebooks) is described in
:mod:`diffusion_course.exercises`. Taught in lesson 00_setup.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from .ddpm import GaussianDiffusion, normal_kl
from .schedules import cosine_betas as _cosine_betas


class ExerciseFailed(AssertionError):
    """The learner's function gave a wrong result on a checker's test case."""


@dataclass
class Case:
    """One test case: keyword arguments for the function and a short description. Lesson: 00_setup."""

    kwargs: Dict[str, Any]
    label: str


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
    if callable(v):
        return "a model"
    return repr(v)


def _compare(got: Any, want: torch.Tensor, rtol: float, atol: float) -> str:
    """'' when ``got`` matches ``want``, else a reason."""
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}, expected a torch.Tensor"
    if tuple(got.shape) != tuple(want.shape):
        return f"returned shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        return "returned NaN or inf"
    got64, want64 = got.detach().double(), want.detach().double()
    if not torch.allclose(got64, want64, rtol=rtol, atol=atol):
        err = (got64 - want64).abs().max().item()
        return f"values differ from the reference (largest absolute error {err:.3g})"
    return ""


def run_check(exercise: str, learner: Callable, reference: Callable, cases: Sequence[Case], hint: str,
              rtol: float = 1e-5, atol: float = 1e-6, verbose: bool = True) -> Callable:
    """Run ``learner`` and ``reference`` on every case and give the verdict (see the module docstring).

    Returns the function the lesson should use from here on. Lesson: 00_setup.
    """
    for k, case in enumerate(cases):
        want = reference(**case.kwargs)
        try:
            got = learner(**case.kwargs)
        except NotImplementedError:
            if verbose:
                print(f"… Exercise {exercise}: not implemented yet. The lesson carries on with the package's "
                      f"reference implementation; come back to it when you are ready.")
            return reference
        except Exception as e:  # the learner's code crashed: say where, keep the traceback
            raise ExerciseFailed(f"✗ Exercise {exercise}: your function raised {type(e).__name__}: {e}\n"
                                 f"  on case {k + 1} ({case.label}).\n  Hint: {hint}") from e
        reason = _compare(got, want, rtol, atol)
        if reason:
            args = ", ".join(f"{n}={_describe(v)}" for n, v in case.kwargs.items())
            raise ExerciseFailed(f"✗ Exercise {exercise}: {reason}\n  on case {k + 1} ({case.label}; {args}).\n"
                                 f"  Hint: {hint}\n  Fix it, or put the NotImplementedError stub back to skip.")
    if verbose:
        print(f"✓ Exercise {exercise}: correct on {len(cases)} seeded random cases.")
    return learner


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_betas(T: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return (torch.rand(T, generator=g, dtype=torch.float64) * 0.05 + 1e-4).sort().values


# ----------------------------------------------------------------------------------------------
# Lesson 01: the forward process
# ----------------------------------------------------------------------------------------------

def ref_compute_alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s=1}^t (1 - beta_s), shape ``(T,)``. Lesson: 01_forward_process."""
    return torch.cumprod(1.0 - betas, dim=0)


def check_compute_alpha_bar(fn: Callable) -> Callable:
    """Exercise 1.1: abar_t from the betas. Lesson: 01_forward_process."""
    cases = [Case({"betas": _random_betas(T, seed)}, f"T={T} random betas") for T, seed in ((10, 0), (1000, 1), (1, 2))]
    return run_check("1.1", fn, ref_compute_alpha_bar, cases,
                     "abar_t is the running product of alpha_s = 1 - beta_s (torch.cumprod), not of the betas, "
                     "and not alpha_t alone.")


def ref_cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule's betas, float64 ``(T,)``. Lesson: 01_forward_process."""
    return _cosine_betas(T, s, max_beta)


def check_cosine_betas(fn: Callable) -> Callable:
    """Exercise 1.2: the cosine schedule. Lesson: 01_forward_process."""
    cases = [Case({"T": T, "s": s, "max_beta": 0.999}, f"T={T}, s={s}") for T, s in ((1000, 0.008), (50, 0.008), (200, 0.02))]
    return run_check("1.2", fn, ref_cosine_betas, cases,
                     "f(t) = cos(((t/T + s)/(1 + s)) * pi/2) ** 2, abar(t) = f(t)/f(0), beta_t = 1 - abar(t)/abar(t-1) "
                     "for t = 1..T (torch.arange(1, T + 1)), then clamp at max_beta. Work in float64.")


def ref_q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with ``t`` array indices ``(B,)``. Lesson: 01_forward_process."""
    ab = alpha_bar[t].to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def check_q_sample(fn: Callable) -> Callable:
    """Exercise 1.3: the closed form q(x_t | x_0). Lesson: 01_forward_process."""
    cases = []
    for seed, shape in ((0, (4, 1, 8, 8)), (1, (16, 2)), (2, (3, 3, 5, 5))):
        g = _gen(seed)
        T = 100
        ab = torch.cumprod(1 - _random_betas(T, seed), 0)
        cases.append(Case({"x0": torch.randn(shape, generator=g), "t": torch.randint(0, T, (shape[0],), generator=g),
                           "noise": torch.randn(shape, generator=g), "alpha_bar": ab}, f"batch of shape {shape}"))
    return run_check("1.3", fn, ref_q_sample, cases,
                     "index alpha_bar with t (array indices, no -1), reshape to (B, 1, ...) so it broadcasts, and use "
                     "square roots: sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise.")


# ----------------------------------------------------------------------------------------------
# Lesson 02: the ELBO and L_simple
# ----------------------------------------------------------------------------------------------

def ref_posterior_variance(betas: torch.Tensor) -> torch.Tensor:
    """beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t with abar_0 = 1. Lesson: 02_elbo_to_simple_loss."""
    return GaussianDiffusion(betas).beta_tilde


def check_posterior_variance(fn: Callable) -> Callable:
    """Exercise 2.1: the posterior variance beta_tilde_t. Lesson: 02_elbo_to_simple_loss."""
    cases = [Case({"betas": _random_betas(T, seed)}, f"T={T} random betas") for T, seed in ((10, 3), (1000, 4))]
    return run_check("2.1", fn, ref_posterior_variance, cases,
                     "abar_{t-1} for t = 1 is abar_0 = 1: prepend a one to alpha_bar[:-1] "
                     "(torch.cat). beta_tilde_1 is then exactly 0, and beta_tilde_t < beta_t.")


def ref_gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
                    logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise. Lesson: 02_elbo_to_simple_loss."""
    return normal_kl(mean1, logvar1, mean2, logvar2)


def check_gaussian_kl(fn: Callable) -> Callable:
    """Exercise 2.2: the KL divergence between two Gaussians. Lesson: 02_elbo_to_simple_loss."""
    cases = []
    for seed, shape in ((5, (6,)), (6, (2, 3, 4)), (7, (100,))):
        g = _gen(seed)
        cases.append(Case({"mean1": torch.randn(shape, generator=g), "logvar1": torch.randn(shape, generator=g),
                           "mean2": torch.randn(shape, generator=g), "logvar2": torch.randn(shape, generator=g)},
                          f"shape {shape}"))
    return run_check("2.2", fn, ref_gaussian_kl, cases,
                     "KL = 0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)**2 * exp(-logvar2) - 1). "
                     "KL is not symmetric: the second Gaussian is the one in the denominator.")


def ref_posterior_mean(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """mu_tilde_t(x_t, x_0) with ``t`` array indices ``(B,)``. Lesson: 02_elbo_to_simple_loss."""
    return GaussianDiffusion(betas).q_posterior_mean_variance(x0, xt, t)[0]


def check_posterior_mean(fn: Callable) -> Callable:
    """Exercise 2.3: the posterior mean mu_tilde_t. Lesson: 02_elbo_to_simple_loss."""
    cases = []
    for seed, shape in ((8, (5, 1, 4, 4)), (9, (32, 2))):
        g = _gen(seed)
        T = 50
        cases.append(Case({"x0": torch.randn(shape, generator=g), "xt": torch.randn(shape, generator=g),
                           "t": torch.randint(0, T, (shape[0],), generator=g), "betas": _random_betas(T, seed)},
                          f"batch of shape {shape}"))
    return run_check("2.3", fn, ref_posterior_mean, cases,
                     "mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) * x0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) * xt; "
                     "x0 takes sqrt(abar_{t-1}), xt takes sqrt(alpha_t), and abar_0 = 1.", rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Lesson 03: Algorithms 1 and 2, DDIM
# ----------------------------------------------------------------------------------------------

class _FixedEps(torch.nn.Module):
    """A deterministic stand-in for eps_theta used by the checkers: a fixed smooth function of (x, t)."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T = T

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = (t.float() / self.T).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x) * (0.5 + scale) + 0.1 * scale


def ref_simple_loss(eps_model: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    alpha_bar: torch.Tensor) -> torch.Tensor:
    """|| eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2 averaged over all entries (a scalar).

    Lesson: 03_training_and_sampling.
    """
    xt = ref_q_sample(x0, t, noise, alpha_bar)
    return ((noise - eps_model(xt, t)) ** 2).mean()


def check_simple_loss(fn: Callable) -> Callable:
    """Exercise 3.1: the loss of Algorithm 1. Lesson: 03_training_and_sampling."""
    cases = []
    for seed, shape in ((10, (8, 2)), (11, (4, 1, 6, 6))):
        g = _gen(seed)
        T = 100
        cases.append(Case({"eps_model": _FixedEps(T), "x0": torch.randn(shape, generator=g),
                           "t": torch.randint(0, T, (shape[0],), generator=g), "noise": torch.randn(shape, generator=g),
                           "alpha_bar": torch.cumprod(1 - _random_betas(T, seed), 0)}, f"batch of shape {shape}"))
    return run_check("3.1", fn, ref_simple_loss, cases,
                     "noise x0 with the closed form (your q_sample), ask the model for eps at (x_t, t), and return the "
                     "mean squared difference to the true noise (a scalar tensor): the target is eps, not x0.")


def ref_sampling_step(eps_model: Callable, xt: torch.Tensor, t: int, z: torch.Tensor,
                      betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 2, line 4, with sigma_t^2 = beta_t and z ignored at index t = 0. Lesson: 03_training_and_sampling."""
    diffusion = GaussianDiffusion(betas)
    tt = torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device)
    mean = diffusion.mu_from_eps(xt, tt, eps_model(xt, tt))
    if t == 0:
        return mean
    return mean + math.sqrt(float(betas[t])) * z


def check_sampling_step(fn: Callable) -> Callable:
    """Exercise 3.2: one step of Algorithm 2. Lesson: 03_training_and_sampling."""
    cases = []
    T = 100
    for seed, t, shape in ((12, 57, (8, 2)), (13, 0, (8, 2)), (14, 99, (2, 1, 5, 5))):
        g = _gen(seed)
        cases.append(Case({"eps_model": _FixedEps(T), "xt": torch.randn(shape, generator=g), "t": t,
                           "z": torch.randn(shape, generator=g), "betas": _random_betas(T, seed)},
                          f"t index {t}, batch of shape {shape}"))
    return run_check("3.2", fn, ref_sampling_step, cases,
                     "x_{t-1} = 1/sqrt(alpha_t) * (x_t - (1 - alpha_t)/sqrt(1 - abar_t) * eps) + sigma_t z with "
                     "sigma_t = sqrt(beta_t): alpha_t (not abar_t) in front, and no noise at the last step (index 0).",
                     rtol=1e-5, atol=1e-5)


def ref_ddim_step(eps: torch.Tensor, xt: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float) -> torch.Tensor:
    """The deterministic DDIM update (eta = 0):
    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev) eps, x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).

    Lesson: 03_training_and_sampling.
    """
    x0_pred = (xt - math.sqrt(1 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)
    return math.sqrt(alpha_bar_prev) * x0_pred + math.sqrt(1 - alpha_bar_prev) * eps


def check_ddim_step(fn: Callable) -> Callable:
    """Exercise 3.3: the deterministic DDIM step. Lesson: 03_training_and_sampling."""
    cases = []
    for seed, ab, ab_prev in ((15, 0.3, 0.6), (16, 0.01, 0.2), (17, 0.9, 1.0)):
        g = _gen(seed)
        shape = (6, 2)
        cases.append(Case({"eps": torch.randn(shape, generator=g), "xt": torch.randn(shape, generator=g),
                           "alpha_bar_t": ab, "alpha_bar_prev": ab_prev}, f"abar_t={ab}, abar_prev={ab_prev}"))
    return run_check("3.3", fn, ref_ddim_step, cases,
                     "first recover x0_pred from (x_t, eps) with abar_t, then re-noise it to the earlier level with "
                     "abar_prev, reusing the same eps (no fresh noise when eta = 0).")


# ----------------------------------------------------------------------------------------------
# Lesson 05: the VAE
# ----------------------------------------------------------------------------------------------

def ref_reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, the shape of ``mu``. Lesson: 05_vae."""
    from .vae import reparameterize

    return reparameterize(mu, logvar, eps)


def check_reparameterize(fn: Callable) -> Callable:
    """Exercise 5.1: the reparameterisation z = mu + sigma * eps. Lesson: 05_vae."""
    cases = []
    for seed, shape in ((20, (8, 16)), (21, (3, 4, 2, 2)), (22, (1, 2))):
        g = _gen(seed)
        cases.append(Case({"mu": torch.randn(shape, generator=g), "logvar": 2 * torch.randn(shape, generator=g),
                           "eps": torch.randn(shape, generator=g)}, f"shape {shape}"))
    return run_check("5.1", fn, ref_reparameterize, cases,
                     "sigma is the standard deviation, exp(logvar / 2) (torch.exp(0.5 * logvar)), not the variance "
                     "exp(logvar) and not logvar itself; use the eps you are given, do not draw a new one.")


def ref_kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) elementwise, the shape of ``mu``. Lesson: 05_vae."""
    from .vae import kl_to_standard_normal

    return kl_to_standard_normal(mu, logvar)


def check_kl_to_standard_normal(fn: Callable) -> Callable:
    """Exercise 5.2: the KL of a diagonal Gaussian to N(0, I), per dimension. Lesson: 05_vae."""
    cases = []
    for seed, shape in ((23, (8, 16)), (24, (2, 4, 3, 3)), (25, (50,))):
        g = _gen(seed)
        cases.append(Case({"mu": torch.randn(shape, generator=g), "logvar": torch.randn(shape, generator=g)},
                          f"shape {shape}"))
    return run_check("5.2", fn, ref_kl_to_standard_normal, cases,
                     "per dimension KL = 0.5 * (mu**2 + exp(logvar) - 1 - logvar): exp(logvar) is sigma^2 (no extra "
                     "square), the 1/2 applies to every term, and the result keeps the shape of mu (no sum).")


def ref_vae_loss(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                 kl_weight: float) -> torch.Tensor:
    """recon + kl_weight * KL, sums over pixels and latent dimensions, means over the batch; a scalar.

    Lesson: 05_vae.
    """
    from .vae import vae_loss

    return vae_loss(x, x_hat, mu, logvar, kl_weight).loss


def check_vae_loss(fn: Callable) -> Callable:
    """Exercise 5.3: the VAE loss with its reductions. Lesson: 05_vae."""
    cases = []
    for seed, x_shape, z_shape, w in ((26, (8, 1, 6, 6), (8, 4), 0.5), (27, (3, 3, 4, 4), (3, 2, 2, 2), 2.0),
                                      (28, (5, 1, 8, 8), (5, 7), 0.0)):
        g = _gen(seed)
        cases.append(Case({"x": torch.randn(x_shape, generator=g), "x_hat": torch.randn(x_shape, generator=g),
                           "mu": torch.randn(z_shape, generator=g), "logvar": torch.randn(z_shape, generator=g),
                           "kl_weight": w}, f"images {x_shape}, latents {z_shape}, kl_weight {w}"))
    return run_check("5.3", fn, ref_vae_loss, cases,
                     "sum the squared error over every pixel and channel of an image and the KL over every latent "
                     "dimension (x.flatten(1).sum(1)), then average both over the batch (.mean()); kl_weight "
                     "multiplies the KL only. Return one scalar tensor.", rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Lesson 04: the U-Net
# ----------------------------------------------------------------------------------------------

def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding, cosines first, frequencies exp(-ln(10000) k / half). Lesson: 04_unet."""
    from .nn import timestep_embedding

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
    from .nn import ResidualBlock

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


def _no_grad(fn: Callable, *args):
    with torch.no_grad():
        return fn(*args)


def ref_up_block_in_channels(model_channels: int, channel_mult: Tuple[int, ...], num_res_blocks: int) -> torch.Tensor:
    """The input channels of every UpBlock of the U-Net, in the order the decoder runs them, as a long
    tensor (previous feature map + skip connection). Lesson: 04_unet."""
    from .nn import UNet, UNetConfig, UpBlock

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


# ----------------------------------------------------------------------------------------------
# Lesson 06: the latent-diffusion autoencoder
# ----------------------------------------------------------------------------------------------

def ref_vq_quantize(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each latent vector of ``z`` ``(B, c, h, w)`` replaced by its nearest row of ``codebook`` ``(K, c)``,
    with the straight-through gradient (d z_q / d z = identity). Lesson: 06_ldm_autoencoder."""
    from .autoencoder import nearest_code

    e = codebook[nearest_code(z, codebook)].permute(0, 3, 1, 2)
    return z + (e - z).detach()


def _value_and_grad(fn: Callable, z: torch.Tensor, codebook: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """fn's output and the gradient it passes back to z for ``upstream``, flattened into one tensor."""
    z = z.clone().requires_grad_(True)
    out = fn(z, codebook)
    if not isinstance(out, torch.Tensor):
        return out
    if not out.requires_grad:  # nothing flows back to the encoder
        return torch.cat([out.detach().flatten(), torch.zeros(z.numel())])
    (grad,) = torch.autograd.grad((out * upstream).sum(), z, allow_unused=True)
    grad = torch.zeros_like(z) if grad is None else grad
    return torch.cat([out.detach().flatten(), grad.flatten()])


def check_vq_quantize(fn: Callable) -> Callable:
    """Exercise 6.1: nearest-code lookup with the straight-through gradient. Lesson: 06_ldm_autoencoder."""
    cases = []
    for seed, b, c, hw, k in ((40, 2, 3, 4, 8), (41, 1, 4, 3, 16), (42, 3, 2, 2, 5)):
        g = _gen(seed)
        cases.append(Case({"z": torch.randn(b, c, hw, hw, generator=g), "codebook": torch.randn(k, c, generator=g),
                           "upstream": torch.randn(b, c, hw, hw, generator=g)}, f"z ({b}, {c}, {hw}, {hw}), K = {k}"))
    wrapped = lambda z, codebook, upstream: _value_and_grad(fn, z, codebook, upstream)  # noqa: E731
    ref = lambda z, codebook, upstream: _value_and_grad(ref_vq_quantize, z, codebook, upstream)  # noqa: E731
    used = run_check("6.1", wrapped, ref, cases,
                     "move the channel axis last and flatten to (B*h*w, c); the squared Euclidean distance to every "
                     "code is (z**2).sum(1, keepdim=True) - 2 * z @ codebook.T + (codebook**2).sum(1); take argmin "
                     "(nearest, not most similar), look the codes up, move the channels back, and return "
                     "z + (e - z).detach() so that the gradient reaches z unchanged.", rtol=1e-5, atol=1e-5)
    return fn if used is wrapped else ref_vq_quantize


def ref_hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The PatchGAN discriminator's hinge loss, a scalar. Lesson: 06_ldm_autoencoder."""
    from .losses import hinge_d_loss

    return hinge_d_loss(logits_real, logits_fake)


def check_hinge_d_loss(fn: Callable) -> Callable:
    """Exercise 6.2: the discriminator's hinge loss. Lesson: 06_ldm_autoencoder."""
    cases = []
    for seed, shape in ((43, (4, 1, 6, 6)), (44, (2, 1, 2, 2)), (45, (8, 1, 1, 1))):
        g = _gen(seed)
        cases.append(Case({"logits_real": 2 * torch.randn(shape, generator=g),
                           "logits_fake": 2 * torch.randn(shape, generator=g)}, f"patch logits {shape}"))
    return run_check("6.2", fn, ref_hinge_d_loss, cases,
                     "0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()): real patches are "
                     "pushed above +1, fake ones below -1, and a patch already past its margin costs nothing.")


def ref_adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive weight, detached, clamped to [0, 1e4] (delta = 1e-4). Lesson: 06_ldm_autoencoder."""
    from .losses import adaptive_weight

    return adaptive_weight(rec_loss, g_loss, last_layer)


def _weight_and_detached(fn: Callable, **kwargs: Any) -> torch.Tensor:
    w = fn(**kwargs)
    if not isinstance(w, torch.Tensor):
        return w
    return torch.cat([w.detach().reshape(-1).double(), torch.tensor([float(w.requires_grad)], dtype=torch.float64)])


def check_adaptive_weight(fn: Callable) -> Callable:
    """Exercise 6.3: the adaptive weight of the GAN term. Lesson: 06_ldm_autoencoder."""
    cases = []
    for seed, scale, label in ((46, 1.0, "comparable gradients"), (47, 1e-9, "a vanishing GAN gradient (clamped)"),
                               (48, 30.0, "a strong GAN gradient")):
        g = _gen(seed)
        w = torch.randn(6, 4, generator=g).requires_grad_(True)    # the decoder's last layer
        h = torch.randn(5, 4, generator=g)                          # its input features
        target, d = torch.randn(5, 6, generator=g), torch.randn(6, generator=g)
        out = h @ w.t()
        cases.append(Case({"rec_loss": (out - target).abs().sum(), "g_loss": -scale * (out @ d).mean(),
                           "last_layer": w}, label))
    wrapped = lambda **kw: _weight_and_detached(fn, **kw)  # noqa: E731
    ref = lambda **kw: _weight_and_detached(ref_adaptive_weight, **kw)  # noqa: E731
    used = run_check("6.3", wrapped, ref, cases,
                     "take the gradients of both losses with respect to last_layer (torch.autograd.grad(loss, "
                     "last_layer, retain_graph=True)[0]), divide the norm of the reconstruction gradient by the norm "
                     "of the GAN gradient + 1e-4, clamp to [0, 1e4] and .detach() the result.", rtol=1e-4, atol=1e-6)
    return fn if used is wrapped else ref_adaptive_weight


ALL_CHECKS: List[Tuple[str, Callable, Callable]] = [
    ("1.1", check_compute_alpha_bar, ref_compute_alpha_bar),
    ("1.2", check_cosine_betas, ref_cosine_betas),
    ("1.3", check_q_sample, ref_q_sample),
    ("2.1", check_posterior_variance, ref_posterior_variance),
    ("2.2", check_gaussian_kl, ref_gaussian_kl),
    ("2.3", check_posterior_mean, ref_posterior_mean),
    ("3.1", check_simple_loss, ref_simple_loss),
    ("3.2", check_sampling_step, ref_sampling_step),
    ("3.3", check_ddim_step, ref_ddim_step),
    ("4.1", check_timestep_embedding, ref_timestep_embedding),
    ("4.2", check_residual_forward, ref_residual_forward),
    ("4.3", check_up_block_in_channels, ref_up_block_in_channels),
    ("5.1", check_reparameterize, ref_reparameterize),
    ("5.2", check_kl_to_standard_normal, ref_kl_to_standard_normal),
    ("5.3", check_vae_loss, ref_vae_loss),
    ("6.1", check_vq_quantize, ref_vq_quantize),
    ("6.2", check_hinge_d_loss, ref_hinge_d_loss),
    ("6.3", check_adaptive_weight, ref_adaptive_weight),
]
