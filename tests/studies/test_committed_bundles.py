"""Every committed study bundle (results/<name>/) is re-verified: a small sample of its runs is
re-trained on this machine and must give the bundle's metrics -- exactly when the bundle's recorded
machine fingerprint matches this one, within the stated tolerance otherwise (docs/studies.md).

The machinery itself is checked on a tiny two-run bundle built here, whether or not any bundle is
committed: a faithful bundle verifies exactly, a tampered metric is detected in both modes.

WORKBENCH_VERIFY_SAMPLE (default 1) sets how many runs of each committed bundle are re-trained and
WORKBENCH_VERIFY_MAX_S (default 120) the largest recorded wall time of a sampled run, so that CI
stays within budget (a bundle with no run that cheap re-trains its cheapest run).
"""

import json
import os

import pytest
import torch

torch.set_num_threads(1)

from workbench.studies import (
    Study,
    VerificationError,
    bundles,
    export_study,
    register_study,
    run_study,
    unregister_study,
    verify_study,
)
from workbench.train import RunConfig, RunStore, grid
from workbench.utils import repo_root

RESULTS = repo_root() / "results"
SAMPLE = int(os.environ.get("WORKBENCH_VERIFY_SAMPLE", "1"))
MAX_WALL_S = float(os.environ.get("WORKBENCH_VERIFY_MAX_S", "120"))
NAME = "tiny-verify"


@pytest.mark.parametrize("name", bundles(RESULTS))
def test_committed_bundle_reproduces_on_this_machine(name):
    report = verify_study(name, sample=SAMPLE, seed=0, root=RESULTS, max_wall_s=MAX_WALL_S)
    print(report.summary())
    report.raise_if_failed()


# ------------------------------------------------------------------ the machinery on a tiny bundle
@pytest.fixture
def tiny_bundle_of(tiny_backbone, tmp_path, monkeypatch):
    """A factory: ``(seeds) -> (results root, run hashes)`` runs a tiny one-cell study over ``seeds``
    and exports it into tmp_path/results."""
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    base = RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", n_shots=16, seed=13, method="lora",
                     max_steps=6, eval_every=2, patience=3, batch_size=8, pool_size=64, test_size=24, quiet=True,
                     task_options={"n_scenes": 40})

    def make(seeds):
        study = register_study(Study(NAME, f"{len(seeds)} tiny runs", grids=lambda: grid(base, seed=list(seeds))))
        run_study(NAME, store=tmp_path / "runs", results=tmp_path / "results", progress=False)
        report = export_study(NAME, store=tmp_path / "runs", root=tmp_path / "results")
        assert report.complete
        return tmp_path / "results", study.hashes()

    try:
        yield make
    finally:
        unregister_study(NAME)


@pytest.fixture
def tiny_bundle(tiny_bundle_of):
    """A two-run study run and exported into tmp_path/results; yields (results root, run hashes)."""
    return tiny_bundle_of([13, 21])


def tamper_metric(root, run_hash, delta):
    """Re-publish a bundle run with its test accuracy moved by ``delta`` and a valid manifest, as if
    the bundle had been produced by code that computes something else."""
    bundle = RunStore(root / NAME)
    records = bundle.read(run_hash)
    records["metrics"]["test"]["overall"] += delta
    bundle.write(run_hash, records)
    return records["metrics"]["test"]["overall"] - delta


def tamper_first_loss(root, run_hash, factor):
    """Re-publish a bundle run with its first evaluation's training loss scaled by ``factor``."""
    bundle = RunStore(root / NAME)
    records = bundle.read(run_hash)
    records["history"][0]["loss"] *= factor
    bundle.write(run_hash, records)


def set_recorded_machine(root, machine):
    """Replace the machine record of every run (None: unrecorded)."""
    path = root / NAME / "provenance.json"
    prov = json.loads(path.read_text())
    prov["machines"] = [machine] if machine else []
    for entry in prov["runs"].values():
        entry["machine"] = 0 if machine else None
    path.write_text(json.dumps(prov))


def test_a_faithful_bundle_verifies_exactly(tiny_bundle):
    root, hashes = tiny_bundle
    report = verify_study(NAME, sample=None, root=root)
    assert report.ok, report.summary()
    assert [c.run for c in report.checks] == sorted(hashes)
    assert all(c.mode == "exact" and c.status == "match" and not c.differences for c in report.checks)
    report.raise_if_failed()
    assert report.frame()["ok"].all()
    # the sample is drawn reproducibly
    assert [c.run for c in verify_study(NAME, sample=1, seed=3, root=root).checks] == \
        [c.run for c in verify_study(NAME, sample=1, seed=3, root=root).checks]


