"""What one eager call of a narvl op launches on a GPU, counted on a machine without one.

``LaunchCounter`` records, in call order:

* ``("triton", name)``: a Triton kernel launch (``kernel[grid](...)``, compiled or interpreted);
* ``("aten", name)``: an ATen op that computes, copies or fills: on CUDA tensors, one kernel
  launch (or copy) each. Views, metadata ops and uninitialised allocations (``empty*``) launch
  nothing and are not recorded;
* ``("sync", name)``: a host read of a tensor's value (``.item()``, ``bool()``, ``int()``): on
  CUDA tensors, a synchronisation. ``syncs(outside_kernels=True)`` leaves out those inside a
  narvl op's kernel, where under the interpreter a launcher reads what a GPU would assert.

It looks inside narvl's registered ops (``torch.ops.narvl.*``), so the launcher's own
allocations and fills count, while a Triton kernel's internals (the interpreter's tensor ops)
do not. Run it on CPU tensors routed to the Triton kernels: under ``TRITON_INTERPRET=1`` (the
test suite), or under the stub driver of ``bench/gpu_resources.py`` (``bench/host_overhead.py``),
where launches are no-ops and the host path is what is timed.

    with LaunchCounter() as c:
        narvl.qctc_loss(x, targets, lengths).backward()
    c.launches()  # e.g. [('triton', '_row_kernel'), ...]
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_aten = torch.ops.aten

# allocate without writing, or only convert / reshape when needed (their copies show up as
# _to_copy / clone / copy_)
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "to",
              "contiguous", "reshape", "view", "view_as", "expand_as", "lift_fresh", "detach",
              "alias", "type_as", "result_type"}
_SYNC = {"_local_scalar_dense", "is_nonzero", "item", "equal", "allclose"}


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _name(func) -> str:
    return func._schema.name.split("::")[-1]


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self._saved = []
        self._in_launch = False
        self._op_depth = 0
        self._depth = 0

    # --------------------------------------------------------------------------- torch ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if func.namespace == "narvl":  # run its kernel with this mode on, to see inside it
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            key = torch._C.DispatchKey.CUDA if "cuda" in devices else torch._C.DispatchKey.CPU
            self._op_depth += 1
            try:
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
            finally:
                self._op_depth -= 1
        if name in _SYNC:
            self.events.append(("sync", name) if self._op_depth == 0 else ("sync-in-op", name))
        elif func.namespace == "aten" and name not in _NO_LAUNCH and not _is_view(func):
            self.events.append(("aten", name))
        return func(*args, **kwargs)

    # ----------------------------------------------------------------------- Triton launches
    def __enter__(self):
        self._depth += 1  # re-entered for each narvl op (see __torch_dispatch__): patch once
        if self._depth > 1:
            return super().__enter__()
        from triton.runtime.jit import JITFunction
        from triton.runtime.interpreter import InterpretedFunction
        counter = self
        for cls in (JITFunction, InterpretedFunction):
            orig = cls.run

            def run(fn, *args, _orig=orig, **kwargs):
                outer = not counter._in_launch
                if outer and not kwargs.get("warmup", False):
                    counter.events.append(("triton", getattr(getattr(fn, "fn", fn), "__name__", "?")))
                counter._in_launch = True
                try:
                    with _disable_current_modes():  # the interpreter's own tensor ops: not launches
                        return _orig(fn, *args, **kwargs)
                finally:
                    counter._in_launch = not outer
            cls.run = run
            self._saved.append((cls, orig))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0:
                for cls, orig in self._saved:
                    cls.run = orig
                self._saved.clear()

    # ------------------------------------------------------------------------------ results
    def launches(self) -> list[tuple[str, str]]:
        return [e for e in self.events if e[0] in ("triton", "aten")]

    def syncs(self, outside_kernels: bool = False) -> list[str]:
        kinds = ("sync",) if outside_kernels else ("sync", "sync-in-op")
        return [n for k, n in self.events if k in kinds]
