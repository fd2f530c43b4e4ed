"""workbench.utils: the CPU numerics pinning and its fingerprint."""

import json
import os
import subprocess
import sys

import torch

from workbench.utils import PINNED_CPU_ENV, numerics_fingerprint, same_numerics

# torch's x86 Linux wheels link MKL into libtorch_cpu.so, where utils.mkl_code_path reads it
MKL_READABLE = torch.backends.mkl.is_available() and sys.platform == "linux"
PROBE = ("import json, workbench, torch; torch.ones(2) @ torch.ones(2); "
         "print(json.dumps(workbench.utils.numerics_fingerprint()))")


def _fingerprint_in_child(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_ENV and k != "WORKBENCH_CPU_NUMERICS"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def test_importing_workbench_pins_the_cpu_code_path():
    pinned = _fingerprint_in_child()
    assert pinned["cpu_capability"] == "AVX2"
    assert {k: pinned[k] for k in PINNED_CPU_ENV} == PINNED_CPU_ENV
    # Intel documents MKL's instruction-set branches (MKL_CBWR=AVX2) for Intel CPUs only: elsewhere (an
    # AMD EPYC, where CI once ran) MKL keeps the STRICT flag but runs its AUTO branch, and says so
    if MKL_READABLE and "Intel" in pinned["cpu_model"]:  # MKL itself says it took the pinned branch
        assert pinned["mkl_branch"] == "AVX2,STRICT" and pinned["mkl_auto_branch"] not in ("OFF", "AUTO")
    elif MKL_READABLE:  # the fingerprint records the fallback, so bundles do not claim bit-identity
        assert pinned["mkl_branch"] in ("AVX2,STRICT", "AUTO,STRICT")


def test_the_pinning_can_be_turned_off_and_never_overrides_the_user():
    native = _fingerprint_in_child(WORKBENCH_CPU_NUMERICS="native")
    assert all(native[k] is None for k in PINNED_CPU_ENV)
    compatible = _fingerprint_in_child(MKL_CBWR="COMPATIBLE")
    if MKL_READABLE:
        assert native["mkl_branch"] == "OFF" and compatible["mkl_branch"] == "COMPATIBLE"
    assert native["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX")
    mine = _fingerprint_in_child(ATEN_CPU_CAPABILITY="default")
    assert mine["cpu_capability"] == "DEFAULT" and mine["MKL_CBWR"] == "AVX2,STRICT"


def test_same_numerics_ignores_the_cpu_model_only():
    here = numerics_fingerprint()
    assert same_numerics(here, {**here, "cpu_model": "another CPU"})
    assert not same_numerics(here, {**here, "threads": here["threads"] + 1})
    assert not same_numerics(here, {**here, "cpu_capability": "AVX512" if here["cpu_capability"] != "AVX512" else "AVX2"})
    assert not same_numerics(here, {**here, "MKL_CBWR": None})
    if MKL_READABLE:
        assert not same_numerics(here, {**here, "mkl_branch": "AUTO"})
        assert not same_numerics(here, {**here, "mkl_auto_branch": "AVX2" if here["mkl_auto_branch"] != "AVX2" else "AVX512_E1"})


def test_same_numerics_reads_records_without_the_mkl_code_path():
    here = numerics_fingerprint()
    old = {k: v for k, v in here.items() if not k.startswith("mkl_")}  # written before it was recorded
    assert same_numerics(here, old) and same_numerics(old, here)


def test_the_portable_mode_takes_mkl_vendor_neutral_branch_and_a_bad_mode_is_named():
    portable = _fingerprint_in_child(WORKBENCH_CPU_NUMERICS="portable")
    assert portable["MKL_CBWR"] == "COMPATIBLE" and portable["cpu_capability"] == "AVX2"
    assert portable["onednn_convolutions"] is False
    if MKL_READABLE:
        assert portable["mkl_branch"] == "COMPATIBLE"
    assert not same_numerics(portable, _fingerprint_in_child())
    clean = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_ENV}
    bad = subprocess.run([sys.executable, "-c", "import workbench"], env={**clean, "WORKBENCH_CPU_NUMERICS": "fast"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "WORKBENCH_CPU_NUMERICS='fast' is not a numerics mode" in bad.stderr
    assert "pinned, portable, native" in bad.stderr
