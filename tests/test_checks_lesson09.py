"""The checkers of lesson 09: each accepts the reference, rejects plausible wrong answers with a diagnosis,
falls back to the package on a stub, and leaves the learner's random state alone."""
import pytest
import torch
from torch import nn

from diffusion_course.checks import (ExerciseFailed, check_capture_scales, check_encoder_forward,
                                     check_fea_tran_length, check_sft_layer)
from diffusion_course.nn.encoder import capture_scales, check_fea_tran
from diffusion_course.nn.layers import zero_module
from diffusion_course.nn.sft import SFTLayer


pytestmark = pytest.mark.usefixtures("full_hints")


def _sft_class(formula, zero=True, names=("shared", "to_alpha", "to_beta"), init_std=None):
    class SFT(nn.Module):
        def __init__(self, channels, cond_channels, hidden):
            super().__init__()
            shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.SiLU())
            a, b = nn.Conv2d(hidden, channels, 3, padding=1), nn.Conv2d(hidden, channels, 3, padding=1)
            for name, m in zip(names, (shared, zero_module(a) if zero else a, zero_module(b) if zero else b)):
                setattr(self, name, m)
            if init_std is not None:  # "almost zero" heads instead of zero ones
                for head in (a, b):
                    nn.init.normal_(head.weight, std=init_std)
                    nn.init.zeros_(head.bias)
            self._names = names

        def forward(self, F_dif, feature):
            s = getattr(self, self._names[0])(feature)
            return formula(F_dif, getattr(self, self._names[1])(s), getattr(self, self._names[2])(s))
    return SFT


def test_sft_checker_accepts_reference_and_a_learner_class(capsys):
    state = torch.random.get_rng_state()
    assert check_sft_layer(SFTLayer) is SFTLayer
    mine = _sft_class(lambda F, a, b: (1 + a) * F + b)
    assert check_sft_layer(mine) is mine
    assert "✓ Exercise 9.1" in capsys.readouterr().out
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("formula, words", [
    (lambda F, a, b: a * F + b, "the 1 is missing"),
    (lambda F, a, b: (1 + a) * (F + b), "beta is added before"),
    (lambda F, a, b: (1 + b) * F + a, "swapped")])
def test_sft_checker_diagnoses_wrong_formulas(formula, words):
    with pytest.raises(ExerciseFailed, match=words):
        check_sft_layer(_sft_class(formula))


def test_sft_checker_wants_identity_at_start_and_the_lecture_names():
    with pytest.raises(ExerciseFailed, match="case 1"):  # not zero-initialised: not the identity when fresh
        check_sft_layer(_sft_class(lambda F, a, b: (1 + a) * F + b, zero=False))
    with pytest.raises(ExerciseFailed, match="Name the parts"):
        check_sft_layer(_sft_class(lambda F, a, b: (1 + a) * F + b, names=("mlp", "gamma", "beta")))
    # nearly the identity is not enough: the lesson asserts torch.equal(layer(F_dif, feature), F_dif) next
    with pytest.raises(ExerciseFailed, match="(?s)values differ.*case 1"):
        check_sft_layer(_sft_class(lambda F, a, b: (1 + a) * F + b, zero=False, init_std=1e-7))


def test_sft_checker_stub_falls_back(capsys):
    class Stub(nn.Module):
        def __init__(self, *args):
            raise NotImplementedError("Exercise 9.1")
    assert check_sft_layer(Stub) is SFTLayer
    assert "not implemented yet" in capsys.readouterr().out


def test_capture_checker():
    assert check_capture_scales(capture_scales) is capture_scales
    def after_change(path):
        return [path[0]] + [h for prev, h in zip(path[:-1], path[1:]) if h.shape[-2] != prev.shape[-2]]
    with pytest.raises(ExerciseFailed, match="first map after each change"):
        check_capture_scales(after_change)
    with pytest.raises(ExerciseFailed, match="bottleneck's output is left out"):
        check_capture_scales(lambda path: capture_scales(path)[:-1])
    with pytest.raises(ExerciseFailed):  # copies are not the path's own tensors
        check_capture_scales(lambda path: [h.clone() for h in capture_scales(path)])
    def stub(path):
        raise NotImplementedError
    assert check_capture_scales(stub) is capture_scales