def test_a_tampered_metric_is_detected(tiny_bundle):
    root, hashes = tiny_bundle
    tamper_metric(root, hashes[1], 0.5)
    report = verify_study(NAME, runs=hashes, root=root)
    assert not report.ok
    good, bad = report.checks
    assert good.status == "match" and bad.status == "mismatch" and bad.mode == "exact"
    assert any(d.startswith("metrics.test.overall:") for d in bad.differences)
    with pytest.raises(VerificationError, match=f"{hashes[1]}.*MISMATCH"):
        report.raise_if_failed()

    # On an unrecorded (or different) machine the comparison is within the tolerance: 0.5 is still caught.
    set_recorded_machine(root, None)
    report = verify_study(NAME, runs=hashes[1], root=root)
    (check,) = report.checks
    assert check.mode == "tolerance" and check.tolerance == 0.02 and check.status == "mismatch"
    assert "not recorded" in check.machine_differences[0]


def test_a_metric_recorded_only_since_the_run_was_written_is_not_a_mismatch(tiny_bundle):
    root, hashes = tiny_bundle
    bundle = RunStore(root / NAME)
    records = bundle.read(hashes[0])
    key = next(k for k in records["metrics"] if k not in ("test", "test_last", "dev_best"))
    del records["metrics"][key]  # as a run written before the trainer recorded `key`
    bundle.write(hashes[0], records)
    (check,) = verify_study(NAME, runs=hashes[0], root=root).checks
    assert check.mode == "exact" and check.status == "match" and check.unrecorded == [key]
    assert f"not compared: {key}" in str(check)
    tamper_metric(root, hashes[0], 0.01)  # everything both hold is still compared
    (check,) = verify_study(NAME, runs=hashes[0], root=root).checks
    assert check.status == "mismatch"


def test_a_small_drift_passes_only_within_tolerance(tiny_bundle):
    root, hashes = tiny_bundle
    tamper_metric(root, hashes[0], 0.01)
    (check,) = verify_study(NAME, runs=hashes[0], root=root).checks
    assert check.mode == "exact" and check.status == "mismatch"  # same machine: must be identical

    prov = json.loads((root / NAME / "provenance.json").read_text())
    other = {**prov["machines"][0], "cpu_capability": "AVX2" if prov["machines"][0]["cpu_capability"] != "AVX2"
             else "AVX512"}
    set_recorded_machine(root, other)
    (check,) = verify_study(NAME, runs=hashes[0], root=root).checks
    assert check.mode == "tolerance" and check.status == "match"
    assert any(d.startswith("cpu_capability:") for d in check.machine_differences)
    (check,) = verify_study(NAME, runs=hashes[0], root=root, tolerance=0.001).checks
    assert check.status == "mismatch"


def test_a_bundle_from_other_code_is_stale(tiny_bundle):
    root, hashes = tiny_bundle
    bundle = RunStore(root / NAME)
    records = bundle.read(hashes[0])
    # A run whose config the current code hashes differently (as after a change of checkpoint,
    # method default or protocol): here its identity payload records another method default.
    records["identity"]["payload"]["method_config"]["r"] = 2
    from workbench.train.config import hash_of

    other = hash_of(records["identity"]["payload"])
    records["identity"]["hash"] = other
    bundle.write(other, records)
    (check,) = verify_study(NAME, runs=other, root=root).checks
    assert check.status == "stale" and not check.ok and "hashes this config to" in check.differences[0]


def test_the_gallery_bundle_holds_the_current_hash_of_every_method_at_n64():
    """A change of any method's defaults renames its runs (the hash covers the resolved config); the
    gallery's N = 64 runs are complete, so such a change must come with its re-trained runs. Options
    added with a behaviour-preserving default are declared in the config's HASH_NEUTRAL instead."""
    from workbench.methods import list_methods
    from workbench.studies import load_study

    if not (RESULTS / "gallery").is_dir():
        pytest.skip("no gallery bundle committed")
    store = load_study("gallery")
    missing = [(m, s) for m in list_methods() for s in (13, 21, 42)
               if not store.is_finished(RunConfig(task="shapes-vqa", method=m, n_shots=64, seed=s, quiet=True).hash)]
    assert not missing, (f"the gallery bundle lacks the current runs of {missing}: a method's defaults changed "
                         "(retrain with `python -m workbench.studies run gallery` and export) or a new option "
                         "needs MethodConfig.HASH_NEUTRAL")


