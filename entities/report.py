"""Tables (CSV + Markdown) and image grids that every command writes the same way."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from entities import files  # noqa: E402


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub Markdown table without extra dependencies."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else format(v, floatfmt)
        return str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def write_table(df: pd.DataFrame, out_dir: Path, stem: str, title: str, notes: str = "") -> Path:
    """``<stem>.csv`` and ``<stem>.md`` (title, table, notes), each written whole; returns the Markdown path."""
    files.write_text(out_dir / f"{stem}.csv", df.to_csv(index=False))
    return files.write_text(out_dir / f"{stem}.md", f"# {title}\n\n{markdown_table(df)}\n\n{notes.strip()}\n")


def write_json(obj, path: Path) -> None:
    """The JSON report at ``path``, written whole (see :mod:`entities.files`)."""
    files.write_json(obj, path)


def image_grid(columns: dict[str, torch.Tensor], path: Path, row_labels: list[str] | None = None,
               captions: dict[str, list[str]] | None = None) -> Path:
    """A PNG with one titled column per entry, images as float CHW in [0, 1], one row per image.

    ``captions`` optionally puts a line of text under each image of a column (e.g. its labels).
    """
    names = list(columns)
    n = len(columns[names[0]])
    fig, axes = plt.subplots(n, len(names), figsize=(1.4 * len(names), 1.4 * n), squeeze=False)
    for j, name in enumerate(names):
        axes[0, j].set_title(name, fontsize=7)
        for i in range(n):
            img = columns[name][i].detach().clamp(0, 1).permute(1, 2, 0).numpy()
            ax = axes[i, j]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], fontsize=6)
            if captions and name in captions:
                ax.set_xlabel(captions[name][i], fontsize=5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def write_curves(curves: dict[str, list[dict[str, float]]], out_dir: Path, stem: str = "curves") -> Path | None:
    """``<stem>.csv`` (model, epoch, figure, value: the per-epoch means ``train.fit`` returns) and
    ``<stem>.png``, one panel per trained model; None when no model has a curve (all loaded from
    checkpoints older than their histories)."""
    rows = [{"model": model, "epoch": epoch, "figure": k, "value": v}
            for model, history in curves.items() for epoch, means in enumerate(history, start=1)
            for k, v in means.items()]
    if not rows:
        return None
    df = pd.DataFrame(rows)
    files.write_text(out_dir / f"{stem}.csv", df.to_csv(index=False))
    models = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(3.4 * len(models), 2.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for figure, part in df[df["model"] == model].groupby("figure", sort=False):
            ax.plot(part["epoch"], part["value"], marker="o", markersize=3, label=figure)
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = out_dir / f"{stem}.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return files.write_bytes(png, buf.getvalue())
