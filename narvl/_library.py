"""Makes sure the ``narvl`` operator schemas exist, with or without the native build."""
import torch

from . import _backend
from ._schema import SCHEMAS

if not _backend.NATIVE:
    # Same schemas as csrc/narvl.cpp; CPU kernels then come from the reference (narvl/ops).
    _lib = torch.library.Library("narvl", "DEF")
    for _name, _schema in SCHEMAS.items():
        _lib.define(_name + _schema)
