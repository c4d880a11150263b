"""narvl.plots.training_curve: the PNG train.py writes beside metrics.json."""
import builtins
import math

import pytest

from narvl.plots import curve_points, training_curve

PNG = b"\x89PNG\r\n\x1a\n"


def test_curve_is_a_png_and_skips_non_finite_steps(tmp_path):
    pytest.importorskip("matplotlib", reason="the optional matplotlib (narvl[plot]) is not installed")
    losses = [9.0 / (1 + 0.1 * i) for i in range(60)]
    losses[7] = None  # train.py records a non-finite step as None
    losses[9] = math.nan
    out = tmp_path / "curve.png"
    assert training_curve(out, losses, "caption / narvl", smooth=10) == str(out)
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]  # no temporary file left
    import matplotlib
    backend = matplotlib.get_backend()
    training_curve(out, losses, "again")
    assert matplotlib.get_backend() == backend  # pyplot's backend untouched
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no artists" legend warning for an empty curve
        assert training_curve(tmp_path / "empty.png", [], "no steps") == str(tmp_path / "empty.png")
        assert training_curve(tmp_path / "nan.png", [None, math.nan], "all skipped") == str(tmp_path / "nan.png")


def test_curve_points_against_a_plain_loop():
    """The drawn points: finite steps only (numbered from 1), the running mean of the last
    ``smooth`` of them, and the count of the others."""
    np = pytest.importorskip("numpy")
    losses = [5.0, None, 4.0, math.inf, 3.0, 2.5, np.float32(2.0), math.nan, 1.5]
    steps, vals, run, skipped = curve_points(losses, 3)
    assert steps == [1, 3, 5, 6, 7, 9] and vals == [5.0, 4.0, 3.0, 2.5, 2.0, 1.5] and skipped == 3
    want = [sum(vals[max(0, k - 2):k + 1]) / len(vals[max(0, k - 2):k + 1]) for k in range(len(vals))]
    assert run == pytest.approx(want, abs=1e-12)
    assert curve_points([None, math.nan], 5) == ([], [], [], 2)


def test_curve_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("no matplotlib here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert training_curve(tmp_path / "curve.png", [1.0, 0.5], "t") is None
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("losses, smooth, exc, word", [
    ("1.0 0.5", 5, TypeError, "losses"), ([1.0, "x"], 5, TypeError, "losses"), ([1.0, True], 5, TypeError, "losses"),
    ([1.0], 0, ValueError, "smooth"), ([1.0], 2.0, TypeError, "smooth"), ([1.0], 5, TypeError, "path"),
])
def test_curve_bad_input(tmp_path, losses, smooth, exc, word):
    path = None if word == "path" else tmp_path / "c.png"
    with pytest.raises(exc, match=word):
        training_curve(path, losses, "t", smooth=smooth)


def test_curve_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        training_curve(tmp_path / "nope" / "c.png", [1.0], "t")
