"""PNG figures of a redundancy report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from depthkit.analysis.redundancy import RedundancyReport
from depthkit.utils.figures import plt, save_figure


def plot_cka(report: RedundancyReport, path: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(report.cka, cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xlabel("hidden state (0 = embeddings, l = after block l)")
    ax.set_ylabel("hidden state")
    ax.set_title(title or "linear CKA between layers")
    fig.colorbar(image, ax=ax, label="CKA")
    return save_figure(fig, path)


def plot_depth_curves(report: RedundancyReport, path: Path, title: str = "") -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    blocks = range(report.num_layers)
    left.bar(blocks, report.block_influence, color="tab:blue")
    left.set_xlabel("block")
    left.set_ylabel("block influence (1 - cos(in, out))")
    left.set_title("block influence (ShortGPT)")
    for span, distances in report.angular_distance.items():
        right.plot(range(len(distances)), distances, marker="o", markersize=3, label=f"n = {span}")
    right.set_xlabel("starting layer l")
    right.set_ylabel("angular distance d(l, l+n)")
    right.set_title("angular distance between layer l and l+n")
    right.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
