"""Metric logging and the loss-curve plot.

A training run writes two JSON-lines files (one JSON object per line) in its out_dir:

* ``metrics.jsonl``: one object per evaluation (``iter``, ``train_loss``, ``val_loss``, ``lr``, ...);
* ``steps.jsonl``: the training loss of every step, ``{"iter": i, "loss": x}``, which is noisy
  (each step sees one batch) but shows what happens between two evaluations.

``plot_loss`` draws both: the per-step loss, faint and smoothed, under the evaluation points.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

# A bare Figure (not pyplot) draws straight to a PNG file: no screen needed, and the global
# matplotlib backend is left alone, so plots still show inline in notebooks.
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator


def _finite_or_none(value):
    """NaN and inf are not valid JSON: store them as null so every reader can parse the file."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Writes ``out_dir/metrics.jsonl`` (``log``, once per evaluation) and ``out_dir/steps.jsonl``
    (``log_step``, once per training step).

    Per-step rows wait in memory and are written at every ``log()`` and at ``close()``, so logging
    every step costs nothing measurable. Use it as ``with MetricsLogger(...) as logger:`` or call
    ``close()`` at the end.

    A fresh run (``resume=False``) starts both files empty. A run resumed at step N
    (``resume=True, start_iter=N``) keeps the rows before step N and drops the others: the resumed
    run logs step N and the steps after it again, and every step should appear once.
    ``start_iter=None`` keeps every row.
    """

    def __init__(self, out_dir: str | os.PathLike, resume: bool = False, start_iter: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.steps_path = self.out_dir / "steps.jsonl"
        self._pending_steps: list[str] = []  # JSON lines not yet written to steps.jsonl
        for path in (self.path, self.steps_path):
            if not resume:
                path.write_text("")  # a fresh run starts both files anew
            elif start_iter is not None:
                _keep_rows_before(path, start_iter)

    def log(self, **record) -> dict:
        """Append one evaluation's numbers to metrics.jsonl (and write the pending step rows)."""
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        self.flush()
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        return clean

    def log_step(self, iter: int, loss: float) -> None:
        """Remember the training loss of step ``iter``; it is written at the next ``log()``/``close()``."""
        self._pending_steps.append(json.dumps({"iter": int(iter), "loss": _finite_or_none(float(loss))}) + "\n")

    def flush(self) -> None:
        """Write the pending step rows to steps.jsonl."""
        if self._pending_steps:
            with self.steps_path.open("a") as f:
                f.write("".join(self._pending_steps))
            self._pending_steps.clear()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _keep_rows_before(path: Path, start_iter: int) -> None:
    """Drop the rows of a JSON-lines file with ``iter >= start_iter``; keep the rest in order.

    The file is rewritten through a temp file and ``os.replace`` (atomic), so a crash here never
    loses the rows of the earlier run. A half-written last line (a crash mid-write) is dropped.
    """
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # blank, or cut short by a crash
            step = row.get("iter") if isinstance(row, dict) else None
            if not (isinstance(step, (int, float)) and step >= start_iter):
                kept.append(line if line.endswith("\n") else line + "\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(kept))
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; these are ordinary outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a metrics.jsonl file back into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_steps(out_dir_or_path: str | os.PathLike) -> list[dict]:
    """Read the per-step rows, ``[{"iter": i, "loss": x}, ...]``, of a run directory or a steps.jsonl
    file; an empty list if there is none (a run made before steps were logged)."""
    path = Path(out_dir_or_path)
    if path.is_dir():
        path = path / "steps.jsonl"
    return read_metrics(path) if path.is_file() else []


# --- The loss plot --------------------------------------------------------------------------------------


def _smooth(values: list[float], span: float) -> list[float]:
    """Exponential moving average, as wandb and TensorBoard smooth a noisy curve.

    Each point averages roughly the last ``span`` values. Early in training the loss falls fast,
    and a long average would trail behind it (it still remembers the higher losses of the steps
    before); so the window starts at one value and grows with the step count, by 1 per 20 steps.
    """
    average, smoothed = 0.0, []
    for n, value in enumerate(values):
        beta = 1.0 - 1.0 / min(max(span, 1.0), 1.0 + n / 20)  # beta = 0 at the first value: no bias
        average = beta * average + (1.0 - beta) * value
        smoothed.append(average)
    return smoothed


def _log_ticks(low: float, high: float) -> list[float]:
    """Round-number ticks (1.6, 1.8, 2, 2.5, 3, 4, 5, ...) between low and high for a log axis.

    Matplotlib's own log ticks are powers of ten, and a loss from 5.5 down to 1.7 holds none.
    """
    mantissas = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
    ticks = []
    for exponent in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        ticks += [m * 10**exponent for m in mantissas if low <= m * 10**exponent <= high]
    while len(ticks) > 9:  # a wide range: every other tick
        ticks = ticks[::2]
    return ticks


def plot_loss(records: list[dict], path: str | os.PathLike, title: str = "loss", x: str = "iter",
              steps: list[dict] | None = None) -> Path:
    """Plot every ``*loss*`` column of ``records`` against ``x`` and save a PNG.

    With ``steps`` (the rows of steps.jsonl), the per-step training loss is drawn too: the raw
    values faint, a smoothed curve over them, and the evaluation points on top. Losses that are
    all positive get a log y-axis, so the long tail of training is not squashed flat by the high
    loss of the first steps. Missing values (None, e.g. a NaN loss) are left out.
    """
    path = Path(path)
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    plotted: list[float] = []  # every y value drawn, to choose the axis

    if steps:
        if x != "iter":
            raise ValueError(f"steps are logged per iteration; plot them with x='iter', not x={x!r}")
        points = [(r["iter"], r["loss"]) for r in steps if r.get("loss") is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color="C0", alpha=0.2, linewidth=0.6)
            # ~2% of the run: flattens the batch-to-batch noise, keeps the shape of the curve.
            ax.plot(xs, _smooth(list(ys), span=len(ys) / 50), color="C0", linewidth=1.4,
                    label="train loss of each step (smoothed)")
            plotted += ys

    keys = sorted({k for r in records for k in r if "loss" in k})
    if steps:
        keys = [k for k in keys if k != "step_loss"]  # the last step's loss: the per-step curve has it
    for i, key in enumerate(keys):
        points = [(r[x], r[key]) for r in records if r.get(key) is not None and x in r]
        if points:
            xs, ys = zip(*points)
            color = {"train_loss": "C0", "val_loss": "C1"}.get(key, f"C{i + 2}")
            style = dict(marker="o" if len(points) < 30 else None, markersize=4, label=key)
            if steps:  # evaluations on top of the per-step curve, with their last value
                style.update(zorder=3, label=f"{key}, evaluated (last {ys[-1]:.3f})")
                if key == "train_loss":  # the per-step curve already draws the line: points only
                    style.update(marker="o", linestyle="none", markerfacecolor="white")
            ax.plot(xs, ys, color=color, **style)
            plotted += ys

    if not keys and not steps:  # an empty plot would hide a misnamed column; say so instead
        raise ValueError(f"nothing to plot in {path.name}: the records have no '*loss*' column")
    if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 1.5:
        low, high = min(plotted) / 1.03, max(plotted) * 1.03
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(FixedLocator(_log_ticks(low, high)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(x)
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


# --- Per-task bar chart (parts 6-9: one bar per model and task) --------------------------------------------


def plot_task_bars(scores: dict[str, dict[str, float]], path: str | os.PathLike, title: str = "held-out accuracy",
                   ylabel: str = "exact match") -> Path:
    """Grouped bars: ``scores[model][task]`` in [0, 1], one group per task, one colour per model, each bar
    labelled with its value. Tasks missing for a model are left out of its bars."""
    path = Path(path)
    tasks = list(dict.fromkeys(task for per_task in scores.values() for task in per_task))
    fig = Figure(figsize=(max(6.0, 0.9 * len(tasks) + 2), 4.2), dpi=120)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(scores))
    for i, (model, per_task) in enumerate(scores.items()):
        xs = [t + (i - (len(scores) - 1) / 2) * width for t, task in enumerate(tasks) if task in per_task]
        ys = [per_task[task] for task in tasks if task in per_task]
        bars = ax.bar(xs, ys, width=width, label=model, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{y:.2f}".lstrip("0") if y < 1 else "1" for y in ys], fontsize=6, padding=1)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