# -------------------------------------------------------------------------- on another machine
def test_another_machine_checks_the_first_evaluation(tiny_bundle):
    """On another machine the headline metrics may part after the first evaluations, but the first
    evaluation's training loss must agree within EARLY_RTOL: a larger difference is another computation."""
    from workbench.studies.bundle import EARLY_RTOL

    root, hashes = tiny_bundle
    set_recorded_machine(root, None)
    tamper_first_loss(root, hashes[0], 1 + EARLY_RTOL / 10)  # float noise: metrics equal, history not
    tamper_first_loss(root, hashes[1], 1 + 5 * EARLY_RTOL)
    report = verify_study(NAME, runs=hashes, root=root)
    near, far = report.checks
    assert near.mode == far.mode == "tolerance"
    assert near.status == "match" and near.ok and not near.differences
    assert near.first_loss_rel == pytest.approx(EARLY_RTOL / 10, rel=1e-3) and "apart (relative" in str(near)
    assert far.status == "mismatch" and not far.ok
    assert "history[0].loss" in far.differences[0] and "training computes something else" in far.differences[0]
    with pytest.raises(VerificationError, match="MISMATCH"):
        report.raise_if_failed()


def test_a_run_that_parts_from_the_bundle_on_another_machine_is_judged_by_its_cell(tiny_bundle_of):
    """Outside the tolerance, a re-run on another machine reproduces the bundle ("diverged") when it
    lies within the 95 % prediction interval of another seed of its cell, and not otherwise."""
    root, hashes = tiny_bundle_of([13, 21, 42])
    set_recorded_machine(root, None)
    checked, a, b = hashes
    # The re-trained value is the run's true one (this machine trained the bundle).
    true = tamper_metric(root, checked, 0.05)  # own value 0.05 off: outside the tolerance 0.02
    tamper_metric(root, a, true - 0.1 - tamper_metric(root, a, 0.0))
    tamper_metric(root, b, true + 0.15 - tamper_metric(root, b, 0.0))
    (check,) = verify_study(NAME, runs=checked, root=root).checks
    # mean true + 0.033, std 0.126, half-width t(0.975, 2) * std * sqrt(4 / 3) = 0.63: inside
    assert check.status == "diverged" and check.ok, check
    assert "within the 95 % interval of another seed of the cell" in check.differences[0]
    report = verify_study(NAME, runs=checked, root=root)
    assert report.ok and "1 diverged" in report.summary()

    # A tight cell far from the re-run: outside its interval, so the bundle is not reproduced.
    tamper_metric(root, checked, 0.25)  # own: true + 0.30
    tamper_metric(root, a, true + 0.31 - tamper_metric(root, a, 0.0))
    tamper_metric(root, b, true + 0.29 - tamper_metric(root, b, 0.0))
    (check,) = verify_study(NAME, runs=checked, root=root).checks
    assert check.status == "mismatch" and "outside the 95 % interval" in check.differences[0]


def test_fewer_than_three_seeds_cannot_excuse_a_difference(tiny_bundle):
    root, hashes = tiny_bundle
    set_recorded_machine(root, None)
    tamper_metric(root, hashes[0], 0.05)
    (check,) = verify_study(NAME, runs=hashes[0], root=root).checks
    assert check.status == "mismatch" and "fewer than 3 seeds" in check.differences[0]


# ------------------------------------------------------------------ the README's reproduction table
def _reproduction_rows(readme: str) -> dict[str, tuple[int, str]]:
    table = readme[readme.index("| study | runs | run time |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = (int(cells[1].replace(",", "")), cells[2])
    return rows


def test_readme_reproduction_table_matches_the_bundles():
    """The README's table of what reproducing each study costs is read off the committed bundles:
    every bundle is listed, with its number of runs and its summed wall time (provenance.json)."""
    readme = (RESULTS.parent / "README.md").read_text()
    rows = _reproduction_rows(readme)
    assert sorted(rows) == sorted(bundles(RESULTS))
    distinct = {}
    for name, (runs, hours) in rows.items():
        bundle = RESULTS / name
        held = [p for p in bundle.iterdir() if (p / "DONE").is_file()]
        wall = json.loads((bundle / "provenance.json").read_text())["wall_s"]
        assert (len(held), hours) == (runs, f"{wall / 3600:.1f} h"), name
        for p in held:
            distinct[p.name] = json.loads((p / "timings.json").read_text())["wall_s"]
    assert f"are {len(distinct):,} distinct runs and {sum(distinct.values()) / 3600:.1f} hours" in " ".join(readme.split())
