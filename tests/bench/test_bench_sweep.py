"""bench_sweep.py --gpu's code path, smoke-run on the CPU so that it works when a GPU is lent."""


def test_gpu_sharing_smoke_on_cpu(capsys, tmp_path, monkeypatch, load_bench):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    bench = load_bench("bench_sweep")
    rows = bench.gpu_sharing(["--gpu", "--device", "cpu", "--runs", "2", "--steps", "2", "--share", "2",
                              "--no-ray"])
    out = capsys.readouterr().out
    assert [(setup, k) for setup, k, _ in rows] == [("one after the other (local)", 1), ("2 processes", 2)]
    assert all(wall > 0 for _, _, wall in rows)
    assert "2 runs (N = 16, 2 steps each) on CPU (smoke run)" in out and "target" in out


def test_gpu_configs_cover_methods_then_seeds(load_bench):
    bench = load_bench("bench_sweep")
    configs = bench.gpu_configs(6, 10, "cpu")
    assert len(configs) == 6 and {c.device for c in configs} == {"cpu"}
    assert {c.method for c in configs} == {"lora", "houlsby", "compacter", "prompt"}
    assert all(c.max_steps == 10 for c in configs)
