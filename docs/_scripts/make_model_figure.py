"""Draw the two stages and the four token scales of Two-Stage VAR-ST (docs/_static/model_overview.png).

Run from the repository root: ``python docs/_scripts/make_model_figure.py``. Only matplotlib is needed; the output is
committed so that the docs build without running this script.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

OUT = Path(__file__).resolve().parents[1] / "_static" / "model_overview.png"
SCALES = (("global", 1), ("pathway", 8), ("module", 32), ("gene", 200))
COLORS = ("#c0392b", "#e67e22", "#27ae60", "#2c6fbb")
GREY = "#555555"


def box(ax, x, y, w, h, text, fc="#f4f4f4", ec=GREY, fontsize=9, weight="normal"):
    """A rounded box with centred text."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=fc, ec=ec, lw=1.1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def arrow(ax, x0, y0, x1, y1, color=GREY, style="-|>", ls="-"):
    """An arrow from (x0, y0) to (x1, y1)."""
    ax.add_patch(
        FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=11, color=color, lw=1.2, linestyle=ls)
    )


def token_row(ax, x, y, width, n, color, height=0.28, max_cells=50):
    """``n`` token cells side by side (at most ``max_cells`` drawn; the rest is implied by a gradient)."""
    cells = min(n, max_cells)
    w = width / cells
    for i in range(cells):
        ax.add_patch(
            Rectangle((x + i * w, y), w, height, fc=color, ec="white", lw=0.4, alpha=0.35 + 0.65 * (i % 3 == 0))
        )
    ax.add_patch(Rectangle((x, y), width, height, fc="none", ec=color, lw=1.0))


def stage1(ax):
    """Stage 1: expression -> encoder -> residual quantisation at 4 scales -> decoder."""
    ax.text(0.0, 5.55, "Stage 1 — multi-scale gene VQ-VAE (unsupervised, expression only)", fontsize=11, weight="bold")
    # the ordered expression profile as a small bar plot
    rng = np.random.default_rng(3)
    prof = np.abs(np.convolve(rng.normal(0, 1, 60), np.ones(5) / 5, mode="same")) + 0.15
    xs = np.linspace(0.1, 1.7, prof.size)
    ax.bar(xs, prof / prof.max() * 1.3, width=(xs[1] - xs[0]) * 0.9, bottom=2.4, color="#7f8c8d")
    ax.text(0.9, 2.1, "y = log1p(counts)\n[G genes, clustered order]", ha="center", va="top", fontsize=8)
    arrow(ax, 1.85, 3.05, 2.35, 3.05)
    box(ax, 2.4, 2.55, 1.35, 1.0, "encoder\nMLP + gene\nmixing", fc="#ecf0f1")
    arrow(ax, 3.8, 3.05, 4.3, 3.05)
    ax.text(4.05, 2.8, "F\n[G×D]", ha="center", va="top", fontsize=8)

    # residual quantisation ladder
    x0, width = 4.4, 4.6
    ax.text(x0, 5.0, "residual quantisation, one shared codebook:", fontsize=8.5, style="italic")
    ax.text(x0, 4.72, "R ← F;  for k: pool R to n_k, nearest code, upsample, F̂ += q_k, R −= q_k", fontsize=8)
    for i, ((name, n), c) in enumerate(zip(SCALES, COLORS)):
        y = 4.1 - i * 0.62
        token_row(ax, x0 + 1.55, y, width - 1.55, n, c)
        label = f"{name:<8s} n={n if name != 'gene' else 'G'}"
        ax.text(x0, y + 0.14, label, fontsize=8.5, va="center", color=c, weight="bold", family="monospace")
    ax.text(
        x0 + width / 2 + 0.8,
        1.35,
        "1 + 8 + 32 + G = 241 tokens per spot (G = 200 genes)",
        ha="center",
        fontsize=9,
        weight="bold",
    )
    arrow(ax, x0 + width + 0.15, 3.05, x0 + width + 0.65, 3.05)
    ax.text(x0 + width + 0.4, 3.3, "F̂", ha="center", fontsize=9)
    box(ax, 9.7, 2.55, 1.25, 1.0, "decoder", fc="#ecf0f1")
    arrow(ax, 11.0, 3.05, 11.5, 3.05)
    ax.text(11.55, 3.05, "ŷ", fontsize=12, va="center")
    ax.text(
        9.7,
        1.9,
        "loss: MSE(ŷ, y) + VQ (codebook + β·commit)\n+ 0.1·Σ_k MSE(decode(F̂ after scale k), y)",
        fontsize=7.5,
        va="top",
    )
    box(ax, 9.75, 4.2, 1.9, 0.75, "codebook\nV codes × D", fc="#fdf2e9", ec="#e67e22", fontsize=8)
    arrow(ax, 9.7, 4.55, 9.1, 4.2, color="#e67e22", ls="--")


