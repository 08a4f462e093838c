"""numba code generation settings (deqntk_dist.jit)."""

import os
import subprocess
import sys

import pytest

from deqntk_dist import jit

_SNIPPET = (
    "import os, deqntk_dist, numba\n"
    "numba.njit(lambda x: x + 1)(1)\n"
    "from numba.core.registry import cpu_target\n"
    "tm = cpu_target.target_context.codegen()._tm_features\n"
    "print(repr(os.environ.get('NUMBA_CPU_FEATURES')), tm.endswith(',-prefer-256-bit'))\n"
)


def _run(env_extra: dict, drop=("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "DEQNTK_WIDE_VECTORS")):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _SNIPPET], env=env, capture_output=True, text=True, check=True
    )
    features, tuned = out.stdout.split()
    return eval(features), tuned == "True"  # noqa: S307 -- our own repr() of a str or None


def _host_has_avx512() -> bool:
    import llvmlite.binding as llvm

    return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


@pytest.mark.skipif(not _host_has_avx512(), reason="the setting applies to AVX-512 hosts only")
def test_wide_vectors_on_avx512_hosts_reach_the_code_generator():
    features, tuned = _run({})
    assert features.endswith(",-prefer-256-bit") and "+avx512f" in features.split(",")
    assert tuned  # the target machine numba compiles with has the flag


@pytest.mark.parametrize(
    "env",
    [
        {"NUMBA_CPU_FEATURES": "+avx2,+fma"},
        {"NUMBA_CPU_NAME": "generic"},
        {"DEQNTK_WIDE_VECTORS": "0"},
    ],
)
def test_user_settings_win(env):
    features, tuned = _run(env)
    assert features == env.get("NUMBA_CPU_FEATURES") and not tuned


def test_no_avx512_or_an_existing_code_generator_leaves_numba_alone(monkeypatch):
    import llvmlite.binding as llvm

    class Features:
        def flatten(self):
            return "+avx2,+fma,-avx512f"

    for var in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "DEQNTK_WIDE_VECTORS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(llvm, "get_host_cpu_features", Features)
    assert jit.prefer_wide_vectors() is False and "NUMBA_CPU_FEATURES" not in os.environ
    monkeypatch.undo()
    # this test process has compiled already: too late to change anything
    for var in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "DEQNTK_WIDE_VECTORS"):
        monkeypatch.delenv(var, raising=False)
    assert jit._codegen_built()
    assert jit.prefer_wide_vectors() is False and "NUMBA_CPU_FEATURES" not in os.environ
