"""narvl.settings: every environment switch read in one place, documented, parsed as documented."""
import ast
import pathlib
import re

import pytest

from narvl import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_sources():
    for d in ("narvl", "kernels"):
        for p in (ROOT / d).rglob("*.py"):
            if "reference" not in p.parts:
                yield p


def test_python_reads_the_environment_only_in_settings():
    """No module but narvl/settings.py touches os.environ or os.getenv."""
    readers = set()
    for p in _python_sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.add(p.relative_to(ROOT).as_posix())
    assert readers == {"narvl/settings.py"}


def test_every_switch_is_known_and_documented():
    """The C++ kernels' getenv names and every NARVL_* name in the Python sources are in
    settings.SWITCHES; the README's table lists exactly those switches."""
    cpp = set()
    for p in (ROOT / "csrc").glob("*.cpp"):
        cpp |= set(re.findall(r'getenv\("([A-Z_]+)"\)', p.read_text()))
    assert cpp and cpp <= set(settings.SWITCHES)
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Environment switches"):]
    table = table[: table.index("\n## ")]
    assert set(re.findall(r"^\| `([A-Z_]+)` \|", table, flags=re.M)) == set(settings.SWITCHES)


@pytest.mark.parametrize("value, on, strict", [(None, True, False), ("1", True, False), ("0", False, False),
                                               ("off", False, False), ("False", False, False),
                                               ("strict", True, True), (" STRICT ", True, True)])
def test_check_values(monkeypatch, value, on, strict):
    if value is None:
        monkeypatch.delenv("NARVL_CHECK", raising=False)
    else:
        monkeypatch.setenv("NARVL_CHECK", value)
    assert settings.checks_enabled() is on and settings.strict_checks() is strict


def test_backend_and_route_values(monkeypatch):
    monkeypatch.delenv("NARVL_BACKEND", raising=False)
    monkeypatch.delenv("NARVL_LINEAR_ROUTE", raising=False)
    assert settings.backend() == "auto" and settings.linear_route() == "auto"
    monkeypatch.setenv("NARVL_BACKEND", " CPP ")
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "aten")
    assert settings.backend() == "cpp" and settings.linear_route() == "aten"
    monkeypatch.setenv("NARVL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NARVL_BACKEND"):
        settings.backend()
    monkeypatch.setenv("NARVL_BACKEND", "reference")
    with pytest.raises(ValueError, match="test oracles"):
        settings.backend()
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "mkl")
    with pytest.raises(ValueError, match="NARVL_LINEAR_ROUTE"):
        settings.linear_route()
    monkeypatch.setenv("NARVL_CPU_FASTPATH", "0")
    assert not settings.cpu_fastpath()
    assert settings.current()["NARVL_CPU_FASTPATH"] == "0" and set(settings.current()) == set(settings.SWITCHES)
