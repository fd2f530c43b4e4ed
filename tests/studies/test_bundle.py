"""Studies and their bundles on a tiny two-run study: run, export, load_study, partial bundles,
damaged bundles, provenance, the CLI."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from workbench.studies import (
    DamagedBundleError,
    Study,
    StudyStore,
    export_study,
    get_study,
    list_studies,
    load_study,
    register_study,
    run_study,
    study_status,
    unregister_study,
    verify_study,
)
from workbench.studies.__main__ import main
from workbench.studies.bundle import estimate_left
from workbench.studies.study import parse_filters, select
from workbench.train import (
    DamagedRunWarning,
    RunConfig,
    RunStore,
    grid,
    load_results,
    run,
    sweep,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Runs here record 1 torch thread, whatever thread count an earlier test left behind."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NAME = "tiny-bundle"


def tiny_base(backbone) -> RunConfig:
    return RunConfig(backbone=str(backbone), task="shapes-vqa", n_shots=16, seed=13, method="lora",
                     max_steps=4, eval_every=2, patience=2, batch_size=8, pool_size=64, test_size=24, quiet=True,
                     task_options={"n_scenes": 40})


@pytest.fixture
def env(tiny_backbone, tmp_path, monkeypatch):
    """A registered two-run study (seeds 13 and 21; weights kept for seed 13), its store and results folder."""
    from types import SimpleNamespace

    store, results = tmp_path / "runs", tmp_path / "results"
    monkeypatch.setenv("WORKBENCH_RUNS", str(store))
    monkeypatch.setenv("WORKBENCH_RESULTS", str(results))
    base = tiny_base(tiny_backbone)

    def summary(s):
        return load_results(s)[["seed", "test_acc"]].sort_values("seed").reset_index(drop=True)

    study = register_study(Study(NAME, "two seeds of a tiny LoRA run", grids=lambda: grid(base, seed=[13, 21]),
                                 keep_weights=lambda cfg: cfg.seed == 13, analyses={"summary": summary}))
    try:
        yield SimpleNamespace(study=study, store=store, results=results, bundle=results / NAME, base=base)
    finally:
        unregister_study(NAME)


def run_files(path: Path) -> set:
    return {p.name for p in path.iterdir()}


# ------------------------------------------------------------------------------------------ Study
def test_study_checks_its_fields_and_registry():
    with pytest.raises(ValueError, match="name must be lower case"):
        Study("Bad Name", "", grids=list)
    with pytest.raises(ValueError, match="reserved"):
        Study("list", "", grids=list)
    with pytest.raises(ValueError, match="keep_weights must be a function"):
        Study("ok", "", grids=list, keep_weights=True)
    with pytest.raises(ValueError, match="unknown study 'galery'.*did you mean 'gallery'"):
        get_study("galery")
    # every study module of the package is listed, not only those imported so far
    assert {"gallery", "mixphm", "vlpet", "petal", "empirical"} <= set(list_studies())
    with pytest.raises(ValueError, match="returned no config"):
        Study("empty", "", grids=list).configs()


def test_gallery_is_every_method_at_three_n_and_three_seeds():
    from workbench.methods import list_methods

    study = get_study("gallery")
    configs = study.configs()
    assert len(configs) == len(list_methods()) * 9
    assert {c.method for c in configs} == set(list_methods())
    assert {c.n_shots for c in configs} == {16, 64, 1000} and {c.seed for c in configs} == {13, 21, 42}
    assert all(c.task == "shapes-vqa" and c.max_steps is None for c in configs)
    kept = [c for c in configs if study.keep_weights(c)]
    assert {c.method for c in kept} == set(list_methods()) - {"full", "prefix"}  # too large to commit
    assert all(c.n_shots == 64 and c.seed == 13 for c in kept)
    shown = [c for c in configs if study.keep_predictions(c)]
    assert all(c.seed == 13 and (c.n_shots == 64 or c.method in ("full", "lora")) for c in shown)
    assert len(shown) == len(list_methods()) + 4  # N = 64, and full / lora at N = 16 and 1000


def test_gallery_paired_compares_each_pair_at_each_n():
    """The gallery's ``paired`` analysis on its committed bundle: one row per pair and N, each the
    pair's ``compare`` over seeds; ``n_shots`` keeps one N."""
    from workbench.studies import gallery
    from workbench.train import compare, load_results

    store = load_study("gallery")
    every = gallery.paired(store)
    assert len(every) == len(gallery.PAIRS) * len(gallery.N_SHOTS)
    at64 = gallery.paired(store, n_shots=64)
    assert list(at64.index) == [f"{a} - {b}" for a, b in gallery.PAIRS] and set(at64["n_shots"]) == {64}
    runs = load_results(store)
    direct = compare(runs[runs["n_shots"] == 64], "lora", "full", by="n_shots").iloc[0]
    assert at64.loc["lora - full"].equals(direct)
    assert get_study("gallery").analyses["paired"] is gallery.paired


