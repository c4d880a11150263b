import os

# Triton reads TRITON_INTERPRET when kernels are defined: set it before narvl.kernels is imported,
# so that the Triton kernels run on CPU tensors in this suite.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import narvl  # noqa: E402

# Under pytest-xdist (`-n 2`) each worker process takes one core: one intra-op thread each, so the
# workers do not oversubscribe the machine. Tests that need several threads set them themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

# Native kernels on CPU, and the Triton kernels (interpreted on CPU; compiled on CUDA).
KERNEL_BACKENDS = ["cpp", "triton"]


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cpp" and not narvl.native_available():
        pytest.fail("narvl._C is not built: the C++ backend cannot be tested")
    if request.param == "triton" and not HAVE_TRITON:
        pytest.fail("triton is not installed: the Triton backend cannot be tested")
    monkeypatch.setenv("NARVL_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