def test_fea_tran_checker():
    assert check_fea_tran_length(check_fea_tran) is check_fea_tran
    with pytest.raises(ExerciseFailed, match="nothing is ever raised"):
        check_fea_tran_length(lambda fea_tran, captured: None)
    def vague(fea_tran, captured):
        if len(fea_tran) != len(captured):
            raise ValueError("wrong number of blocks")
    with pytest.raises(ExerciseFailed):  # the message must name both counts
        check_fea_tran_length(vague)
    def asserts(fea_tran, captured):
        assert len(fea_tran) == len(captured)
    with pytest.raises(ExerciseFailed):  # an AssertionError is not the ValueError asked for
        check_fea_tran_length(asserts)


def test_encoder_forward_checker():
    def forward(encoder, x, t):
        emb = encoder.time_embed(t)
        h = encoder.conv_in(x)
        path = [h]
        for block in encoder.input_blocks:
            h = block(h, emb)
            path.append(h)
        path.append(encoder.middle_block(h, emb))
        captured = capture_scales(path)
        check_fea_tran(encoder.fea_tran, captured)
        return {str(f.shape[-2]): tran(f, emb) for f, tran in zip(captured, encoder.fea_tran)}
    state = torch.random.get_rng_state()
    assert check_encoder_forward(forward) is forward
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ExerciseFailed, match="not told the time step"):
        check_encoder_forward(lambda encoder, x, t: forward(encoder, x, torch.zeros_like(t)))
    with pytest.raises(ExerciseFailed):  # without fea_tran
        check_encoder_forward(lambda encoder, x, t: {k: v for k, v in zip(["a"], [x])})
    with pytest.raises(ExerciseFailed, match="keys must be the heights as strings"):  # the lesson reads str keys
        check_encoder_forward(lambda encoder, x, t: {int(k): v for k, v in forward(encoder, x, t).items()})
    with pytest.raises(ExerciseFailed, match="must return a dict"):
        check_encoder_forward(lambda encoder, x, t: list(forward(encoder, x, t).values()))
    def stub(encoder, x, t):
        raise NotImplementedError
    used = check_encoder_forward(stub)
    assert used is not stub


def test_ilvr_swap_checker():
    from diffusion_course.checks import check_ilvr_swap, ref_ilvr_swap
    from diffusion_course.stablesr import wavelet_split

    state = torch.random.get_rng_state()

    def mine(x, c_lr, t, levels, diffusion, noise):
        y = c_lr if t < 0 else diffusion.q_sample(c_lr, t, noise)
        return wavelet_split(x, levels)[0] + wavelet_split(y, levels)[1]
    assert check_ilvr_swap(mine) is mine
    assert torch.equal(torch.random.get_rng_state(), state)

    def swapped(x, c_lr, t, levels, diffusion, noise):
        y = c_lr if t < 0 else diffusion.q_sample(c_lr, t, noise)
        return wavelet_split(y, levels)[0] + wavelet_split(x, levels)[1]

    def unnoised(x, c_lr, t, levels, diffusion, noise):
        return wavelet_split(x, levels)[0] + wavelet_split(c_lr, levels)[1]

    def unscaled(x, c_lr, t, levels, diffusion, noise):
        y = c_lr if t < 0 else c_lr + (1 - diffusion.alpha_bar[t]) ** 0.5 * noise
        return wavelet_split(x, levels)[0] + wavelet_split(y, levels)[1]

    def always_noised(x, c_lr, t, levels, diffusion, noise):  # t = -1 indexes the last, noisiest level
        ab = diffusion.alpha_bar[t]
        return wavelet_split(x, levels)[0] + wavelet_split(ab ** 0.5 * c_lr + (1 - ab) ** 0.5 * noise, levels)[1]

    def replaced(x, c_lr, t, levels, diffusion, noise):
        return c_lr if t < 0 else diffusion.q_sample(c_lr, t, noise)

    for wrong, words in ((swapped, "bands are swapped"), (unnoised, "unnoised at every step"),
                         (unscaled, "without scaling"), (always_noised, "at the end"),
                         (replaced, "whole state is replaced")):
        with pytest.raises(ExerciseFailed, match=words):
            check_ilvr_swap(wrong)

    def stub(x, c_lr, t, levels, diffusion, noise):
        raise NotImplementedError("Exercise 9.5")
    assert check_ilvr_swap(stub) is ref_ilvr_swap
