"""Every study runs, unchanged, on the real-data fixtures (VQA v2, COCO captions) with a tiny T5 or BART
through the CLI: ``python -m workbench.studies run NAME --backbone DIR --task vqa-v2 ...``."""

import json
from pathlib import Path

import pytest

from workbench.studies import retarget
from workbench.studies.__main__ import main
from workbench.train import RunConfig, RunStore, load_results

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# A smoke-test budget: the fixture files hold a handful of questions and captions.
SMOKE = ["--set", "n_shots=2", "--set", "max_steps=2", "--set", "eval_every=1", "--set", "batch_size=2",
         "--set", "pool_size=null", "--set", "test_size=null"]


def data_args(real_data, *tasks):
    out = []
    for task in tasks:
        out += ["--task", task]
    # each real task reads its own folder: the options are per run, so one folder per invocation
    folder = {"vqa-v2": "vqa_v2", "coco-caption": "coco"}[tasks[0]]
    return out + ["--task-option", f"root={FIXTURES / folder}", "--task-option", f"features={real_data.store}",
                  "--backbone-option", f"feat_dim={real_data.feat_dim}"]


@pytest.mark.parametrize("study, filters, family", [
    ("mixphm", ["method=mixphm,lora", "n_shots=16", "seed=13"], "t5"),
    ("vlpet", ["method=vlpet", "n_shots=16", "seed=13", "method_config__granularity=large,small"], "t5"),
    ("petal", ["method=petal", "n_shots=16", "seed=13"], "bart"),
])
def test_study_runs_on_vqa_v2(study, filters, family, hf_backbones, real_data, tmp_path, capsys):
    args = ["run", study, "--store", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
            "--backbone", str(hf_backbones[family]), "--no-progress", "--limit", "2"]
    for f in filters:
        args += ["--filter", f]
    assert main(args + data_args(real_data, "vqa-v2") + SMOKE) == 0, capsys.readouterr().err
    df = load_results(RunStore(tmp_path / "runs"))
    assert 1 <= len(df) <= 2 and set(df["task"]) == {"vqa-v2"}
    assert (df["backbone"] == str(hf_backbones[family])).all()
    assert df["test_acc"].between(0, 1).all()
    out = capsys.readouterr().out
    assert f"{len(df)} trained" in out and f"{len(df)} of {len(df)} grid runs finished" in out
    # the same command again trains nothing: the retargeted runs resume from the store
    assert main(args + data_args(real_data, "vqa-v2") + SMOKE) == 0
    assert "0 trained" in capsys.readouterr().out


def test_empirical_runs_on_coco_captions(hf_backbones, real_data, tmp_path, capsys):
    args = ["run", "empirical", "--store", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
            "--backbone", str(hf_backbones["t5"]), "--no-progress", "--limit", "2",
            "--filter", "task=shapes-caption", "--filter", "n_shots=16", "--filter", "seed=13",
            "--filter", "method=lora,prompt"]
    assert main(args + data_args(real_data, "coco-caption") + SMOKE + ["--set", "n_shots=1"]) == 0, \
        capsys.readouterr().err
    runs = RunStore(tmp_path / "runs")
    df = load_results(runs)
    assert set(df["task"]) == {"coco-caption"} and len(df) == 2
    stored = json.loads((runs.root / df["run"].iloc[0] / "config.json").read_text())
    assert stored["task_options"]["root"].endswith("coco")


def test_retarget_replaces_by_kind_and_checks_first():
    configs = [
        RunConfig(task="shapes-vqa", method="lora", task_options={"n_scenes": 40}),
        RunConfig(task="shapes-caption", method="lora"),
    ]
    out = retarget(configs, backbone="some/t5", backbone_options={"feat_dim": 2048},
                   tasks=["vqa-v2", "coco-caption"], task_options={"root": "data"}, changes={"n_shots": 2})
    assert [c.task for c in out] == ["vqa-v2", "coco-caption"]
    assert all(c.backbone == "some/t5" and c.backbone_options == {"feat_dim": 2048} for c in out)
    assert all(c.task_options == {"root": "data"} and c.n_shots == 2 for c in out)
    with pytest.raises(ValueError, match="no caption task was given"):
        retarget(configs, tasks="vqa-v2")
    with pytest.raises(ValueError, match="two vqa tasks"):
        retarget(configs, tasks=["vqa-v2", "gqa"])
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        retarget(configs, tasks=["vqa"])
    with pytest.raises(ValueError, match="unknown RunConfig field"):
        retarget(configs, changes={"shots": 2})
    with pytest.raises(ValueError, match="give the task too"):
        retarget(configs, task_options={"root": "data"})


def test_cli_reports_bad_retargeting(capsys, tmp_path):
    assert main(["run", "empirical", "--store", str(tmp_path), "--task", "vqa-v2", "--no-progress"]) == 2
    assert "no caption task was given" in capsys.readouterr().err
    assert main(["run", "mixphm", "--store", str(tmp_path), "--set", "n_shots", "--no-progress"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err
