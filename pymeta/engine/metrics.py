"""Accuracy with 95% confidence intervals, and the run's metric files (CSV, JSONL, PNG)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from .._atomic import atomic_open, json_text

COLUMNS = ["step", "split", "loss", "acc", "mse", "ci95", "lr", "tasks_per_s", "elapsed_s"]


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (1.96 standard errors)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    if v.numel() == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel())


class MetricsLog:
    """Rows of metrics kept in memory and appended to ``metrics.csv`` and ``metrics.jsonl``.

    The rows travel inside checkpoints, so a resumed run rewrites both files exactly as they
    were at the checkpoint and drops what a killed run logged after it.

    Example:
        >>> import tempfile
        >>> from pymeta.engine.metrics import MetricsLog
        >>> log = MetricsLog(tempfile.mkdtemp())
        >>> log.append({"step": 1, "split": "train", "loss": 0.5, "acc": 0.8})
        >>> log.csv_path.read_text().splitlines()[1].startswith("1,train,0.5")
        True
    """

    def __init__(self, out_dir: str | Path, rows: list | None = None):
        self.out_dir = Path(out_dir)
        self.rows: list[dict] = list(rows or [])
        self._rewrite()

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "metrics.csv"

    @property
    def jsonl_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def plot_path(self) -> Path:
        return self.out_dir / "curves.png"

    def _rewrite(self) -> None:
        with atomic_open(self.jsonl_path, "w") as f:
            f.writelines(json_text(r) + "\n" for r in self.rows)
        with atomic_open(self.csv_path, "w") as f:
            writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json_text(row) + "\n")
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(row)

    def plot(self, train_label: str = "train", val_label: str = "validation",
             metric: str = "acc") -> Path:
        """Draw the learning curves (train loss and ``metric``, validation ``metric`` ± CI;
        ``metric`` is ``"acc"`` or ``"mse"``) to PNG."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.rows if r["split"] == "train"]
        val = [r for r in self.rows if r["split"] == "val"]
        title = {"acc": "accuracy", "mse": "query MSE"}[metric]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=train_label)
        ax_loss.set(xlabel="step", ylabel="loss", title="loss")
        ax_acc.plot([r["step"] for r in train], [r[metric] for r in train], label=train_label)
        if val:
            ax_acc.errorbar([r["step"] for r in val], [r[metric] for r in val],
                            yerr=[r["ci95"] for r in val], marker="o", capsize=3,
                            label=f"{val_label} (95% CI)")
        ax_acc.set(xlabel="step", ylabel=title, title=title)
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        with atomic_open(self.plot_path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        return self.plot_path
