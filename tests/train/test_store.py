"""The run store under faults: writers killed between publish steps, damaged and stray runs, locks,
a read-only store, and the visual feature cache. No training here (runs are written directly); the
tests that train live in test_loop.py."""

import json
import multiprocessing
import os
import threading
import time

import numpy as np
import pytest

import workbench.train.store as store_mod
from workbench.train import RunConfig, load_results, load_run
from workbench.train.store import (
    DONE,
    DamagedRunError,
    DamagedRunWarning,
    RunStore,
    StoreNotWritableError,
)


@pytest.fixture(autouse=True)
def private_fingerprint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FINGERPRINTS", str(tmp_path / "fingerprints"))


def records(seed=13, acc=0.5, identity=True):
    """The records of a finished run of a config that needs no checkpoint to hash."""
    cfg = RunConfig(backbone="/nonexistent/ckpt", seed=seed)
    payload = cfg.hash_payload()
    out = {"config": cfg.to_dict(),
           "metrics": {"test": {"overall": acc, "per_type": {"exist": acc}}, "test_last": {"overall": acc},
                       "dev_best": acc, "best_step": 4, "steps": 4, "evals": 1, "lr": 1e-3},
           "history": [{"epoch": 2, "step": 4, "loss": 1.0, "dev": acc}],
           "params": {"trainable": 10, "trainable_pct": 1.0}, "timings": {"wall_s": 1.0, "samples_per_s": 2.0}}
    if identity:
        out["identity"] = {"hash": cfg.hash, "payload": payload}
    return cfg.hash, out


def done_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob(DONE))


# ------------------------------------------------------------------ writers killed between steps
def _killed_writer(root, run_hash, recs, kill_at):
    """Child process: write a run and die (os._exit: no cleanup runs) at the named step."""
    calls = {"rename": 0}
    rename, marker, discard = store_mod._rename, store_mod._write_marker, store_mod.RunStore._discard

    def die():
        os._exit(17)

    def patched_rename(src, dst):
        calls["rename"] += 1
        if src.name.startswith(f".{run_hash}.tmp-"):
            assert not (src / DONE).exists(), f"{DONE} in the temporary {src} before its rename"
        if kill_at == f"rename{calls['rename']}":
            die()
        rename(src, dst)

    def patched_marker(final, manifest):
        if kill_at == "marker":
            die()
        marker(final, manifest)
        if kill_at == "after_marker":
            die()

    store_mod._rename = patched_rename
    store_mod._write_marker = patched_marker
    store_mod.RunStore._discard = staticmethod(lambda p: die() if kill_at == "discard" else discard(p))
    RunStore(root).write(run_hash, recs)
    os._exit(0)


def kill_writer(root, run_hash, recs, kill_at):
    # fork: the child shares this process's state and dies without running any cleanup
    p = multiprocessing.get_context("fork").Process(target=_killed_writer, args=(root, run_hash, recs, kill_at))
    p.start()
    p.join(60)
    assert p.exitcode == 17, f"the writer was not killed at {kill_at} (exit code {p.exitcode})"


@pytest.mark.parametrize("kill_at", ["rename1", "marker"])
def test_a_writer_killed_before_done_leaves_no_phantom_run(tmp_path, kill_at):
    h, recs = records()
    kill_writer(tmp_path, h, recs, kill_at)
    store = RunStore(tmp_path)
    assert done_files(tmp_path) == []  # DONE was never written outside the final directory
    assert store.finished() == [] and not store.is_finished(h)
    with pytest.raises(FileNotFoundError):
        load_run(h, store)
    with store.lock(h):
        store.recover(h)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == []
    store.write(h, recs)
    assert load_run(h, store).metrics["dev_best"] == 0.5


@pytest.mark.parametrize("kill_at, survivor", [("rename1", 0.5), ("rename2", 0.5), ("marker", 0.5),
                                                ("after_marker", 0.9), ("discard", 0.9)])
