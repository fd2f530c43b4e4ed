"""sweep(executor="ray") on a local 2-CPU Ray: the same metrics and weights as executor="local",
the store written by the driver, finished runs reused without the cluster; an unreachable cluster
and impossible resource requests fail fast, before anything runs.

Ray is a dependency of the test extra. Without it these tests skip, except under CI (``$CI`` set),
where a missing Ray is a failure: the executor must not go untested there.
"""

import os
import socket
import time

import pytest
import torch

from workbench.train import RunConfig, RunStore, grid, load_run, sweep


@pytest.fixture(scope="module")
def ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("ray is not installed but CI is set: install the test extra (pip install -e '.[test]')")
        pytest.skip("ray is not installed (pip install ray, or the test extra)")
    return ray


@pytest.fixture(scope="module")
def local_ray(ray):
    """A local Ray with 2 CPUs and 1 GPU, started for this module (address="local": never a cluster
    from $RAY_ADDRESS). The GPU is only declared: Ray counts it, so fractional requests are scheduled
    as on a GPU node; the test runs set device="cpu", so nothing needs CUDA."""
    started = not ray.is_initialized()
    auth_mode = os.environ.get("RAY_AUTH_MODE")  # a new local Ray may turn token auth on for this process
    if started:
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode


@pytest.fixture
def tiny(tiny_backbone, tmp_path, monkeypatch):
    """A run of 4 optimiser steps on the tiny backbone (a second or two on one core), on the CPU
    also where CUDA exists, so that the local reference and the Ray tasks run the same kernels."""
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "default-runs"))
    return RunConfig(backbone=str(tiny_backbone), task="shapes-vqa", method="lora", n_shots=16, seed=13,
                     max_steps=4, eval_every=2, patience=2, batch_size=8, pool_size=64, test_size=24,
                     device="cpu", quiet=True, task_options={"n_scenes": 40})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def not_connected(ray, monkeypatch):
    """This process looks unconnected to Ray, and ray.init must not be reached."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def init(*args, **kwargs):
        raise AssertionError(f"ray.init was called ({args}, {kwargs}): the address should have been refused first")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("how", ["env", "argument"])
def test_an_unreachable_cluster_fails_fast_and_says_how_to_start_one(not_connected, tiny, tmp_path, monkeypatch, how):
    address = f"127.0.0.1:{_closed_port()}"
    kwargs = {}
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        kwargs["ray_address"] = address
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        sweep([tiny], executor="ray", store=tmp_path / "store", progress=False, **kwargs)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert f"the Ray cluster at {address}" in msg and "cannot be reached" in msg and "nothing was run" in msg
    assert ("$RAY_ADDRESS" if how == "env" else "ray_address=") in msg  # where the address came from
    assert "ray start --head" in msg and "unset RAY_ADDRESS" in msg  # how to start a cluster, or a local Ray
    assert not RunStore(tmp_path / "store").finished()


@pytest.fixture
def silent_port():
    """A port where TCP connections open but nothing ever answers (a wrong port, a stuck proxy)."""
    import threading

    srv = socket.create_server(("0.0.0.0", 0))
    conns = []

    def accept():
        try:
            while True:
                conns.append(srv.accept()[0])
        except OSError:  # closed
            pass

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()
    for c in conns:
        c.close()


def test_an_address_where_no_ray_answers_is_given_up_within_seconds(not_connected, tiny, tmp_path, silent_port,
                                                                    monkeypatch):
    """The TCP connection opens, so the socket check passes; Ray's GCS client gets no answer (ray.init
    would retry for minutes) and is given up after the probe's timeout (8 s, 2 s here)."""
    from workbench.train import sweeps

    monkeypatch.setattr(sweeps, "_RAY_PROBE_TIMEOUT_S", 2.0)
    address = f"127.0.0.1:{silent_port}"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"the Ray cluster at {address} \(ray_address=\) cannot be reached "
                                              r"\(a connection opens but no Ray head answers"):
        sweep([tiny], executor="ray", store=tmp_path / "store", ray_address=address, progress=False)
    assert time.monotonic() - t0 < 15


def test_resources_are_checked_before_anything_runs(ray, tiny, tmp_path):
    store = tmp_path / "store"
    with pytest.raises(ValueError, match="num_gpus must be a number >= 0"):
        sweep([tiny], executor="ray", num_gpus=-1, store=store, progress=False)
    with pytest.raises(ValueError, match="above 1 must be whole"):
        sweep([tiny], executor="ray", num_gpus=1.5, store=store, progress=False)
    with pytest.raises(ValueError, match=r"num_cpus, num_gpus are for executor='ray'"):
        sweep([tiny], executor="local", num_cpus=2, num_gpus=0.5, store=store, progress=False)
    with pytest.raises(ValueError, match=r"ray_address is for executor='ray'.*workers= and threads="):
        sweep([tiny], executor="processes", ray_address="10.0.0.1:6379", store=store, progress=False)
    assert not RunStore(store).finished()


def test_a_request_no_node_can_hold_fails_instead_of_waiting(local_ray, tiny, tmp_path):
    """The local Ray has 2 CPUs and 1 GPU: num_gpus=2 or num_cpus=3 could never be scheduled."""
    with pytest.raises(ValueError, match=r"num_gpus=2 but no node of the cluster has that many \(largest node: 1 GPU"):
        sweep([tiny], executor="ray", num_gpus=2, store=tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match=r"num_cpus=3 but no node.*largest node: 2 CPU"):
        sweep(grid(tiny, seed=[13, 21]), executor="ray", ray_options=lambda c: {"num_cpus": 3 if c.seed == 21 else 1},
              store=tmp_path / "s", progress=False)
    assert not RunStore(tmp_path / "s").finished()


