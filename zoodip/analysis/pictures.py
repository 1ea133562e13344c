"""Pictures of a run, for people who would rather look than read: loss.png, istar.png (Fig. 8), the eval grid.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from zoodip.io import atomic_write

LOSS_FILE, ISTAR_FILE, GRID_FILE = "loss.png", "istar.png", "grid.png"


def plot_istar(series: dict[str, list[float]], path: Path) -> Path:
    """Fig. 8: histogram of i*/tau, the fraction of the tau buffer's directions SG keeps at each refresh."""
    fig = Figure(figsize=(5.2, 3.4), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 21)
    for name, values in series.items():
        ax.hist(
            values,
            bins=bins,
            alpha=0.55 if len(series) > 1 else 0.9,
            label=f"{name} (n={len(values)})",
            edgecolor="black",
            linewidth=0.5,
        )
    ax.set_xlabel("i*/τ")
    ax.set_ylabel("SG refreshes")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, 1)
    ax.set_title("i*/τ over SG refreshes (Fig. 8)")
    ax.legend(fontsize=8)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` finite values (NaN steps, skipped by training, are left out)."""
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
            kept = kept[-window:]
        out.append(sum(kept) / len(kept) if kept else math.nan)
    return out


def plot_loss(history_rows: list[dict[str, Any]], path: Path) -> Path:
    """The per-step loss (and its moving average over ~2% of the run) above the token's norm."""
    steps = [int(r["step"]) for r in history_rows]
    losses = [float(r.get("loss", math.nan)) for r in history_rows]
    norms = [float(r.get("token_norm", math.nan)) for r in history_rows]
    window = max(1, len(steps) // 50)
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    top.plot(steps, moving_average(losses, window), color="tab:blue", label=f"mean of {window} steps")
    top.set_ylabel("loss L(θ)")
    top.legend(fontsize=8)
    bottom.plot(steps, norms, color="tab:orange")
    bottom.set_ylabel("‖θ‖")
    bottom.set_xlabel("step")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_run_pictures(
    run_dir: str | Path, history_rows: list[dict[str, Any]], sg_istar_over_tau: list[float], tracker: Any = None
) -> list[Path]:
    """<run>/loss.png, and <run>/istar.png when Subspace Gradient refreshed (i*/tau, the paper's Fig. 8); logged
    to W&B under pictures/ when a tracker (zoodip.runtime.tracking.Tracker) is given. Returns the files written."""
    run_dir = Path(run_dir)
    written = [plot_loss(history_rows, run_dir / LOSS_FILE)] if history_rows else []
    if sg_istar_over_tau:
        written.append(plot_istar({"this run": list(sg_istar_over_tau)}, run_dir / ISTAR_FILE))
    if tracker is not None:
        for path in written:
            with Image.open(path) as image:
                tracker.log_images(f"pictures/{path.stem}", [image.copy()], [path.name])
    return written


def enlarged(image: Image.Image, least: int = 128) -> Image.Image:
    """Small images (the toy world's 32x32) scaled up by a whole factor, pixels kept sharp, to be seen in a grid."""
    factor = max(1, least // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def tiles(images: list[Image.Image], cols: int, size: int) -> Image.Image:
    """`images` resized to size x size, `cols` per row, on white."""
    rows = max(1, -(-len(images) // cols))
    sheet = Image.new("RGB", (cols * size, rows * size), "white")
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((size, size), Image.NEAREST), ((i % cols) * size, (i // cols) * size))
    return sheet


def image_grid(images: list[Image.Image], cols: int = 5) -> Image.Image:
    """Square images at the first one's size, `cols` per row: references.png, the W&B grids, grid.png."""
    return tiles(images, cols, max(images[0].size))


def reference_grid(references: list[Image.Image], generations: list[Image.Image], cols: int = 5) -> Image.Image:
    """References on the left, generations on the right, each block `cols` wide at most, with a heading each."""
    size = max(enlarged(generations[0]).size) if generations else 128
    gap, head = size // 4, 18
    blocks = [
        (name, tiles(ims, min(cols, max(1, len(ims))), size))
        for name, ims in (("references", references), ("generated", generations))
        if ims
    ]
    width = sum(b.width for _, b in blocks) + gap * (len(blocks) - 1)
    sheet = Image.new("RGB", (max(width, 1), head + max((b.height for _, b in blocks), default=1)), "white")
    draw, x = ImageDraw.Draw(sheet), 0
    for name, block in blocks:
        draw.text((x + 2, 2), name, fill="black")
        sheet.paste(block, (x, head))
        x += block.width + gap
    return sheet


def first_of_each_prompt(names: list[str], images: list[Image.Image]) -> list[Image.Image]:
    """The first image of every prompt from evaluation file names `pXX_sYYYY.png`, in prompt order."""
    firsts: dict[str, Image.Image] = {}
    for name, image in zip(names, images, strict=True):
        firsts.setdefault(name.split("_")[0], image)
    return [firsts[k] for k in sorted(firsts)]
