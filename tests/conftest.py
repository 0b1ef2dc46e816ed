"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread (small networks train faster so, and the timing is steadier)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def full_hints():
    """Checkers show the full hint on the first failure (tests of what a wrong answer gets, not of the tiers)."""
    from diffusion_course import checks

    checks.reset_hints()
    checks.set_hints("full")
    yield
    checks.reset_hints()


class EvalOnlyNet(torch.nn.Module):
    """eps = 0.1 x, and an AssertionError if called in training mode: for samplers that must switch a module to
    eval mode while they run (and back afterwards)."""

    def forward(self, x, t):
        assert not self.training
        return 0.1 * x


@pytest.fixture
def eval_only_net():
    """An :class:`EvalOnlyNet` in training mode."""
    return EvalOnlyNet().train()