def test_filters_select_configs(env):
    configs = env.study.configs()
    assert parse_filters(["seed=21", "method=lora,dora"]) == {"seed": [21], "method": ["lora", "dora"]}
    assert [c.seed for c in select(configs, parse_filters(["seed=21"]))] == [21]
    assert len(select(configs, {"method_config__r": 8})) == 2  # LoRA's default rank, resolved
    with pytest.raises(ValueError, match="unknown filter key 'shots'"):
        select(configs, {"shots": 16})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_filters(["seed"])


# ------------------------------------------------------------------------------------- round trip
def test_export_then_load_study_reuses_the_bundle_without_training(env):
    df = run_study(NAME, progress=False)
    assert df["status"].tolist() == ["done", "done"] and df.attrs == {"grid": 2, "finished": 2, "elsewhere": 0}
    report = export_study(NAME)
    assert report.complete and report.runs == 2 and len(report.added) == 2 and report.weights == 1
    assert "exported 2 of 2 runs" in str(report) and "(complete)" in str(report)

    configs = env.study.configs()
    hashes = [c.hash for c in configs]
    for cfg, h in zip(configs, hashes):
        files = run_files(env.bundle / h)
        assert "predictions.json" not in files  # compact: no predictions unless the study keeps them
        assert ("method.safetensors" in files) == (cfg.seed == 13)
        assert {"config.json", "identity.json", "metrics.json", "history.json", "DONE"} <= files
    assert RunStore(env.bundle).finished() == sorted(hashes)  # the bundle is a run store as it is

    shutil.rmtree(env.store)  # a fresh checkout: only the committed bundle is left
    store = load_study(NAME)
    assert isinstance(store, StudyStore) and store.complete and store.completeness == "2 of 2 runs (complete)"
    result = run(configs[0], store=store)
    assert result.reused and result.path == env.bundle / hashes[0]
    assert not (env.store / hashes[0]).exists()
    assert sweep(configs, store=store, progress=False)["status"].tolist() == ["reused", "reused"]
    assert sorted(load_results(store)["run"]) == sorted(hashes)
    assert env.study.analyse("summary", store)["seed"].tolist() == [13, 21]

    # A config the bundle does not hold trains into the writable store, never into the bundle.
    before = sorted(p.name for p in env.bundle.iterdir())
    new = run(configs[0].replace(seed=42), store=store)
    assert not new.reused and new.path.parent == env.store
    assert sorted(p.name for p in env.bundle.iterdir()) == before
    assert run(configs[0].replace(seed=42), store=store).reused


def test_partial_bundle_is_exported_and_completed_later(env):
    first = run_study(NAME, limit=1, progress=False)
    assert first["status"].tolist() == ["done"] and first.attrs["finished"] == 1
    report = export_study(NAME)
    assert not report.complete and report.runs == 1 and len(report.missing) == 1
    assert "exported 1 of 2 runs" in str(report) and "partial: 1 missing" in str(report)
    info = json.loads((env.bundle / "study.json").read_text())
    assert info["n_grid"] == 2 and info["n_runs"] == 1 and not info["complete"]
    assert list(info["missing"].values()) == [{"method": "lora", "task": "shapes-vqa", "n_shots": 16, "seed": 21}]
    store = load_study(NAME)
    assert store.completeness == "1 of 2 runs (partial)" and not store.complete and len(store.missing) == 1
    prov_before = json.loads((env.bundle / "provenance.json").read_text())

    # Later, in another session: the store is gone, the committed partial bundle is there.
    shutil.rmtree(env.store)
    second = run_study(NAME, progress=False)
    assert sorted(second["status"]) == ["done", "reused"]  # the bundle's run is not trained again
    report = export_study(NAME)
    assert report.complete and len(report.kept) == 1 and len(report.added) == 1
    assert load_study(NAME).complete
    prov = json.loads((env.bundle / "provenance.json").read_text())
    kept = report.kept[0]
    assert prov["runs"][kept]["trained"] == prov_before["runs"][kept]["trained"]  # its provenance is kept

    # The grid shrinks: the run it no longer has leaves the bundle on the next export.
    unregister_study(NAME)
    register_study(Study(NAME, "one seed", grids=lambda: grid(env.base, seed=[13])))
    report = export_study(NAME)
    assert report.complete and report.runs == 1 and len(report.removed) == 1
    assert RunStore(env.bundle).finished() == [env.base.hash]
    # keep_weights is False now: the weights leave the bundle too
    assert "method.safetensors" not in run_files(env.bundle / env.base.hash)


