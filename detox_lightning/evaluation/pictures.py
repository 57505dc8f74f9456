"""Before/after toxicity distributions, where people would rather look than read: TensorBoard
histograms at each evaluation and one PNG in the log dir (the latest evaluation's)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

from detox_lightning.io.atomic import atomic_file

PNG_NAME = "toxicity_before_after.png"


def log_histograms(loggers, scores: dict[str, tuple[np.ndarray, np.ndarray]], step: int) -> None:
    """`eval/<name>_hist_before` and `eval/<name>_hist_after` for each TensorBoard logger.

    Args:
        loggers: the trainer's loggers (others than TensorBoard's are skipped).
        scores: name (`toxicity`, `judge_toxicity`) -> (before, after) per-response values.
        step: the PPO iteration.
    """
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for name, (before, after) in scores.items():
                logger.experiment.add_histogram(f"eval/{name}_hist_before", np.ravel(before), step, bins=np.linspace(0, 1, 21))
                logger.experiment.add_histogram(f"eval/{name}_hist_after", np.ravel(after), step, bins=np.linspace(0, 1, 21))


def write_png(
    path: str | os.PathLike, scores: dict[str, tuple[np.ndarray, np.ndarray]], metrics: dict[str, float], label: str
) -> Path:
    """One panel per scorer: before and after histograms, their means, and the paired 95% CI of the change.

    Written atomically (`io.atomic`), so a reader never sees half a file.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5.5 * len(scores), 3.8), layout="constrained")
    bins = np.linspace(0, 1, 21)
    for ax, (name, (before, after)) in zip(fig.subplots(1, len(scores), squeeze=False)[0], scores.items(), strict=True):
        for values, color, which in ((before, "tab:red", "before"), (after, "tab:blue", label)):
            values = np.ravel(values)
            ax.hist(values, bins=bins, alpha=0.5, color=color, label=f"{which}: mean {values.mean():.3f}")
            ax.axvline(values.mean(), color=color, linestyle="--")
        m = f"eval/{name}"
        ax.set_title(
            f"{name.replace('_', ' ')}: delta {metrics[m + '_delta']:+.3f} "
            f"[95% CI {metrics[m + '_delta_ci_low']:+.3f}, {metrics[m + '_delta_ci_high']:+.3f}]",
            fontsize=10,
        )
        ax.set_xlabel("toxicity (probability of the toxic label)")
        ax.set_ylabel("responses")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=8)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
