"""Ray Train integration: DDP learning, resume by re-run, recovery from a killed worker, CLI."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mcl_ray.core.config import load_config
from mcl_ray.data.prepare import prepare
from mcl_ray.train.trainer import train_one

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def cfg_for(run_dir, *overrides):
    return load_config(ROOT / "experiments/ml1m_swr_quick.yaml", [
        f"run_dir={run_dir}", "data.max_interactions=150000", "train.batch_size=1024", "train.lr=0.003",
        "model.hidden=[64,32]", "model.tower_hidden=[16]", "evaluate.ranking_users=50", "model.text.mode=off",
        *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    run_dir = tmp_path_factory.mktemp("train")
    res = prepare(cfg_for(run_dir))
    return run_dir, res.out_dir


def test_ddp_two_workers_learns(prepared):
    run_dir, pdir = prepared
    # the user and item tables train with sparse gradients (gloo all-reduces them) and SparseAdam
    # max_failures=1: in two full-suite runs (CI and here) rank 0 died once of a SIGSEGV in malloc
    # (heap corruption) in epoch 3; alone, and in a plain torch gloo + SparseAdam DDP script of 2,000
    # steps, it never did. A crash resumes from the last checkpoint, as users' runs would.
    cfg = cfg_for(run_dir, "train.num_workers=2", "train.cpus_per_worker=1", "train.epochs=3",
                  "train.sparse_embedding_rows=500", "train.max_failures=1")
    res = train_one(cfg, pdir, run_dir / "ddp", seed=1)
    assert [h["world_size"] for h in res.history] == [2, 2, 2]
    parts = json.loads((res.train_dir / "checkpoint" / "state.json").read_text())["optimizer"]["parts"]
    assert set(parts) == {"dense", "sparse"}
    assert max(h["val_auc"] for h in res.history) > 0.7
    m = res.metrics
    assert m["overall"]["auc"] > 0.7 and set(m["by_scenario"]) == {"s0_age_under25", "s1_age_25_34", "s2_age_35plus"}
    assert 0 <= m["overall"]["gauc"] <= 1
    assert all(0 <= r["recall@10"] <= 1 for r in m["ranking"].values())
    for f in ("model.safetensors", "metrics.json", "learning_curves.png", "scenario_auc.png", "checkpoint/state.json"):
        assert (res.train_dir / f).exists(), f
    # reusing a finished run does no work
    again = train_one(cfg, pdir, run_dir / "ddp", seed=1)
    assert again.cached and again.metrics["overall"]["auc"] == m["overall"]["auc"]


def test_rerun_resumes_at_next_epoch_with_identical_weights(prepared):
    run_dir, pdir = prepared
    out = run_dir / "resume"
    sparse = "train.sparse_embedding_rows=500"  # both optimizers' state must carry over
    first = train_one(cfg_for(run_dir, "train.epochs=2", "train.num_workers=1", sparse), pdir, out, seed=2,
                      evaluate=False)
    assert [h["epoch"] for h in first.history] == [0, 1]
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    from mcl_ray.models.backbones import build_model
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.models import weights as ck

    cfg3 = cfg_for(run_dir, "train.epochs=3", "train.num_workers=1", sparse)
    model = build_model(FeatureSpec.load(pdir), cfg3.model)
    model.load_state_dict(saved)
    digest = ck.weights_digest(model)
    second = train_one(cfg3, pdir, out, seed=2, evaluate=False)
    assert [h["epoch"] for h in second.history] == [0, 1, 2]  # one new epoch, history kept
    state = json.loads((out / "checkpoint" / "state.json").read_text())["state"]
    assert state["resumes"] == [{"from": "rerun", "epoch": 2, "weights": digest}]


def test_killed_worker_recovers_from_last_checkpoint(prepared):
    run_dir, pdir = prepared
    out = run_dir / "kill"
    # small batches: epochs long enough to kill one mid-way
    cfg = cfg_for(run_dir, "train.epochs=3", "train.num_workers=1", "train.max_failures=1", "train.batch_size=256")
    result = {}
    th = threading.Thread(target=lambda: result.update(r=train_one(cfg, pdir, out, seed=3, evaluate=False)))
    th.start()
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "history.json").exists():
        time.sleep(0.2)
    assert (out / "history.json").exists(), "first epoch never finished"
    time.sleep(0.5)  # now inside epoch 2
    pid = int((out / "worker_rank0.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    th.join(timeout=400)
    assert not th.is_alive()
    hist = result["r"].history
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    state = json.loads((out / "checkpoint" / "state.json").read_text())["state"]
    assert [r["from"] for r in state["resumes"]] == ["failure"] and state["resumes"][0]["epoch"] == 1
    assert int((out / "worker_rank0.pid").read_text()) != pid  # a new worker process finished the run


def test_cli_train_with_seeds_and_evaluate(prepared):
    from typer.testing import CliRunner

    from mcl_ray.cli import app

    run_dir, pdir = prepared
    cfgs = ["--set", f"run_dir={run_dir}", "--set", "data.max_interactions=150000", "--set", "train.epochs=1",
            "--set", "model.hidden=[32]", "--set", "evaluate.ranking_users=20", "--set", "train.batch_size=2048",
            "--set", "model.text.mode=off", "--set", f"tracking.mlflow_uri=sqlite:///{run_dir / 'mlflow.db'}",
            "--set", "tracking.mlflow_experiment=cli-seeds",
            # two-stage: a retrieval model trains first, each seed's evaluation measures retrieve-then-rank
            "--set", "retrieval.enabled=true", "--set", "retrieval.candidates=200"]
    r = CliRunner().invoke(app, ["train", str(ROOT / "experiments/ml1m_swr_quick.yaml"), "--seeds", "2", *cfgs])
    assert r.exit_code == 0, r.output
    assert "two_tower seed 2024" in r.output and "two-stage (retrieve 200, rank)" in r.output
    retrieval = json.loads((run_dir / "retrieval" / "metrics.json").read_text())
    assert all(0 < m["recall@200"] <= 1 and m["recall@200"] >= m["recall@10"] for m in retrieval["ranking"].values())
    assert "2 seeds (mean ± std)" in r.output and "±" in r.output
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["overall"]["auc"]["n"] == 2 and summary["seeds"] == [2024, 2025]
    # MLflow (configured): one run per seed with its params and per-epoch metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cli-seeds").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["ml1m_swr_quick-retrieval-seed2024", "ml1m_swr_quick-seed2024",
                                                     "ml1m_swr_quick-seed2025"]
    assert all(r.data.params["train.epochs"] == "1" and "val_auc" in r.data.metrics for r in runs)
    assert len(client.get_metric_history(runs[0].info.run_id, "val_auc")) == 1
    # top-K ranking: every scenario, bounded metrics, held-out positives of sampled users
    scenarios = json.loads((run_dir / "prepare" / "feature_spec.json").read_text())["scenario_names"]
    assert set(summary["ranking"]) == set(scenarios)
    for name, m in summary["ranking"].items():
        assert {"recall@10", "ndcg@10", "hitrate@20"} <= set(m)
        assert all(0.0 <= v["mean"] <= 1.0 and v["n"] == 2 for v in m.values()), (name, m)
        assert m["hitrate@20"]["mean"] >= m["hitrate@10"]["mean"]
    seed_metrics = json.loads((run_dir / "train" / "seed_2024" / "metrics.json").read_text())
    assert seed_metrics["split"] == "test" and all(v["users"] > 0 for v in seed_metrics["ranking"].values())
    # fairness by user group: gender and age (occupation has 21 values > fairness_max_values, zip is id-like)
    fair = seed_metrics["fairness"]
    assert set(fair["groups"]) == {"gender", "age"} and set(fair["groups"]["gender"]["values"]) == {"F", "M"}
    g = fair["groups"]["gender"]
    assert sum(v["n"] for v in g["values"].values()) == seed_metrics["overall"]["n"]  # every test row has a gender
    assert sum(v["users"] for v in g["values"].values()) == sum(v["users"] for v in seed_metrics["ranking"].values())
    assert g["gap"]["auc"] == abs(g["values"]["F"]["auc"] - g["values"]["M"]["auc"])
    shares = [b["exposure_share"] for b in fair["exposure"]["buckets"]]
    assert fair["exposure"]["k"] == 10 and len(shares) == 3 and abs(sum(shares) - 1) < 1e-9
    assert "metrics by user group" in r.output and "exposure by item popularity" in r.output
    assert summary["fairness"]["groups"]["gender"]["gap"]["auc"]["n"] == 2  # mean ± std over the seeds

    two = seed_metrics["ranking_two_stage"]
    assert two["candidates"] == 200 and set(two["by_scenario"]) == set(scenarios)
    for name, m in two["by_scenario"].items():  # the same users; ranking 200 items can only lose recall@10 ...
        assert m["users"] == seed_metrics["ranking"][name]["users"] and 0 <= m["ndcg@10"] <= 1
    r = CliRunner().invoke(app, ["export", str(run_dir)])  # ... and the artifact carries model and index
    assert r.exit_code == 0, r.output
    art = run_dir / "artifact"
    assert (art / "retrieval" / "items.faiss").exists() and json.loads((art / "manifest.json").read_text())["retrieval"]

    r = CliRunner().invoke(app, ["evaluate", str(run_dir)])
    assert r.exit_code == 0, r.output
    assert "test metrics" in r.output and "overall" in r.output
    # validation metrics never replace the test metrics that export packages
    r = CliRunner().invoke(app, ["evaluate", str(run_dir), "--split", "valid"])
    assert r.exit_code == 0, r.output
    assert "valid metrics" in r.output
    assert json.loads((run_dir / "train" / "seed_2024" / "metrics.json").read_text()) == seed_metrics
    assert json.loads((run_dir / "train" / "seed_2024" / "metrics_valid.json").read_text())["split"] == "valid"
    r = CliRunner().invoke(app, ["evaluate", str(run_dir), "--split", "nope"])
    assert r.exit_code == 2 and "--split must be test or valid" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(run_dir / "nothing")])
    assert r.exit_code == 1 and "no trained model" in r.output
