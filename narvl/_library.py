"""Makes sure the ``narvl`` operator schemas exist, with or without the native build."""
import torch

from . import _backend
from ._schema import PY_SCHEMAS, SCHEMAS

if not _backend.NATIVE:
    # Same schemas as csrc/narvl.cpp; CPU kernels then come from the reference (narvl/ops).
    _lib = torch.library.Library("narvl", "DEF")
    for _name, _schema in SCHEMAS.items():
        _lib.define(_name + _schema)
else:
    # A native build older than the sources lacks the newest ops: define them here, so that
    # narvl imports and everything else runs; their CPU kernels then ask for a rebuild.
    _missing = [n for n in SCHEMAS if not hasattr(torch.ops.narvl, n)]
    if _missing:
        _lib = torch.library.Library("narvl", "FRAGMENT")
        for _name in _missing:
            _lib.define(_name + SCHEMAS[_name])

_py_lib = torch.library.Library("narvl", "FRAGMENT")
for _name, _schema in PY_SCHEMAS.items():
    if not hasattr(torch.ops.narvl, _name):
        _py_lib.define(_name + _schema)
