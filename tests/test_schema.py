import os
import subprocess
import sys

import torch

import narvl
from narvl._schema import SCHEMAS


def test_native_extension_is_built():
    # CI builds the extension; a silent fallback to the reference would hide a broken build.
    assert narvl.native_available()


def test_python_schemas_match_the_cpp_block():
    for name, schema in SCHEMAS.items():
        op = getattr(torch.ops.narvl, name).default
        assert str(op._schema) == f"narvl::{name}{schema}"
    names = {n for n in dir(torch.ops.narvl) if not n.startswith("_")}
    assert set(SCHEMAS) <= names


def test_import_and_ops_work_without_the_native_build():
    code = r"""
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "narvl._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, narvl
assert not narvl.native_available()
x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
t = torch.tensor([[1, 2], [3, 0]]); tl = torch.tensor([2, 1])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    l = narvl.qctc_loss(x, t, tl, blank=6)
    assert any("not built" in str(m.message) for m in w)
l.backward()
a, _, _, _ = torch.ops.narvl.qctc_fwd(x.detach(), t, tl, torch.tensor([5, 5]), 6)
ref = narvl.reference.qctc_terms_reference(x.detach(), t, tl, torch.tensor([5, 5]), 6)[0]
assert torch.allclose(a, ref)
import os
os.environ["NARVL_BACKEND"] = "cpp"
try:
    narvl.qctc_loss(x, t, tl, blank=6)
except RuntimeError as e:
    assert "not built" in str(e)
else:
    raise SystemExit("cpp backend without a build did not fail")
print("OK")
"""
    env = dict(os.environ)
    env.pop("NARVL_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
