"""Figures: image grids, reverse-process strips and animations (``to_jshtml``, no ffmpeg).

Taught in lesson 00_setup; used by every lesson.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch


def to_display(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` tensors in [-1, 1] to ``(N, H, W, C)`` numpy in [0, 1] (C = 1 or 3).

    Lesson: 00_setup.
    """
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into one ``(rows*(H+pad), cols*(W+pad), C)`` array in [0, 1].

    Lesson: 00_setup.
    """
    x = to_display(images)
    n, h, w, c = x.shape
    cols = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype=np.float32)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = x[k]
    return grid


def show_images(images: torch.Tensor, nrow: Optional[int] = None, title: str = "", ax=None,
                figsize: float = 4.0):
    """Show a grid of images in [-1, 1] with a title. Returns the axes. Lesson: 00_setup."""
    grid = make_grid(images, nrow)
    if ax is None:
        _, ax = plt.subplots(figsize=(figsize, figsize * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return ax


def show_strip(frames: torch.Tensor, labels: Sequence[str], title: str = "", row_titles: Optional[List[str]] = None):
    """Show frames ``(K, B, C, H, W)`` as B rows of K images, each column labelled (e.g. ``t = 1000``).

    The lecture's "Figure 3" (x_T to x_0) is drawn with it. Returns the figure. Lesson: 00_setup.
    """
    frames = torch.as_tensor(frames)
    if frames.ndim == 4:
        frames = frames.unsqueeze(1)
    K, B = frames.shape[:2]
    if len(labels) != K:
        raise ValueError(f"{K} frames but {len(labels)} labels")
    fig, axes = plt.subplots(B, K, figsize=(1.1 * K, 1.2 * B + 0.4), squeeze=False)
    for k in range(K):
        imgs = to_display(frames[k])
        for b in range(B):
            ax = axes[b][k]
            img = imgs[b]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(labels[k], fontsize=8)
            if k == 0 and row_titles:
                ax.set_ylabel(row_titles[b], fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _jshtml(fig, ax, draw, labels: Sequence[str], title: str, interval: int, n_frames: int) -> str:
    """Play ``draw(k)`` for every frame k as an HTML/JavaScript animation, each frame titled, and close ``fig``."""
    from matplotlib.animation import FuncAnimation

    if len(labels) != n_frames:
        plt.close(fig)
        raise ValueError(f"{n_frames} frames but {len(labels)} labels")

    def update(k: int):
        artist = draw(k)
        ax.set_title(f"{title} {labels[k]}".strip())
        return (artist,)

    anim = FuncAnimation(fig, update, frames=len(labels), interval=interval, blit=False)
    html = anim.to_jshtml()
    plt.close(fig)
    return html


def animate_images(frames: torch.Tensor, labels: Sequence[str], nrow: Optional[int] = None,
                   interval: int = 120, title: str = "") -> str:
    """An HTML/JavaScript animation (``FuncAnimation.to_jshtml``; no ffmpeg) of frames ``(K, B, C, H, W)``,
    each frame a grid of the batch. Returns the HTML string (display it with ``IPython.display.HTML``).

    Lesson: 00_setup.
    """
    grids = [make_grid(f, nrow) for f in torch.as_tensor(frames)]
    fig, ax = plt.subplots(figsize=(4, 4))
    g0 = grids[0]
    im = ax.imshow(g0.squeeze(-1) if g0.shape[-1] == 1 else g0, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")

    def draw(k: int):
        g = grids[k]
        im.set_data(g.squeeze(-1) if g.shape[-1] == 1 else g)
        return im

    return _jshtml(fig, ax, draw, labels, title, interval, len(grids))


def animate_points(frames: torch.Tensor, labels: Sequence[str], lim: float = 3.0, interval: int = 120,
                   title: str = "") -> str:
    """An HTML/JavaScript animation of 2-D point clouds ``(K, N, 2)`` (e.g. a reverse trajectory).

    Lesson: 03_training_and_sampling.
    """
    pts = torch.as_tensor(frames).detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(4, 4))
    sc = ax.scatter(pts[0, :, 0], pts[0, :, 1], s=3)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.set_aspect("equal")

    def draw(k: int):
        sc.set_offsets(pts[k])
        return sc

    return _jshtml(fig, ax, draw, labels, title, interval, len(pts))


def plot_loss(losses: Sequence[float], title: str = "training loss", smooth: int = 50, ax=None):
    """Plot a loss history with a moving average. Returns the axes. Lesson: 03_training_and_sampling."""
    y = np.asarray(losses, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    ax.plot(y, alpha=0.3, label="per step")
    if len(y) >= smooth > 1:
        ax.plot(np.arange(smooth - 1, len(y)), np.convolve(y, np.ones(smooth) / smooth, mode="valid"),
                label=f"moving average ({smooth})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    return ax