def test_export_takes_a_run_another_studys_bundle_holds(env):
    """Studies share runs by hash: a grid run that neither the store nor the study's own bundle
    holds, but another study's committed bundle does, is exported from there with its provenance."""
    run_study(NAME, progress=False)
    export_study(NAME)
    shutil.rmtree(env.store)  # a fresh checkout: only the committed bundle is left
    other = "tiny-other"
    register_study(Study(other, "seeds 13 and 42", grids=lambda: grid(env.base, seed=[13, 42])))
    try:
        h, h42 = env.base.hash, env.base.replace(seed=42).hash
        status = study_status(other)
        assert status.elsewhere == 1 and status.in_either == 1 and "1 more in other studies' bundles" in str(status)
        report = export_study(other)
        assert report.shared == [h] and report.runs == 1 and report.missing == [h42]
        assert not report.added and "1 from other studies' bundles" in str(report)
        prov = json.loads((env.results / other / "provenance.json").read_text())
        src = json.loads((env.bundle / "provenance.json").read_text())
        assert prov["runs"][h]["trained"] == src["runs"][h]["trained"] is not None
        assert prov["machines"][prov["runs"][h]["machine"]] == src["machines"][src["runs"][h]["machine"]]
        assert "method.safetensors" not in run_files(env.results / other / h)  # this study keeps no weights
        assert load_study(other).is_finished(h)
        again = export_study(other)
        assert again.kept == [h] and not again.shared  # its own run now
    finally:
        unregister_study(other)


def test_run_study_does_not_train_a_run_another_studys_bundle_holds(env):
    """run_study trains only what no bundle holds: a grid run in another study's committed bundle is
    left to export (it once trained it again: 12 of the PETAL study's runs were the MixPHM study's)."""
    run_study(NAME, progress=False)
    export_study(NAME)
    shutil.rmtree(env.store)
    other = "tiny-other"
    register_study(Study(other, "seeds 13 and 42", grids=lambda: grid(env.base, seed=[13, 42])))
    try:
        h, h42 = env.base.hash, env.base.replace(seed=42).hash
        df = run_study(other, progress=False)
        assert df["run"].tolist() == [h42] and df["status"].tolist() == ["done"]
        assert df.attrs == {"grid": 2, "finished": 2, "elsewhere": 1}
        assert not (env.store / h).exists()
        assert study_status(other).in_either == 2
        report = export_study(other)
        assert report.complete and report.shared == [h] and report.added == [h42]
    finally:
        unregister_study(other)


def test_export_without_any_run_says_what_to_do(env):
    with pytest.raises(ValueError, match="no run of its grid .* is in the store"):
        export_study(NAME)
    assert not env.bundle.exists()
    with pytest.raises(FileNotFoundError, match="no bundle for study 'tiny-bundle'"):
        load_study(NAME)


