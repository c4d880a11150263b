"""README.md: every ```python block runs as written (each in a fresh namespace, in a temporary
directory), and the first code block is the two commands CI reads (.ci/run)."""
import os
import re
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks(lang):
    text = open(README, encoding="utf-8").read()
    return re.findall(r"^```" + lang + r"\n(.*?)^```$", text, flags=re.S | re.M)


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = PYTHON_BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_ofa reports what it loaded as a warning
        exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def test_readme_first_block_is_the_ci_commands():
    text = open(README, encoding="utf-8").read()
    first = re.search(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)
    assert first.group(1) == "bash"
    lines = first.group(2).splitlines()
    assert lines[0] == ("pip install torch==2.13.0 && pip install --no-build-isolation -e \".[test]\" "
                        "&& python train.py --task caption --arch both --out runs/caption")
    assert lines[1] == "python -m pytest -q -n auto tests"
