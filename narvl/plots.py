"""Training curves as PNG files (``train.py`` writes ``curve.png`` beside ``metrics.json``).

matplotlib is an optional extra (``pip install 'narvl[plot]'``); without it ``training_curve``
writes nothing and returns ``None``. It draws on its own ``matplotlib.figure.Figure`` (the Agg
renderer), so pyplot's state and backend are left as they were.
"""
from __future__ import annotations

import math
import numbers
import os
import tempfile


def curve_points(losses, smooth: int):
    """What ``training_curve`` draws: (steps, losses, running means over the last ``smooth``
    finite steps, count of non-finite steps left out); steps count from 1."""
    pts = [(i + 1, float(v)) for i, v in enumerate(losses) if v is not None and math.isfinite(v)]
    steps = [p[0] for p in pts]
    vals = [p[1] for p in pts]
    run, acc = [], 0.0
    for k, v in enumerate(vals):
        acc += v - (vals[k - smooth] if k >= smooth else 0.0)
        run.append(acc / min(k + 1, smooth))
    return steps, vals, run, len(losses) - len(pts)


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
        TypeError: ``path`` is not a path, ``losses`` is not a sequence of real numbers /
            ``None``, or ``smooth`` is not an int.
        ValueError: ``smooth`` < 1, or ``path``'s directory does not exist.
    """
    if isinstance(smooth, bool) or not isinstance(smooth, int):
        raise TypeError(f"smooth must be an int, got {type(smooth).__name__}")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    if isinstance(losses, (str, bytes)) or not hasattr(losses, "__len__"):
        raise TypeError(f"losses must be a sequence of numbers, got {type(losses).__name__}")
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)) for v in losses):
        raise TypeError("losses must hold real numbers or None")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise ValueError(f"path {os.fspath(path)!r}: directory {folder!r} does not exist")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    steps, vals, run, skipped = curve_points(losses, smooth)
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.subplots()
    if steps:
        ax.plot(steps, vals, lw=0.6, alpha=0.45, label="loss per step")
        ax.plot(steps, run, lw=1.6, label=f"mean of {smooth} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if steps:
        ax.legend(title=f"{skipped} non-finite steps left out" if skipped else None, fontsize=8)
    elif skipped:
        ax.text(0.5, 0.5, f"{skipped} non-finite steps left out", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # readable by all, like metrics.json (mkstemp makes it private)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.fspath(path)
