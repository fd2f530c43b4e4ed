"""The trainer: protocol, determinism, gradients, the run store's reuse and atomicity, failures."""

import json
import shutil

import numpy as np
import pytest
import torch

from workbench.train import DamagedRunError, NonFiniteLossError, RunConfig, RunStore, load_results, run


def test_run_writes_a_finished_run_and_reuses_it(small_config):
    result = run(small_config)
    assert not result.reused
    files = {p.name for p in result.path.iterdir()}
    assert {"config.json", "metrics.json", "history.json", "params.json", "timings.json", "method.safetensors",
            "DONE"} <= files
    m = result.metrics
    assert 0.0 <= m["test"]["overall"] <= 1.0 and set(m["test"]["per_type"]) <= {
        "exist", "count", "query_color", "query_shape", "query_size", "relate", "compare", "logic"}
    assert m["steps"] == 8 and m["evals"] == 2  # max_steps 8, dev score every 4 steps
    assert [h["step"] for h in result.history] == [4, 8] and [h["epoch"] for h in result.history] == [2, 4]
    assert result.timings["samples_per_s"] > 0 and result.timings["peak_memory_mb"] > 0
    again = run(small_config)
    assert again.reused and again.metrics == json.loads(json.dumps(m))
    forced = run(small_config, force=True)
    assert not forced.reused


def test_same_config_twice_gives_identical_metrics(small_config, tmp_path):
    a = run(small_config, store=tmp_path / "a")
    b = run(small_config, store=tmp_path / "b")
    assert a.metrics == b.metrics and a.history == b.history
    assert a.predictions == b.predictions


def test_config_hash_is_stable_and_sensitive(small_config):
    assert small_config.hash == RunConfig.from_dict(small_config.to_dict()).hash
    assert small_config.hash != small_config.replace(seed=21).hash
    assert small_config.hash == small_config.replace(quiet=False).hash  # display only


