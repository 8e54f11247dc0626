"""Metric logging (`metrics.jsonl`, one JSON object per line) and the loss-curve plot."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

# A bare Figure (not pyplot) draws straight to a PNG file: no screen needed, and the global
# matplotlib backend is left alone, so plots still show inline in notebooks.
from matplotlib.figure import Figure


class MetricsLogger:
    """Appends one JSON object per call to `out_dir/metrics.jsonl`.

    A fresh run (`resume=False`) starts the file anew; a resumed run appends to it.
    """

    def __init__(self, out_dir: str | os.PathLike, resume: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        if not resume:
            self.path.write_text("")

    def log(self, **record) -> dict:
        # NaN/inf are not valid JSON: store them as null so every reader can parse the file.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        return clean


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a metrics.jsonl file back into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(records: list[dict], path: str | os.PathLike, title: str = "loss", x: str = "iter") -> Path:
    """Plot every `*loss*` column of `records` against `x` and save a PNG."""
    path = Path(path)
    keys = sorted({k for r in records for k in r if "loss" in k})
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    for key in keys:
        points = [(r[x], r[key]) for r in records if r.get(key) is not None and x in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    ax.set_xlabel(x)
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
