"""The C++ row kernels at every ISA level they are built for (AVX-512, AVX2 + FMA, baseline).

The kernels choose their level once per process, so a CI machine with AVX-512 would only ever
test that one. Each lower level runs the C++ tests of the row kernels (the beam search's frame
top-k and log-sum-exp, greedy and beam decoding, the Q-CTC loss) in a subprocess with
NARVL_CPU_LEVEL capping the dispatch."""
import os
import subprocess
import sys

import pytest

import narvl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KERNEL_TESTS = [
    "tests/test_cpu_isa.py::test_level_in_force",
    "tests/test_decode.py::test_cpu_frame_topk_logits_lse_and_nan",
    "tests/test_decode.py::test_cpu_frame_topk_long_rows",
    "tests/test_decode.py::test_greedy_matches_reference",
    "tests/test_decode.py::test_beam_matches_reference",
    "tests/test_ctc.py::test_qctc_matches_reference",
    "tests/test_ctc.py::test_cpp_large_rows_match_reference",
]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _expected_level():
    """x86-64-v4 needs AVX-512 F/BW/CD/DQ/VL, v3 AVX2 + FMA (+ BMI, F16C, ...): the level the CPU
    flags allow, capped by NARVL_CPU_LEVEL."""
    flags = _cpu_flags()
    if flags is None:
        return None
    level = 0
    if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= flags:
        level = 3
        if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
            level = 4
    cap = os.environ.get("NARVL_CPU_LEVEL")
    if cap in ("0", "3"):
        level = min(level, int(cap))
    return level


def _native():
    if not narvl.native_available():
        pytest.fail("narvl._C is not built: the C++ row kernels cannot be tested")
    from narvl import _C
    return _C


def test_level_in_force():
    """The level the kernels dispatch to is the CPU's, or NARVL_CPU_LEVEL's when that is lower."""
    want = _expected_level()
    if want is None:
        pytest.skip("no /proc/cpuinfo on this system: the CPU's level is unknown here")
    assert _native()._cpu_level() == want


@pytest.mark.parametrize("level", [3, 0])
def test_row_kernels_at_lower_levels(level):
    C = _native()
    if C._cpu_level() < level:
        pytest.skip(f"this CPU runs below level {level}: that level is tested where it is native")
    if C._cpu_level() == level:
        pytest.skip(f"level {level} is this CPU's own: the rest of the suite tests it")
    env = dict(os.environ, NARVL_CPU_LEVEL=str(level))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not triton",
           *ROW_KERNEL_TESTS]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]