@pytest.mark.parametrize("method, expected", [("lora", ("lora_", "projector.")), ("full", None)])
def test_only_intended_parameters_get_gradients(small_config, method, expected):
    from workbench import methods
    from workbench.models import load_backbone

    model = load_backbone(small_config.backbone)
    methods.apply(model, method)
    model.train()
    feats = torch.randn(2, model.visual_encoder.n_visual, model.config.feat_dim)
    ids, mask = model.encode_prompts(["vqa: is there a red square?", "vqa: how many circles are there?"])
    model(feats, ids, mask, labels=model.encode_targets(["yes", "2"])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    if expected is None:  # full fine-tuning: the LM and the projector, never the frozen CNN
        assert any(n.startswith("lm.") for n in with_grad) and not any("visual_encoder" in n for n in with_grad)
    else:
        assert with_grad and all(n.startswith(expected[1]) or expected[0] in n for n in with_grad)
        assert any(expected[0] in n for n in with_grad)


def test_interrupted_run_never_looks_finished(small_config, monkeypatch, tmp_path):
    import workbench.train.loop as loop

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "predict", boom)  # dies at the first dev evaluation
    store = RunStore(tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        run(small_config, store=store)
    assert not store.is_finished(small_config.hash)
    assert store.finished() == []
    assert not any(p.name == small_config.hash for p in store.root.iterdir()) if store.root.exists() else True


def test_store_write_is_atomic(tmp_path, monkeypatch):
    store = RunStore(tmp_path)

    class Unserialisable:
        def __repr__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.write("abc", {"config": {"x": 1}, "metrics": {"bad": Unserialisable()}})
    assert not store.is_finished("abc") and list(tmp_path.iterdir()) == []


def test_non_finite_loss_stops_and_is_recorded(small_config, tmp_path, request):
    from workbench.methods import base
    from workbench.methods.full import FullConfig

    class Exploding(base.MethodHandle):  # a method whose extra loss turns NaN at the 3rd step
        calls = 0

        def extra_losses(self):
            Exploding.calls += 1
            return {"boom": torch.tensor(float("nan") if Exploding.calls >= 3 else 0.0)}

    class ExplodingConfig(FullConfig):  # its own class: registration records the method name on it
        pass

    base.register_method("exploding", ExplodingConfig, family="test")(lambda m, c: Exploding(m, c))
    request.addfinalizer(lambda: base.METHODS.unregister("exploding"))
    store = RunStore(tmp_path / "runs")
    cfg = small_config.replace(method="exploding")
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        run(cfg, store=store)
    assert not store.is_finished(cfg.hash) and store.finished() == []
    failure = json.loads((store.root / f"{cfg.hash}.failed" / "failure.json").read_text())
    assert failure["step"] == 2 and "nan" in failure["reason"]
    # a failed run is not reused: running again retrains (and fails again)
    with pytest.raises(NonFiniteLossError):
        run(cfg, store=store)


def test_load_results_is_one_dataframe(small_config, tmp_path):
    store = RunStore(tmp_path / "runs")
    run(small_config, store=store)
    run(small_config.replace(seed=21), store=store)
    df = load_results(store)
    assert len(df) == 2 and {"test_acc", "dev_best", "trainable_pct", "method", "n_shots", "seed"} <= set(df.columns)
    assert set(df.seed) == {13, 21}


@pytest.mark.parametrize("field, value", [("n_shots", 0), ("task", "vqa-v3"), ("lr", -1.0), ("seed", -2)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field if field != "task" else "unknown"):
        RunConfig(**{field: value})


def test_hash_changes_with_the_checkpoint_contents(small_config, tiny_backbone, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_backbone, copy)
    a = small_config.replace(backbone=str(copy))
    before = a.hash
    cfg_file = copy / "workbench_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"name": "tiny-test"', '"name": "tiny-test-2"'))
    assert a.hash != before


# ------------------------------------------------------------------ the store under faults and concurrency
CHILD = """
import json, pathlib, sys, time
from workbench.train import RunConfig, run
cfg, store, ready, go = RunConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.01)
r = run(cfg, store=store)
print(json.dumps({"reused": r.reused, "metrics": r.metrics}))
"""


def test_two_processes_with_one_config_train_it_once(small_config, tmp_path):
    import os
    import subprocess
    import sys
    import time

    store = RunStore(tmp_path / "runs")
    cfg = small_config.replace(quiet=False)  # the waiting process says so on stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg.to_dict()), str(store.root),
                               str(tmp_path / f"ready{i}"), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    with store.lock(cfg.hash):  # both reach the lock while this process holds it
        go.touch()
        time.sleep(1.0)
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["reused"] for r in results) == [False, True]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert "waiting for it" in "".join(err for _, err in outs)
    assert store.finished() == [cfg.hash]
    assert sorted(p.name for p in store.root.iterdir()) == [".locks", cfg.hash]


def test_a_damaged_stored_run_is_trained_again(small_config, tmp_path):
    from workbench.train.store import DamagedRunWarning

    store = RunStore(tmp_path / "runs")
    first = run(small_config, store=store)
    metrics = first.path / "metrics.json"
    metrics.write_text(metrics.read_text()[:10])
    with pytest.warns(DamagedRunWarning, match=r"metrics\.json.*training the run again"):
        again = run(small_config, store=store)
    assert not again.reused and again.metrics == first.metrics
    assert run(small_config, store=store).reused
    assert sorted(p.name for p in store.root.iterdir()) == [".locks", small_config.hash]


def test_an_unwritable_store_fails_before_training(small_config, tmp_path, monkeypatch):
    import workbench.train.loop as loop
    from workbench.train.store import StoreNotWritableError

    monkeypatch.setattr(loop, "build_backbone", lambda *a, **k: pytest.fail("trained into an unwritable store"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreNotWritableError, match=r"a-file/runs is not writable.*nothing was trained"):
        run(small_config, store=tmp_path / "a-file" / "runs")


def test_a_changed_feature_store_is_not_reused(hf_backbones, real_data, tmp_path, monkeypatch):
    import shutil

    from workbench.data import FeatureStore

    monkeypatch.setenv("WORKBENCH_FINGERPRINTS", str(tmp_path / "fingerprints"))
    features = tmp_path / "regions.h5"
    shutil.copy(real_data.store, features)
    cfg = RunConfig(backbone=str(hf_backbones["t5"]), backbone_options={"feat_dim": real_data.feat_dim}, task="gqa",
                    task_options={"root": str(real_data.root / "gqa"), "features": str(features)}, n_shots=2,
                    method="full", lr=1e-3, max_steps=1, eval_every=1, batch_size=2, quiet=True)
    first = run(cfg, store=tmp_path / "runs")
    assert run(cfg, store=tmp_path / "runs").reused
    old = FeatureStore(features)
    rng = np.random.default_rng(1)
    FeatureStore.write(features, {k: rng.normal(size=old.shape(k)).astype(np.float32) for k in old.keys()})  # noqa: SIM118
    old.close()
    again = run(cfg, store=tmp_path / "runs")
    assert not again.reused and again.path.name != first.path.name  # a new run directory


def test_runs_from_before_step_budgets_are_skipped_with_one_warning(small_config, tmp_path):
    from workbench.train import DamagedRunWarning, RunStore, load_results

    store = RunStore(tmp_path / "legacy")
    result = run(small_config, store=store)
    for name in ("a1b2c3d4e5f6", "0a1b2c3d4e5f"):  # two runs of an older version: `epochs` in the config
        legacy = store.root / name
        shutil.copytree(result.path, legacy)
        cfg = json.loads((legacy / "config.json").read_text())
        (legacy / "config.json").write_text(json.dumps({**cfg, "epochs": 40}))
        (legacy / "identity.json").unlink()
        (legacy / "DONE").write_text("")  # as runs written before DONE manifests
    with pytest.warns(DamagedRunWarning) as caught:
        df = load_results(store)
    assert df["run"].tolist() == [result.hash]
    assert len(caught) == 1 and "skipping 2 runs" in str(caught[0].message)
    assert "before budgets were counted in steps" in str(caught[0].message)


def test_restore_run_rebuilds_the_trained_model(small_config, tmp_path):
    from workbench.models import capture
    from workbench.train import load_run, restore_run

    result = run(small_config.replace(method="houlsby"), store=tmp_path)
    restored = restore_run(result.hash, store=tmp_path)
    # the rebuilt model answers the test split as the run did
    assert restored.predict("test") == [result.predictions[e.id] for e in restored.test.examples]
    assert restored.score("test")["overall"] == result.metrics["test"]["overall"]
    batches = restored.batches("dev", batch_size=5)
    assert sum(len(b["input_ids"]) for b in batches) == len(restored.dev)
    acts = capture(restored.model, ["encoder.final"], data=batches, max_samples=6, pool="mean")
    assert acts["encoder.final"].shape[0] == 6
    # "init": the method as the run's seed initialised it (Houlsby's Up is zero: no change to the output)
    init = restore_run(load_run(result.hash, tmp_path), store=tmp_path, weights="init")
    trained_up = dict(restored.handle.state_dict())
    init_up = dict(init.handle.state_dict())
    assert trained_up.keys() == init_up.keys()
    assert any(not torch.equal(trained_up[k], init_up[k]) for k in trained_up)
    with pytest.raises(ValueError, match="weights"):
        restore_run(result.hash, store=tmp_path, weights="best")
    (result.path / "method.safetensors").unlink()  # the run's DONE lists it: a damaged run, named
    with pytest.raises(DamagedRunError, match="method.safetensors"):
        restore_run(result.hash, store=tmp_path)


def test_expert_draw_counts_are_recorded(small_config, tmp_path):
    result = run(small_config.replace(method="mixphm", method_config={"bottleneck": 4}), store=tmp_path)
    counts = result.metrics["method_stats"]["draw_counts"]
    assert set(counts) == {"encoder.0.ffn", "decoder.0.ffn"}
    # one Up expert drawn per training forward: 8 steps of one batch each
    assert all(len(c) == 4 and sum(c) == 8 for c in counts.values())
    assert "method_stats" not in run(small_config, store=tmp_path).metrics  # LoRA has none


def test_method_statistics_are_recorded_at_every_evaluation(small_config, tmp_path):
    result = run(small_config.replace(method="petal", method_config={"rank": 8}), store=tmp_path)
    assert [h["step"] for h in result.history] == [4, 8]
    for h in result.history:
        assert len(h["method"]["mode_gates"]) == 8 and 0 <= h["method"]["modes_on"] <= 8
    assert "method" not in run(small_config, store=tmp_path).history[0]  # LoRA reports nothing
