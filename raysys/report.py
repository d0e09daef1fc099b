"""The pipeline's report: ``report.md``, the loss curve and the nprobe plot
(no orchestration here)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysys.storage import Location, resolve

METRICS = ("nDCG@10", "MRR@10", "Recall@100", "Recall@1000")


@dataclass
class Row:
    """One line of the comparison table: a system and its metrics."""

    name: str
    metrics: dict[str, float]
    sweep: list[dict[str, Any]] = field(default_factory=list)
    index: dict[str, Any] | None = None


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path | Location) -> None:
    """A figure as PNG, to a local path or a storage URI."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    resolve(path).write_bytes(buf.getvalue())


def plot_loss(
    history: list[dict[str, Any]], path: str | Path | Location, title: str = "training loss"
) -> None:
    """Loss (and learning rate, right axis) against the optimizer step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="loss per step")
    # Exponential moving average, TensorBoard's default smoothing (0.6).
    smooth, avg = [], losses[0]
    for x in losses:
        avg = 0.6 * avg + 0.4 * x
        smooth.append(avg)
    ax.plot(steps, smooth, color="tab:blue", lw=2, label="smoothed (EMA 0.6)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if all("lr" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(steps, [h["lr"] for h in history], color="tab:gray", alpha=0.5, lw=1)
        ax2.set_ylabel("learning rate", color="tab:gray")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_nprobe(rows: list[Row], path: str | Path | Location) -> None:
    """Recall@100 and nDCG@10 against nprobe, one pair of curves per system."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    swept = [r for r in rows if r.sweep]
    exact = any(r.sweep[0]["nprobe"] == 0 for r in swept)
    for i, row in enumerate(swept):
        last = i == len(swept) - 1  # the final system solid, earlier ones dashed
        xs = [max(1, s["nprobe"]) for s in row.sweep]
        for metric, marker, color in (
            ("Recall@100", "o", "tab:blue"),
            ("nDCG@10", "s", "tab:orange"),
        ):
            ax.plot(
                xs,
                [s[metric] for s in row.sweep],
                "-" if last else "--",
                marker=marker,
                color=color,
                alpha=1.0 if last else 0.6,
                label=f"{metric} ({row.name})",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nprobe" + (" (exact index: no nprobe)" if exact else ""))
    ax.set_ylabel("score")
    factory = next((r.index["factory"] for r in reversed(rows) if r.index), "")
    ax.set_title(f"{factory}: quality against nprobe")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def comparison_table(rows: list[Row]) -> list[str]:
    """Markdown: one column per system; later columns show the change from the first."""
    head = "| metric | " + " | ".join(r.name for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for m in METRICS:
        if not all(m in r.metrics for r in rows):
            continue
        base = rows[0].metrics[m]
        cells = [f"{rows[0].metrics[m]:.4f}"]
        cells += [f"{r.metrics[m]:.4f} ({r.metrics[m] - base:+.4f})" for r in rows[1:]]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def write_report(
    out: Location,
    cfg: Any,
    stages: list[str],
    rows: list[Row],
    timings: dict[str, float],
    notes: list[str],
    train: Any,
) -> Location:
    """Write ``out/report.md``: settings, the comparison table, the training
    curve, the nprobe sweep, timings and notes."""
    lines = ["# raysys pipeline report", ""]
    lines.append(f"- data: `{cfg.data.path}` (split `{cfg.data.split}`)")
    lines.append(f"- model: `{cfg.model.path}`; stages: {', '.join(stages)}")
    if "rerank" in stages or cfg.train.task == "rerank":
        lines.append(f"- reranker: `{cfg.reranker.path}` (top {cfg.reranker.topk})")
    index = next((r.index for r in reversed(rows) if r.index), None)
    if index:
        lines.append(
            f"- index: `{index['factory']}` over {index['count']:,} vectors (dim {index['dim']}), "
            f"default nprobe {index['nprobe']}"
        )
    if train is not None and train.history:
        h = train.history
        lines.append(
            f"- training: {train.stopped_at}/{train.total_steps} steps, "
            f"loss {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}; TensorBoard: "
            f"`tensorboard --logdir {out.join('train', 'tensorboard')}`"
        )
    if rows:
        lines += ["", "## Results", ""] + comparison_table(rows)
    if train is not None and train.history and out.join("train", "loss.png").is_file():
        lines += ["", "## Training", "", "![training loss](train/loss.png)"]
    swept = [r for r in rows if len(r.sweep) > 1]
    if swept:
        lines += ["", "## nprobe sweep", ""]
        head = "| nprobe | " + " | ".join(
            f"nDCG@10 ({r.name}) | Recall@100 ({r.name})" for r in swept
        )
        lines += [head + " |", "|---" * (1 + 2 * len(swept)) + "|"]
        by_np = [{s["nprobe"]: s for s in r.sweep} for r in swept]
        for p in sorted(set().union(*by_np)):
            cells = []
            for d in by_np:
                s = d.get(p)
                cells += [f"{s['nDCG@10']:.4f}", f"{s['Recall@100']:.4f}"] if s else ["", ""]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "![nprobe](nprobe.png)", "", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines.append(f"| total | {sum(timings.values()):.1f} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path = out.join("report.md")
    path.write_text("\n".join(lines) + "\n")
    out.join("results.json").write_text(
        json.dumps(
            {"rows": [{"name": r.name, "metrics": r.metrics} for r in rows], "timings": timings},
            indent=2,
        )
    )
    return path
