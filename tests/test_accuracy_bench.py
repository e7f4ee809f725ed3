"""bench/accuracy_bench.py's bookkeeping (no training here): results written after every job, in job
order; --set runs in folders of their own (and prepare.* keys reach the run's prepare); a resume never mixes
overrides, history lengths or epoch caps."""

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "bench/accuracy_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(backbone: str, seed: int, auc: float) -> dict:
    scen = {"s0": {"auc": auc, "logloss": 0.5}, "s1": {"auc": auc + 0.01, "logloss": 0.5}}
    return {"backbone": backbone, "seed": seed, "auc": auc, "logloss": 0.5, "val_auc": auc - 0.001,
            "auc_at_sample": auc, "auc_thin_users": auc - 0.05, "auc_corrupted": auc - 0.07, "by_scenario": scen}


def test_set_overrides_get_their_own_train_folder(bench):
    plain = bench.job_dir_name("shared_bottom+hist", 2024, [])
    assert plain == "shared_bottom+hist_seed2024"
    lr = bench.job_dir_name("shared_bottom+hist", 2024, ["train.lr=0.003"])
    assert lr.startswith(plain + "_") and lr != bench.job_dir_name("shared_bottom+hist", 2024, ["train.lr=0.01"])
    # another epoch cap is another run: it must not retrain into (or reuse) the protocol's folder
    assert bench.job_dir_name("shared_bottom+hist", 2024, [], bench.EPOCHS) == plain
    longer = bench.job_dir_name("shared_bottom+hist", 2024, ["train.lr=0.003"], 25)
    assert longer.startswith(plain + "_") and longer != lr


def test_set_prepare_keys_shape_the_runs_one_prepare(bench, tmp_path):
    from mcl_ray.core.config import load_config

    sets = ["train.lr=0.003", "prepare.history.label_buckets=[1.5, 2.5, 3.5, 4.5]"]
    cfg = load_config(ROOT / "experiments/ml1m_swr.yaml", bench.parent_overrides(str(tmp_path), 20, sets))
    assert cfg.prepare.history.length == 20 and cfg.prepare.history.label_buckets == [1.5, 2.5, 3.5, 4.5]
    assert cfg.train.lr == load_config(ROOT / "experiments/ml1m_swr.yaml").train.lr  # a job's key, not prepare's


def test_results_are_written_in_job_order_with_pending_jobs(bench, tmp_path):
    a = Namespace(backbones=["a", "b"], seeds=2, epochs=15, history=20, set=["train.lr=0.003"],
                  out=str(tmp_path / "r.json"))
    runs = [_run("b", 2025, 0.80), _run("a", 2024, 0.81)]  # finished out of order
    bench.write_results(a, runs, None, 0.0, pending=2)
    d = json.loads(Path(a.out).read_text())
    assert [(r["backbone"], r["seed"]) for r in d["runs"]] == [("a", 2024), ("b", 2025)]
    assert d["pending_jobs"] == 2 and d["overrides"] == ["train.lr=0.003"] and d["history_length"] == 20
    assert d["table"]["a"]["seeds"] == 1 and d["table"]["a"]["auc"]["mean"] == pytest.approx(0.81)
    runs += [_run("a", 2025, 0.83), {"backbone": "b", "seed": 2024, "error": "boom"}]
    table = bench.write_results(a, runs, None, 0.0, pending=0)
    d = json.loads(Path(a.out).read_text())
    assert "pending_jobs" not in d
    assert table["a"]["auc"]["mean"] == pytest.approx(0.82) and table["b"]["seeds"] == 1  # the failed job left out
    assert table["a"]["by_scenario"]["s1"]["auc"]["mean"] == pytest.approx(0.83)


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.lr=0.01"], "--set"),
    (["--history-length", "50"], "history length"),
    (["--epochs", "25"], "--epochs"),
])
def test_resume_refuses_a_file_run_otherwise(bench, tmp_path, monkeypatch, argv, message):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"runs": [], "overrides": [], "history_length": 20, "epochs_cap": 15}))
    monkeypatch.setattr(sys, "argv", ["accuracy_bench.py", "--backbones", "shared_bottom+hist", "--resume",
                                      "--out", str(out), *argv])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert message in str(e.value)