def stage2(ax):
    """Stage 2: histology + coordinates -> condition -> VAR next-scale prediction -> frozen decoder."""
    ax.text(0.0, 5.55, "Stage 2 — gene VAR transformer (supervised; stage 1 frozen)", fontsize=11, weight="bold")
    box(ax, 0.0, 3.9, 1.8, 0.8, "H&E patch →\nembedding [H]", fc="#f5eef8", ec="#8e44ad", fontsize=8.5)
    box(ax, 0.0, 2.8, 1.8, 0.8, "spot (x, y) →\nFourier features", fc="#f5eef8", ec="#8e44ad", fontsize=8.5)
    box(ax, 0.0, 1.7, 1.8, 0.8, "k nearest spots'\nmean embedding", fc="#f5eef8", ec="#8e44ad", fontsize=8.5)
    for y in (4.3, 3.2, 2.1):
        arrow(ax, 1.85, y, 2.35, 3.2)
    box(ax, 2.4, 2.8, 1.1, 0.8, "condition\nc", fc="#f5eef8", ec="#8e44ad")
    ax.text(2.95, 2.55, "10% null (CFG)", ha="center", va="top", fontsize=7.5)
    arrow(ax, 3.55, 3.2, 4.25, 3.2)
    ax.text(3.9, 3.4, "AdaLN", ha="center", fontsize=7.5)

    # block-causal next-scale prediction
    x0, width = 4.3, 4.6
    ax.text(x0, 5.0, "next-scale prediction, block-causal mask:", fontsize=8.5, style="italic")
    ax.text(x0, 4.72, "scale k is predicted at once from c and the codes of scales < k", fontsize=8)
    for i, ((name, n), c) in enumerate(zip(SCALES, COLORS)):
        y = 4.1 - i * 0.62
        token_row(ax, x0 + 1.55, y, width - 1.55, n, c)
        ax.text(x0, y + 0.14, f"step {i + 1}: {name}", fontsize=8.5, va="center", color=c, weight="bold")
        if i < len(SCALES) - 1:
            arrow(ax, x0 + 1.3, y - 0.02, x0 + 1.3, y - 0.3, color=c)
    ax.text(x0 + width / 2 + 0.8, 1.35, "logits [241 × V] · cross-entropy on stage-1 tokens", ha="center", fontsize=8.5)
    arrow(ax, x0 + width + 0.15, 3.05, x0 + width + 0.65, 3.05)
    ax.text(x0 + width + 0.4, 3.3, "codes", ha="center", fontsize=8)
    box(ax, 9.7, 2.55, 1.25, 1.0, "frozen\ndecoder", fc="#ecf0f1")
    arrow(ax, 11.0, 3.05, 11.5, 3.05)
    ax.text(11.55, 3.05, "ŷ", fontsize=12, va="center")
    ax.text(
        9.55,
        2.3,
        (
            "expected value: Σ p(code)·code\n→ point prediction\nn draws (temperature, top-k/p,\n"
            "CFG) → spread + calibrated\nnoise = uncertainty"
        ),
        fontsize=7.5,
        va="top",
    )


def main() -> None:
    """Write the figure."""
    fig, axs = plt.subplots(2, 1, figsize=(11, 7.2))
    for ax, draw in zip(axs, (stage1, stage2)):
        ax.set_xlim(-0.1, 12.0)
        ax.set_ylim(0.9, 5.8)
        ax.axis("off")
        draw(ax)
    fig.tight_layout(h_pad=0.6)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
