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


def test_without_the_native_build_cpu_ctc_fails_loudly_and_the_rest_works():
    """torchaudio's rule: a missing native build fails loudly where a feature needs it (with the
    install command), never by a silent slow fallback; the ops still exist (the schemas come from
    narvl/_schema.py), attention still runs on CPU (ATen), and the Triton kernels still serve the
    ops under the interpreter."""
    code = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "narvl._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, narvl
assert not narvl.native_available()
x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
t = torch.tensor([[1, 2], [3, 0]]); tl = torch.tensor([2, 1])
for fn in (lambda: narvl.qctc_loss(x, t, tl, blank=6),
           lambda: narvl.ctc_greedy_decode(x.detach()),
           lambda: torch.ops.narvl.qctc_fwd(x.detach(), t, tl, torch.tensor([5, 5]), 6)):
    try:
        fn()
    except RuntimeError as e:
        assert "not built" in str(e) and "pip install" in str(e), e
    else:
        raise SystemExit("a CPU op that needs narvl._C ran without it")
q = torch.randn(2, 2, 3, 8)
out = narvl.query_attention(q, q, q)
assert out.shape == q.shape
os.environ["NARVL_BACKEND"] = "triton"
from narvl.reference import qctc_loss_reference
l = narvl.qctc_loss(x, t, tl, blank=6)
l.backward()
assert torch.allclose(l, qctc_loss_reference(x.detach(), t, tl, blank=6))
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