class _FakeRay:
    """Records what sweep submits (options, threads, hide_gpus); every task "fails" without running."""

    def __init__(self, gpus: float):
        self.gpus, self.submitted = gpus, []

    def is_initialized(self):
        return True

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": self.gpus}}]

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **opts):
                class Bound:
                    def remote(self, cfg_dict, threads, hide_gpus):
                        fake.submitted.append((cfg_dict["method"], opts, threads, hide_gpus))
                        return len(fake.submitted)
                return Bound()
        return Task()

    def wait(self, pending, num_returns=1):
        return pending[:1], pending[1:]

    def get(self, ref):
        return ("failed", "RuntimeError: not run (fake Ray)", None)

    def cancel(self, ref):
        pass


def test_per_task_resources_threads_and_gpu_visibility(tiny, tmp_path, monkeypatch):
    """What each task is given, on a (fake) cluster with one GPU: sweep's num_cpus / num_gpus
    override ray_options; torch threads follow num_cpus; a task without a GPU is shown none and its
    worker exits after it (max_calls=1), so a CUDA-less process never serves a GPU task later."""
    from workbench.train import sweeps

    configs = grid(tiny, method=["lora", "full"])
    fake = _FakeRay(gpus=1.0)
    monkeypatch.setattr(sweeps, "_import_ray", lambda: fake)
    df = sweep(configs, executor="ray", num_gpus=0.25, store=tmp_path / "a", progress=False)
    assert df["status"].tolist() == ["failed", "failed"] and "fake Ray" in df["error"][0]
    assert fake.submitted == [("lora", {"num_cpus": 1, "num_gpus": 0.25}, 1, False),
                              ("full", {"num_cpus": 1, "num_gpus": 0.25}, 1, False)]

    fake.submitted.clear()
    def per_method(c):
        return {"num_gpus": 1} if c.method == "full" else {"max_retries": 0}

    sweep(configs, executor="ray", num_cpus=2.5, ray_options=per_method, store=tmp_path / "b", progress=False)
    assert fake.submitted == [("lora", {"num_cpus": 2.5, "max_retries": 0, "max_calls": 1}, 2, True),
                              ("full", {"num_cpus": 2.5, "num_gpus": 1}, 2, False)]

    fake.submitted.clear()
    cpu_only = _FakeRay(gpus=0.0)
    monkeypatch.setattr(sweeps, "_import_ray", lambda: cpu_only)
    sweep(configs[:1], executor="ray", threads=3, store=tmp_path / "c", progress=False)
    assert cpu_only.submitted == [("lora", {"num_cpus": 1}, 3, False)]  # no GPU anywhere: nothing hidden


# ---------------------------------------------------------------------------- the executor
def _weights(store: RunStore, h: str) -> dict:
    from safetensors.torch import load_file

    return load_file(store.path(h) / "method.safetensors")


def test_ray_gives_the_local_metrics_and_the_driver_writes_the_store(local_ray, tiny, tmp_path, monkeypatch):
    configs = grid(tiny, seed=[13, 21], method=["lora", "prompt"])
    bad = tiny.replace(task_options={**tiny.task_options, "target": "bogus"})

    # The local reference with the thread count of a Ray task with num_cpus=1 (one torch thread):
    # float sums are split differently over 2 threads, so only equal thread counts are bit-identical.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = sweep(configs, store=tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(before)

    store = RunStore(tmp_path / "ray")
    # Two runs share the (declared) GPU at a time: num_gpus=0.5 each, one CPU each.
    df = sweep(configs + [bad, configs[0]], executor="ray", store=store, num_cpus=1, num_gpus=0.5, progress=False)
    assert df["status"].tolist() == ["done"] * 4 + ["failed", "reused"]
    assert "target" in df["error"][4] and df["error"][:4].isna().all()
    assert df["run"].tolist()[:4] == local["run"].tolist() == [c.hash for c in configs]

    # Bit-identical: the metrics, every logged loss and dev score, and the trained weights.
    for col in ("test_acc", "test_acc_last", "dev_best", "trainable", "trainable_pct"):
        assert df[col][:4].tolist() == local[col].tolist(), col
    ref = RunStore(tmp_path / "local")
    for h in local["run"]:
        assert store.is_finished(h)  # written by the driver from what the task sent back
        got, want = load_run(h, store), load_run(h, ref)
        assert got.history == want.history and got.predictions == want.predictions
        assert got.metrics["test"] == want.metrics["test"]
        a, b = _weights(store, h), _weights(ref, h)
        assert a.keys() == b.keys() and len(a) > 0
        assert all(torch.equal(a[k], b[k]) for k in a)

    # A second sweep reuses every run from the store and never touches Ray.
    def no_ray(*args, **kwargs):
        raise AssertionError("a finished run was sent to Ray")

    monkeypatch.setattr(local_ray, "remote", no_ray)
    monkeypatch.setattr(local_ray, "wait", no_ray)
    again = sweep(configs, executor="ray", store=store, progress=False)
    assert again["status"].tolist() == ["reused"] * 4
    assert again["test_acc"].tolist() == local["test_acc"].tolist()
