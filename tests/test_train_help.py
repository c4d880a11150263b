"""train.py --help: a full one-sentence description and help text for every argument."""
import argparse
import contextlib
import io
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402


def _help_text():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    return out.getvalue()


def _parser():
    parsers = []
    orig = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        parsers.append(self)
        return orig(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            train.parse_args(["--help"])
    return parsers[0]


def test_description_is_a_full_sentence():
    desc = _parser().description
    assert desc and desc[0].isupper() and desc.endswith("."), desc
    assert desc.count(". ") == 0, desc  # one sentence
    assert len(desc.split()) >= 8
    text = " ".join(_help_text().split())
    assert desc in text


def test_every_argument_has_help():
    p = _parser()
    missing = [a.option_strings[0] for a in p._actions if a.option_strings and not (a.help or "").strip()]
    assert not missing, f"arguments without help text: {sorted(missing)}"


def test_default_not_printed_twice():
    text = " ".join(_help_text().split())
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    out = text.split("options:")[1].split("--out OUT")[1].split("--steps")[0]
    assert out.count("default") == 1, out
