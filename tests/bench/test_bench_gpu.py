"""bench_gpu.py's measuring code, smoke-run on the CPU so that it still works when a GPU is lent."""

import pytest


def test_smoke_on_cpu(capsys, load_bench):
    bench = load_bench("bench_gpu")
    bench.main(["--device", "cpu", "--shape", "tiny", "--steps", "1", "--batch", "2", "--methods", "full",
                "--matmul-n", "64"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("full ")]
    assert [r[2] for r in rows] == ["fp32", "bf16", "+"], out  # fp32, bf16, + fused AdamW
    for r in rows:
        steps_s, mfu = float(r[-5]), float(r[-2].rstrip("%"))
        assert steps_s > 0 and 0 < mfu < 1000, out


def test_flops_are_counted_per_step(load_bench):
    bench = load_bench("bench_gpu")
    shape = bench.SHAPES["tiny"]
    one = bench.base_sized("full", "fp32", 2, 1, "cpu", shape, warmup=0)
    two = bench.base_sized("full", "fp32", 4, 1, "cpu", shape, warmup=0)
    assert one["flops"] > 0 and two["flops"] == pytest.approx(2 * one["flops"], rel=0.01)


def test_cuda_graphs_need_cuda(load_bench):
    with pytest.raises(SystemExit):
        load_bench("bench_gpu").main(["--device", "cpu", "--shape", "tiny", "--cuda-graphs"])
