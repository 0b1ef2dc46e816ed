import warnings

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from diffusion_course import utils, viz  # noqa: E402
from diffusion_course.denoisers import SmallConvDenoiser, ToyMLP  # noqa: E402


def test_run_mode_switch(monkeypatch):
    monkeypatch.delenv("DIFFUSION_COURSE_MODE", raising=False)
    monkeypatch.setenv("CI", "true")
    assert utils.run_mode() == "quick"
    monkeypatch.setenv("DIFFUSION_COURSE_MODE", "default")
    assert utils.run_mode() == "default"
    monkeypatch.setenv("DIFFUSION_COURSE_MODE", "fast")
    with pytest.raises(ValueError, match="quick, default, gpu"):
        utils.run_mode()
    monkeypatch.delenv("DIFFUSION_COURSE_MODE")
    monkeypatch.delenv("CI")
    assert utils.run_mode() == ("gpu" if torch.cuda.is_available() else "default")


def test_by_mode_overrides_and_refuses_unknown_keys():
    d = dict(steps=1000, batch=64)
    assert utils.by_mode(quick=dict(steps=5), default=d, mode="quick") == dict(steps=5, batch=64, mode="quick")
    assert utils.by_mode(quick=dict(steps=5), default=d, gpu=dict(batch=256), mode="gpu")["batch"] == 256
    assert utils.by_mode(quick=dict(steps=5), default=d, mode="default")["steps"] == 1000
    with pytest.raises(KeyError, match="lr"):
        utils.by_mode(quick=dict(lr=1), default=d, mode="quick")


def test_device_and_seed(monkeypatch):
    monkeypatch.delenv("DIFFUSION_COURSE_DEVICE", raising=False)
    assert utils.get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            utils.get_device("cuda")
    utils.seed_everything(3)
    a = torch.rand(3)
    utils.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    with pytest.raises(ValueError):
        utils.seed_everything(-1)


def test_env_report_warns_on_colab_without_gpu(monkeypatch, capsys):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "test")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        info = utils.env_report()
    assert info["colab"] == "True" and any("NO GPU" in str(x.message) for x in w)
    assert "NO GPU" in capsys.readouterr().out


def test_env_report_says_whether_the_cpu_has_bfloat16_kernels(monkeypatch):
    monkeypatch.setattr(utils, "get_device", lambda prefer=None: torch.device("cpu"))
    for has in (True, False):
        monkeypatch.setattr(utils, "cpu_bf16_supported", lambda: has)
        info = utils.env_report(print_report=False)
        assert info["cpu bfloat16 kernels"] == ("yes (amp='bf16' is offered)" if has else "no")


def test_denoisers_shapes_and_gradients():
    m = ToyMLP(T=20)
    x, t = torch.randn(7, 2), torch.randint(0, 20, (7,))
    out = m(x, t)
    assert out.shape == (7, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    c = SmallConvDenoiser(T=20, channels=16, dilations=(1, 2))
    img = torch.randn(3, 1, 8, 8)
    assert c(img, torch.randint(0, 20, (3,))).shape == img.shape
    # the time step changes the output
    assert not torch.allclose(c(img, torch.zeros(3, dtype=torch.long)), c(img, torch.full((3,), 19)))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        m(torch.randn(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        c(torch.randn(3, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    assert utils.count_parameters(m) == sum(p.numel() for p in m.parameters())


def test_viz_helpers():
    imgs = torch.rand(5, 1, 4, 6) * 2 - 1
    grid = viz.make_grid(imgs, nrow=3, pad=1)
    assert grid.shape == (2 * 5 - 1, 3 * 7 - 1, 1) and 0 <= grid.min() and grid.max() <= 1
    ax = viz.show_images(imgs, title="t")
    assert ax.get_title() == "t"
    fig = viz.show_strip(torch.rand(3, 2, 1, 4, 4) * 2 - 1, ["a", "b", "c"])
    assert len(fig.axes) == 6
    html = viz.animate_images(torch.rand(3, 2, 3, 4, 4) * 2 - 1, ["1", "2", "3"])
    assert "<script" in html
    html = viz.animate_points(torch.randn(3, 10, 2), ["1", "2", "3"])
    assert "<script" in html
    with pytest.raises(ValueError, match="labels"):
        viz.show_strip(torch.rand(3, 2, 1, 4, 4), ["a"])
    with pytest.raises(ValueError, match="expected images"):
        viz.to_display(torch.rand(2, 2, 4, 4))
    assert viz.plot_loss([1.0] * 100, smooth=10).get_ylabel() == "loss"


def test_evaluating_restores_the_training_mode_even_on_an_error():
    from diffusion_course.utils import evaluating

    net = torch.nn.Dropout(0.5).train()
    with evaluating(net):
        assert not net.training
    assert net.training
    with pytest.raises(RuntimeError):
        with evaluating(net):
            raise RuntimeError("the sampler failed")
    assert net.training
    frozen = torch.nn.Dropout(0.5).eval()
    with evaluating(frozen):
        pass
    assert not frozen.training                     # a model in eval mode stays there
    with evaluating(lambda x: x):                  # a plain function is left alone
        pass


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_threads_follow_the_environment_and_the_command_line(monkeypatch, restore_threads, capsys):
    monkeypatch.delenv(utils.THREADS_ENV, raising=False)
    assert utils.cpu_threads() == torch.get_num_threads()      # unset: torch's own choice, unchanged
    monkeypatch.setenv(utils.THREADS_ENV, "1")
    assert utils.cpu_threads() == 1
    torch.set_num_threads(2)
    assert utils.set_cpu_threads() == 1 and torch.get_num_threads() == 1
    assert utils.env_report(print_report=False)["cpu threads"] == "1"
    for bad in ("0", "two", "-3"):
        monkeypatch.setenv(utils.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=utils.THREADS_ENV):
            utils.cpu_threads()
    with pytest.raises(ValueError, match="positive integer"):
        utils.set_cpu_threads(0)
    monkeypatch.delenv(utils.THREADS_ENV)
    from diffusion_course.__main__ import main

    torch.set_num_threads(2)
    assert main(["--threads", "1", "env"]) == 0 and torch.get_num_threads() == 1
    assert "cpu threads : 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--threads", "0", "env"])
