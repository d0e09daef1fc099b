"""The pipeline's report: ``report.md`` and the nprobe plot (no orchestration here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plot_nprobe(sweep: list[dict[str, Any]], path: Path, factory: str) -> None:
    """Recall@100 and nDCG@10 against nprobe (one point for an exact index)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [max(1, s["nprobe"]) for s in sweep]
    ax.plot(xs, [s["Recall@100"] for s in sweep], marker="o", label="Recall@100")
    ax.plot(xs, [s["nDCG@10"] for s in sweep], marker="s", label="nDCG@10")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(
        "nprobe" + (" (exact index: no nprobe)" if sweep and sweep[0]["nprobe"] == 0 else "")
    )
    ax.set_ylabel("score")
    ax.set_title(f"{factory}: quality against nprobe")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out: Path,
    cfg: Any,
    stages: list[str],
    metrics: dict[str, float],
    sweep: list[dict[str, Any]],
    timings: dict[str, float],
    notes: list[str],
    train: Any,
    index_dir: Path,
) -> Path:
    """Write ``out/report.md``: settings, metrics, nprobe sweep, timings, notes."""
    lines = ["# raysys pipeline report", ""]
    lines.append(f"- data: `{cfg.data.path}` (split `{cfg.data.split}`)")
    lines.append(f"- model: `{cfg.model.path}`; stages: {', '.join(stages)}")
    if "rerank" in stages or cfg.train.task == "rerank":
        lines.append(f"- reranker: `{cfg.reranker.path}` (top {cfg.reranker.topk})")
    if (index_dir / "manifest.json").is_file():
        m = json.loads((index_dir / "manifest.json").read_text())
        lines.append(
            f"- index: `{m['factory']}` over {m['count']} vectors (dim {m['dim']}), "
            f"default nprobe {m['nprobe']}"
        )
    if train is not None and train.history:
        h = train.history
        lines.append(
            f"- training: {train.stopped_at}/{train.total_steps} steps, "
            f"loss {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}"
        )
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    if len(sweep) > 1:
        lines += ["", "## nprobe sweep", "", "| nprobe | nDCG@10 | Recall@100 |", "|---|---|---|"]
        lines += [f"| {s['nprobe']} | {s['nDCG@10']:.4f} | {s['Recall@100']:.4f} |" for s in sweep]
    lines += ["", "![nprobe](nprobe.png)", "", "## Timings (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