def test_a_forced_replacement_killed_at_any_step_leaves_a_readable_run(tmp_path, kill_at, survivor):
    store = RunStore(tmp_path)
    h, old = records(acc=0.5)
    store.write(h, old)
    _, new = records(acc=0.9)
    kill_writer(tmp_path, h, new, kill_at)
    assert store.finished() == [h]
    assert load_run(h, store).metrics["dev_best"] == survivor
    assert load_results(store).dev_best.tolist() == [survivor]
    with store.lock(h):  # the next writer of the hash repairs the store
        store.recover(h)
    assert done_files(tmp_path) == [f"{h}/{DONE}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", h]
    assert load_run(h, store).metrics["dev_best"] == survivor


def test_a_replacement_that_fails_puts_the_old_run_back(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    h, old = records(acc=0.5)
    store.write(h, old)

    def full_disk(final, manifest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_marker", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.write(h, records(acc=0.9)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == [h]
    assert load_run(h, store).metrics["dev_best"] == 0.5


# ------------------------------------------------------------------ damaged and stray runs
def test_a_truncated_file_is_skipped_and_named(tmp_path):
    store = RunStore(tmp_path)
    for seed in (13, 21):
        store.write(*records(seed=seed))
    bad = records(seed=21)[0]
    metrics = tmp_path / bad / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[:20])
    with pytest.warns(DamagedRunWarning, match=rf"{bad}.metrics\.json.*truncated"):
        df = load_results(store)
    assert df.seed.tolist() == [13]
    with pytest.raises(DamagedRunError, match=rf"{bad}.metrics\.json") as info:
        load_run(bad, store)
    assert info.value.file == "metrics.json" and info.value.path == tmp_path / bad


def test_damage_in_a_run_written_before_manifests_is_named(tmp_path):
    store = RunStore(tmp_path)
    for seed in (13, 21, 42):
        store.write(*records(seed=seed, identity=False))
    for h in store.finished():
        (tmp_path / h / DONE).write_text("")  # the old, empty marker
    h13, h21 = (records(seed=s)[0] for s in (13, 21))
    (tmp_path / h13 / "metrics.json").write_text('{"test": {"overa')
    (tmp_path / h21 / "params.json").unlink()
    with pytest.warns(DamagedRunWarning) as caught:
        df = load_results(store)
    assert df.seed.tolist() == [42]
    text = " | ".join(str(w.message) for w in caught)
    assert f"{h13}/metrics.json: not valid JSON" in text and f"{h21}/params.json: the file is missing" in text
    with pytest.raises(DamagedRunError, match="metrics.json: not valid JSON"):
        load_run(h13, store)


def test_a_stray_directory_with_done_is_ignored_and_reported(tmp_path):
    store = RunStore(tmp_path)
    h, recs = records()
    store.write(h, recs)
    stray = tmp_path / f".{h}.k2j3h4x9"  # what an older version left when killed before its rename
    stray.mkdir()
    (stray / "config.json").write_text("{}")
    (stray / DONE).write_text("")
    (tmp_path / "notes.txt").write_text("a file is not a run")
    assert store.finished() == [h]
    with pytest.warns(DamagedRunWarning, match=rf"{stray.name}.*{DONE}"):
        assert len(load_results(store)) == 1


def test_an_edited_config_is_damage(tmp_path):
    store = RunStore(tmp_path)
    h, recs = records()
    store.write(h, recs)
    cfg_file = tmp_path / h / "config.json"
    text = cfg_file.read_text()
    cfg_file.write_text(text.replace('"seed": 13', '"seed": 21'))  # the same size: only the digest tells
    assert cfg_file.read_text() != text
    with pytest.raises(DamagedRunError, match="config.json: its content differs from the SHA-256"):
        load_run(h, store)
    # edited together with the manifest: the identity check still catches it
    manifest = json.loads((tmp_path / h / DONE).read_text())
    data = cfg_file.read_bytes()
    import hashlib
    manifest["files"]["config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / h / DONE).write_text(json.dumps(manifest))
    with pytest.raises(DamagedRunError, match="config.json: the config does not match the run's hash"):
        load_run(h, store)
    with pytest.warns(DamagedRunWarning, match="config.json"):
        assert load_results(store).empty


def test_an_edited_config_of_a_run_before_manifests_is_damage(tmp_path):
    store = RunStore(tmp_path)
    h, recs = records(identity=False)
    store.write(h, {**recs, "config": {**recs["config"], "seed": 99}})
    (tmp_path / h / DONE).write_text("")
    with pytest.raises(DamagedRunError, match=rf"config.json: the config hashes to \w+, not {h}"):
        load_run(h, store)


# ------------------------------------------------------------------ lock and writability
def test_the_lock_excludes_a_second_holder_until_released(tmp_path):
    store = RunStore(tmp_path)
    events = []
    with store.lock("abc"):
        def second():
            with store.lock("abc", on_wait=lambda: events.append("waited")):
                events.append("got it")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        assert events == ["waited"]
        events.append("released")
    t.join(10)
    assert events == ["waited", "released", "got it"]
    assert (tmp_path / ".locks" / "abc.lock").is_file()


def test_an_unwritable_store_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    store = RunStore(blocker / "runs")
    with pytest.raises(StoreNotWritableError, match=rf"run store {blocker / 'runs'} is not writable"):
        store.check_writable()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_store_is_named(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(StoreNotWritableError, match=str(root)):
            RunStore(root).check_writable()
    finally:
        root.chmod(0o755)


# ------------------------------------------------------------------ the visual feature cache
@pytest.fixture
def encoder():
    from workbench.models.visual import VisualEncoder

    return VisualEncoder(feat_dim=24, grid=2, channels=(8, 8, 8), pos_dim=8, groups=4)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_feature_cache_is_rebuilt(encoder, tmp_path, damage):
    from workbench.models.visual import extract_features

    images = np.random.default_rng(0).integers(0, 255, size=(3, 16, 16, 3), dtype=np.uint8)
    first = extract_features(encoder, images, cache_dir=tmp_path, key="t", quiet=True)
    (file,) = tmp_path.glob("t-*.npy")
    size = file.stat().st_size
    file.write_bytes({"empty": b"", "truncated": file.read_bytes()[: size // 2], "garbage": b"\x93NUMPY junk"}[damage])
    again = extract_features(encoder, images, cache_dir=tmp_path, key="t", quiet=True)
    np.testing.assert_array_equal(first, again)
    assert file.stat().st_size == size  # rebuilt, so the next run reads it
    assert [p.name for p in tmp_path.iterdir()] == [file.name]


def test_a_failed_feature_cache_write_leaves_nothing(encoder, tmp_path, monkeypatch):
    from workbench.models import visual

    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)

    def disk_full(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(visual.np, "save", disk_full)
    with pytest.warns(RuntimeWarning, match="could not write the feature cache"):
        feats = visual.extract_features(encoder, images, cache_dir=tmp_path, key="t", quiet=True)
    assert feats.shape[0] == 2 and list(tmp_path.iterdir()) == []


def test_a_run_from_before_a_default_lr_changed_is_the_run_at_that_lr(tmp_path):
    # A run whose config.json leaves lr to the method's default, written while that default was
    # another value: its identity record holds the lr it trained at, which the hash covers.
    store = RunStore(tmp_path)
    cfg = RunConfig(backbone="/nonexistent/ckpt", method="lora")
    earlier = cfg.replace(lr=cfg.default_lr() * 2)
    h, recs = records()
    recs = {**recs, "config": cfg.to_dict(), "identity": {"hash": earlier.hash, "payload": earlier.hash_payload()}}
    store.write(earlier.hash, recs)
    loaded = load_run(earlier.hash, store)
    assert loaded.config.lr == earlier.lr and loaded.config.hash == earlier.hash
    assert load_results(store)["lr"].tolist() == [earlier.lr]
    assert cfg.hash != earlier.hash  # the default-lr config names a new run: it is trained, not reused
    # another edited field is still damage
    store.write(h, {**recs, "config": {**cfg.to_dict(), "seed": 99}})
    with pytest.raises(DamagedRunError, match="does not match the run's hash"):
        load_run(h, store)
