"""The training run's loss plot, `loss.png` beside its checkpoints (matplotlib, an optional extra).
"""

from __future__ import annotations

import csv
import os

from . import logger
from .fileio import atomic_write


def plot_losses(log_dir: str, key: str = "loss") -> str | None:
    """
    Plot `key` against `step` from the run's progress.csv into `loss.png` beside it (the whole
    run, resumes included). matplotlib is optional: without it, one log line and no plot.

    :return: the PNG's path, or None when there is nothing to plot or no matplotlib.
    """
    csv_path = os.path.join(log_dir, "progress.csv")
    if "://" in log_dir or not os.path.exists(csv_path):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a cluster node
        import matplotlib.pyplot as plt
    except ImportError:
        logger.log("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get(key) and r.get("step")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([float(r["step"]) for r in rows], [float(r[key]) for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log" if all(float(r[key]) > 0 for r in rows) else "linear")
    path = os.path.join(log_dir, f"{key}.png")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path
