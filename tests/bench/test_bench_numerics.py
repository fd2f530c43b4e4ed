"""bench_numerics.py's reference lookup: which recorded machines a digest agrees with, and --record."""

import json

import pytest


REF = {
    "Xeon": {"components": {"portable": {"gemm (MKL)": "aaa"}, "pinned": {"gemm (MKL)": "bbb"}}},
    "EPYC": {"components": {"portable": {"gemm (MKL)": "aaa"}}, "runs": {"lora": {"pinned/2": "ccc"}}},
}


def test_same_as_names_every_machine_with_that_digest_and_only_those(load_bench):
    bench = load_bench("bench_numerics")
    assert bench.same_as(REF, "components", "portable", "gemm (MKL)", "aaa") == "Xeon, EPYC"
    assert bench.same_as(REF, "components", "pinned", "gemm (MKL)", "bbb") == "Xeon"
    assert bench.same_as(REF, "components", "pinned", "gemm (MKL)", "zzz") == "-"
    assert bench.same_as(REF, "runs", "lora", "pinned/2", "ccc") == "EPYC"
    assert bench.same_as(REF, "runs", "full", "pinned/2", "ccc") == "-"  # not measured there: no claim


def test_record_merges_into_the_machines_entry(tmp_path, capsys, load_bench):
    bench = load_bench("bench_numerics")
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(REF))
    bench.record("EPYC", "runs", {"lora": {"portable/1": "ddd"}, "full": {"pinned/2": "eee"}},
                 {"cpu_model": "AMD EPYC", "mkl_auto_branch": None}, path=path)
    got = json.loads(path.read_text())
    assert got["EPYC"]["runs"] == {"lora": {"pinned/2": "ccc", "portable/1": "ddd"}, "full": {"pinned/2": "eee"}}
    assert got["EPYC"]["components"] == REF["EPYC"]["components"]  # the other section is kept
    assert got["EPYC"]["cpu_model"] == "AMD EPYC" and "mkl_auto_branch" not in got["EPYC"]
    assert got["Xeon"] == REF["Xeon"]


def test_record_needs_a_label(load_bench):
    bench = load_bench("bench_numerics")
    assert bench._label_arg(["--components"]) is None
    assert bench._label_arg(["--record", "My CPU"]) == "My CPU"
    with pytest.raises(SystemExit, match="needs a label"):
        bench._label_arg(["--record"])
    with pytest.raises(SystemExit, match="needs a label"):
        bench._label_arg(["--record", "--components"])


def test_the_committed_reference_file_reads(load_bench):
    bench = load_bench("bench_numerics")
    reference = bench.load_reference()
    assert reference, "tests/bench/numerics_reference.json is missing or empty"
    for label, machine in reference.items():
        for section in ("components", "runs"):
            for group, digests in machine.get(section, {}).items():
                assert all(isinstance(v, str) and v for v in digests.values()), (label, section, group)