# ----------------------------------------------------------------------------------------- damage
def test_a_damaged_bundle_names_the_run_and_the_file(env):
    run_study(NAME, progress=False)
    export_study(NAME)
    h13, h21 = (c.hash for c in env.study.configs())
    metrics = env.bundle / h21 / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[:40])  # truncated
    with pytest.raises(DamagedBundleError) as info:
        load_study(NAME)
    assert info.value.runs == [h21] and h21 in str(info.value) and str(metrics) in str(info.value)
    with pytest.raises(DamagedBundleError, match=h21):
        verify_study(NAME, sample=1)

    # Not strict: a warning names it, the run comes from the writable store (trained again there).
    with pytest.warns(DamagedRunWarning, match=f"run {h21}: .*metrics.json"):
        store = load_study(NAME, strict=False)
    assert store.is_finished(h13) and not store.completeness.startswith("2")
    shutil.rmtree(env.store)
    result = run(env.study.configs()[1], store=store)
    assert not result.reused and result.path.parent == env.store

    # Export repairs the bundle from the store.
    report = export_study(NAME)
    assert report.updated == [h21] and load_study(NAME).complete

    # Weights listed in DONE but missing; an invalid study.json.
    (env.bundle / h13 / "method.safetensors").unlink()
    (env.bundle / "study.json").write_text("{not json")
    with pytest.raises(DamagedBundleError) as info:
        load_study(NAME)
    text = str(info.value)
    assert f"run {h13}: {env.bundle / h13 / 'method.safetensors'}" in text and str(env.bundle / "study.json") in text


# -------------------------------------------------------------------------------------- provenance
def test_provenance_records_commit_machine_threads_and_wall_time(env, monkeypatch):
    from workbench.studies.bundle import PINNING_ENV

    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    pinned = {k: os.environ[k] for k in PINNING_ENV if k in os.environ}
    run_study(NAME, progress=False)
    export_study(NAME)
    prov = json.loads((env.bundle / "provenance.json").read_text())
    info = json.loads((env.bundle / "study.json").read_text())
    assert info["grid"] == env.study.hashes() and info["runs"] == env.study.hashes()
    assert prov["study"] == NAME and prov["date"] and "commit" in prov and "dirty" in prov
    machine = prov["exported_by"]
    assert machine["torch"] == torch.__version__
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == torch.get_num_threads() and machine["device"] == "cpu"
    assert machine["env"] == pinned and machine["env"]["MKL_CBWR"] == "COMPATIBLE" and machine["cpu_model"]
    assert set(prov["runs"]) == set(info["runs"])
    for entry in prov["runs"].values():
        trained_on = prov["machines"][entry["machine"]]
        assert trained_on["threads"] == 1 and trained_on["env"] == pinned
        assert trained_on["torch"] == torch.__version__ and trained_on["device"] == "cpu"
        assert entry["executor"] == "local" and entry["trained"] and entry["wall_s"] > 0 and entry["device"] == "cpu"
    assert prov["wall_s"] == pytest.approx(sum(e["wall_s"] for e in prov["runs"].values()))
    assert load_study(NAME).machine_of(info["runs"][0]) == prov["machines"][0]

    # A run trained outside run_study: the machine is what the trainer recorded in timings.json
    # (numerics), or unrecorded for a run without it (then verify compares within the tolerance).
    shutil.rmtree(env.bundle)
    shutil.rmtree(env.store / ".provenance")
    export_study(NAME)
    prov = json.loads((env.bundle / "provenance.json").read_text())
    for h, entry in prov["runs"].items():
        timings = json.loads((env.bundle / h / "timings.json").read_text())
        if "numerics" in timings:
            assert prov["machines"][entry["machine"]]["threads"] == 1 and entry["executor"] is None
        else:
            assert entry["machine"] is None


