"""Training curves as PNG files (``train.py`` writes ``curve.png`` beside ``metrics.json``).

matplotlib is an optional extra (``pip install 'narvl[plot]'``); without it ``training_curve``
writes nothing and says so.
"""
from __future__ import annotations

import math
import os
import tempfile


def training_curve(path, losses, title: str, smooth: int = 25) -> str | None:
    """Plots per-step training losses and their running mean over ``smooth`` steps into the PNG
    file ``path`` (written atomically). Steps whose loss was not finite (``None``) are left out
    and counted in the legend.

    Args:
        path: the PNG file to write (its directory must exist).
        losses: the per-step losses, a sequence of floats or ``None``.
        title: the figure's title (e.g. the run's task, arch and final metric).
        smooth: the running mean's window in steps (>= 1).
    Returns:
        ``path``, or ``None`` when matplotlib is not installed (nothing written).
    Raises:
        TypeError: ``losses`` is not a sequence of numbers / ``None``, or ``smooth`` not an int.
        ValueError: ``smooth`` < 1, or ``path``'s directory does not exist.
    """
    if isinstance(smooth, bool) or not isinstance(smooth, int):
        raise TypeError(f"smooth must be an int, got {type(smooth).__name__}")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    if isinstance(losses, (str, bytes)) or not hasattr(losses, "__len__"):
        raise TypeError(f"losses must be a sequence of numbers, got {type(losses).__name__}")
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in losses):
        raise TypeError("losses must hold numbers or None")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise ValueError(f"path {os.fspath(path)!r}: directory {folder!r} does not exist")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [(i + 1, float(v)) for i, v in enumerate(losses) if v is not None and math.isfinite(v)]
    skipped = len(losses) - len(pts)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    if pts:
        steps, vals = zip(*pts)
        ax.plot(steps, vals, lw=0.6, alpha=0.45, label="loss per step")
        run, acc = [], 0.0
        for k, v in enumerate(vals):
            acc += v - (vals[k - smooth] if k >= smooth else 0.0)
            run.append(acc / min(k + 1, smooth))
        ax.plot(steps, run, lw=1.6, label=f"mean of {smooth} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title=f"{skipped} non-finite steps left out" if skipped else None, fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # as an ordinary new file (mkstemp makes it private)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.fspath(path)