def test_a_study_stopped_midway_keeps_the_provenance_of_the_runs_it_finished(env, monkeypatch):
    # A session that ends kills the sweep: the run that finished before keeps its commit and machine.
    import workbench.train.loop as loop

    real_run, calls = loop.run, []

    def run_then_stop(cfg, *args, **kwargs):
        calls.append(cfg.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(cfg, *args, **kwargs)

    import workbench.studies.bundle as bundle_module

    # the checkout moves on while the sweep runs: the record keeps the commit the sweep started from
    checkouts = iter([("c0ffee", False), ("beef", True)])
    monkeypatch.setattr(bundle_module, "git_commit", lambda: next(checkouts))
    monkeypatch.setattr(loop, "run", run_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_study(NAME, progress=False)
    first = env.base.replace(seed=calls[0]).hash
    assert RunStore(env.store).finished() == [first]
    record = json.loads((env.store / ".provenance" / f"{first}.json").read_text())
    assert record["commit"] == "c0ffee" and record["dirty"] is False
    assert record["executor"] == "local" and record["trained"]
    assert record["machine"]["threads"] == 1 and record["machine"]["torch"] == torch.__version__

    monkeypatch.setattr(loop, "run", real_run)
    monkeypatch.setattr(bundle_module, "git_commit", lambda: ("f00d", False))
    run_study(NAME, progress=False)  # the next session resumes
    export_study(NAME)
    prov = json.loads((env.bundle / "provenance.json").read_text())
    assert all(e["executor"] == "local" and e["trained"] for e in prov["runs"].values())


def test_cli_status_run_export_verify(env, capsys):
    args = ["--store", str(env.store), "--results", str(env.results)]
    assert main(["status", NAME, *args]) == 0
    out = capsys.readouterr().out
    assert "grid:   2 runs" in out and "0 of 2 finished" in out and "bundle: none" in out

    assert main(["run", NAME, "--limit", "1", "--no-progress", *args]) == 0
    assert "1 trained, 0 reused, 0 failed; 1 of 2 grid runs finished" in capsys.readouterr().out
    assert main(["export", NAME, *args]) == 0
    assert "exported 1 of 2 runs" in capsys.readouterr().out
    assert main(["status", NAME, *args]) == 0
    out = capsys.readouterr().out
    assert "bundle: 1 of 2" in out and "to do:  1 runs" in out
    assert re.search(r"compute: \d+\.\d hours of run time in the bundle", out)
    assert re.search(r"left:   about \d+ min of run time", out)  # the other seed, timed from the first

    assert main(["run", NAME, "--filter", "seed=21", "--no-progress", *args]) == 0
    assert "1 trained, 0 reused" in capsys.readouterr().out
    assert main(["run", NAME, "--no-progress", *args]) == 0
    assert "0 trained, 2 reused" in capsys.readouterr().out
    assert main(["export", NAME, *args]) == 0
    assert main(["verify", NAME, "--sample", "1", "--results", str(env.results)]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 re-trained runs reproduce the bundle" in out and "MATCH (exact" in out

    assert main(["run", "nope", *args]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err
    assert main(["run", NAME, "--filter", "shots=3", *args]) == 2
    assert "unknown filter key" in capsys.readouterr().err


def test_estimate_left_times_each_run_from_its_cell_then_per_step():
    base = RunConfig(task="shapes-vqa", method="lora", n_shots=64, seed=13)
    steps64, steps1000 = base.budget()[0], replace(base, n_shots=1000).budget()[0]
    here, there = {"cpu_model": "A"}, {"cpu_model": "B"}
    finished = [(base, {"wall_s": 100.0, "numerics": here}),
                (replace(base, seed=21), {"wall_s": 200.0, "numerics": here}),
                (replace(base, seed=87), {"wall_s": 5000.0, "numerics": there}),  # another CPU: not counted
                (replace(base, seed=100), {"numerics": here}), (replace(base, seed=99), ["damaged"])]  # no wall time
    assert estimate_left([replace(base, seed=42)], finished, cpu="A") == pytest.approx(150.0)
    # only the other CPU ran the cell: its time counts
    assert estimate_left([replace(base, seed=42)], finished, cpu="C") == pytest.approx((100 + 200 + 5000) / 3)
    # no run of the cell at this N: the same method and size at another N, per step, times this budget
    assert estimate_left([replace(base, n_shots=1000)], finished, cpu="A") == pytest.approx(150.0 / steps64 * steps1000)
    # another size: no run of it at any N, so the mean per step over every finished run
    other = replace(base, method_config={"r": 64})
    assert estimate_left([other, replace(base, seed=42)], finished, cpu="A") \
        == pytest.approx(150.0 / steps64 * other.budget()[0] + 150.0)
    assert estimate_left([base], [], cpu="A") is None


def test_python_m_workbench_studies_status_gallery(tmp_path):
    from workbench.methods import list_methods

    env = {**os.environ, "WORKBENCH_RUNS": str(tmp_path / "runs"), "WORKBENCH_RESULTS": str(tmp_path / "results"),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "workbench.studies", "status", "gallery"], capture_output=True,
                         text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert f"grid:   {len(list_methods()) * 9} runs" in out.stdout and "bundle: none" in out.stdout
    status = study_status("gallery", store=tmp_path / "runs", root=tmp_path / "results")
    assert status.grid == len(list_methods()) * 9 and status.in_store == 0 and not status.bundle_exists
