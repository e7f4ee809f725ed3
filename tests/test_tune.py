"""Ray Tune + Optuna sweeps: search-space validation, ASHA, interruption and resumption, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mcl_ray.core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments/ml1m_swr_quick.yaml"


def space(text: str) -> list[str]:
    return [f"tune.space={text}"]


@pytest.mark.parametrize("override, expect", [
    ('{"train.lrr": {"type": "loguniform", "low": 0.001, "high": 0.1}}', "train.lrr: unknown key (allowed in train:"),
    ('{"optimizer.lr": {"type": "uniform", "low": 0, "high": 1}}', "searchable keys are model.<key>, train.<key> or augment.weight"),
    ('{"augment.num_users": {"type": "int", "low": 10, "high": 20}}', "searchable keys are model.<key>, train.<key> or augment.weight"),
    ('{"train.lr": {"type": "loguniform", "low": 0, "high": 0.1}}', "tune.space.train.lr.low: Input should be greater than 0"),
    ('{"train.lr": {"type": "uniform", "low": 0.1, "high": 0.01}}', "low (0.1) must be below high (0.01)"),
    ('{"train.lr": {"type": "normal", "low": 0.1, "high": 1}}', "does not match any of the expected tags: 'loguniform'"),
    ('{"model.backbone": {"type": "choice", "values": ["mmoe", "moe"]}}', "value 'moe' is not valid for model.backbone"),
    ('{"model.dropout": {"type": "uniform", "low": 0.1, "high": 1.5}}', "value 1.5 is not valid for model.dropout"),
    ('{"train.epochs": {"type": "int", "low": 1, "high": 5}}', "train.epochs: this key is fixed per sweep"),
    ('{"train.lr": {"type": "choice", "values": []}}', "tune.space.train.lr.values: List should have at least 1 item"),
])
def test_bad_search_space_is_a_config_error(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, space(override))
    assert expect in str(e.value)


def test_search_space_maps_to_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    from mcl_ray.tune.space import default_point, search_space, trial_config

    cfg = load_config(BASE, space('{"train.lr": {"type": "loguniform", "low": 0.001, "high": 0.01}, '
                                  '"model.num_experts": {"type": "int", "low": 2, "high": 8}, '
                                  '"model.hidden": {"type": "choice", "values": [[64], [128, 64]]}}')
                      + ["model.hidden=[64]"])
    sp = search_space(cfg.tune)
    assert isinstance(sp["train.lr"], Float) and isinstance(sp["model.num_experts"], Integer)
    assert isinstance(sp["model.hidden"], Categorical) and sp["model.hidden"].categories == ["[64]", "[128, 64]"]
    assert sp["model.num_experts"].upper == 9  # inclusive high
    assert default_point(cfg) == {"train.lr": 0.003, "model.num_experts": 4, "model.hidden": "[64]"}
    t = trial_config(cfg.model_dump(mode="json"), {"train.lr": 0.002, "model.hidden": "[128, 64]"})
    assert t.train.lr == 0.002 and t.model.hidden == [128, 64]


@pytest.mark.ray
def test_sweep_asha_interrupt_resume_and_export(tmp_path, ray_cluster):
    from mcl_ray.artifact import load_model, open_artifact
    from mcl_ray.data.prepare import prepare
    from mcl_ray.evaluate.metrics import binary_metrics
    from mcl_ray.evaluate.evaluate import predict
    from mcl_ray.models.batch import load_split
    from mcl_ray.tune.sweep import sweep

    raw = yaml.safe_load(BASE.read_text())
    raw.update(run_dir=str(tmp_path / "run"), data={"source": "movielens-1m", "max_interactions": 20000})
    raw["train"] = {"epochs": 3, "lr": 0.003, "batch_size": 1024}
    # text off: the sweep itself is under test here (text features: tests/test_text_features.py)
    raw["model"] = {"hidden": [64, 32], "tower_hidden": [16], "text": {"mode": "off"}}
    raw["evaluate"] = {"ranking_users": 0}
    # The experiment's own config (a good lr, the top of the range) runs first; the seeded sampler
    # then draws far smaller rates, so ASHA (rungs at epochs 1 and 2) has weaker trials to stop.
    raw["tune"] = {"num_samples": 4, "max_concurrent_trials": 1, "scheduler": "asha", "grace_period": 1,
                   "reduction_factor": 2, "seed": 3, "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
                   "space": {"train.lr": {"type": "loguniform", "low": 1e-6, "high": 3e-3},
                             "model.dropout": {"type": "choice", "values": [0.1, 0.2]}}}
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_file)
    prep = prepare(cfg)
    trials = tmp_path / "run/tune/trials"

    # 1. a sweep in another process (same cluster), interrupted once its first trial finished
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "mcl_ray.cli", "tune", str(cfg_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(trials.glob("*/starts.log"))) >= 2:  # trial 2 started: trial 1 is finished
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "run the same command again to resume" in output
    first = min(trials.glob("*/starts.log"), key=lambda p: float(p.read_text().split()[0])).parent
    assert (first / "history.json").exists()

    # 2. the same sweep again: resumes, does not repeat the finished trial
    res = sweep(cfg, prep.out_dir, Path(cfg.resolved_run_dir()))
    assert len(res.trials) == 4 and len(list(trials.iterdir())) == 4
    assert len((first / "starts.log").read_text().splitlines()) == 1
    by_id = {r["trial_id"]: r for r in res.trials}
    default = by_id[first.name]
    assert default["params"] == {"train.lr": 0.003, "model.dropout": 0.1}  # include_default: the first trial
    assert any(r["status"] == "early-stopped" for r in res.trials), res.trials
    assert res.winner["best_val_auc"] == max(r["best_val_auc"] for r in res.trials)

    # 3. the exported winner reproduces its reported validation AUC; test metrics only for it
    art = open_artifact(res.artifact)
    assert art.manifest["source"]["trial_id"] == res.winner["trial_id"]
    assert art.metrics["test"]["overall"]["auc"] == pytest.approx(res.test_metrics["overall"]["auc"])
    valid = load_split(prep.out_dir, art.spec, "valid")
    p = predict(load_model(art), valid, 65536, torch.device("cpu"))
    auc = binary_metrics(valid.label.numpy(), p, valid.scenario.numpy(), art.spec.scenario_names)["overall"]["auc"]
    assert auc == pytest.approx(res.winner["best_val_auc"], abs=1e-6)
    assert [d.name for d in trials.iterdir() if (d / "metrics.json").exists()] == [res.winner["trial_id"]]
    for f in ("report.md", "history.png", "curves.png", "importance.png", "trials.json", "summary.json"):
        assert (res.tune_dir / f).exists(), f
    summary = json.loads((res.tune_dir / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["default"]["trial_id"] == first.name
    # the Optuna study persisted in the configured storage holds the trials
    import optuna

    study = optuna.load_study(study_name=cfg.name, storage=cfg.tune.storage)
    assert len(study.trials) >= 3


def test_augment_weight_is_searchable():
    from mcl_ray.tune.space import search_space, trial_config

    cfg = load_config(BASE, space('{"augment.weight": {"type": "choice", "values": [0, 0.5, 2]}}'))
    assert search_space(cfg.tune)["augment.weight"].categories == [0, 0.5, 2]
    assert trial_config(cfg.model_dump(mode="json"), {"augment.weight": 2}).augment.weight == 2
    with pytest.raises(ConfigError, match="augment.weight: value -1"):
        load_config(BASE, space('{"augment.weight": {"type": "choice", "values": [-1, 1]}}'))


def test_perturbation_is_searchable():
    """The kind and the size of the embedding perturbation are ordinary sweep keys; a bad value in
    the space is refused before any trial runs."""
    from ray.tune.search.sample import Categorical, Float

    from mcl_ray.tune.space import search_space, trial_config

    cfg = load_config(BASE, space('{"train.perturbation": {"type": "choice", "values": ["none", "fgm", "pgd"]}, '
                                  '"train.perturbation_eps": {"type": "loguniform", "low": 0.01, "high": 1.0}}'))
    sp = search_space(cfg.tune)
    assert isinstance(sp["train.perturbation"], Categorical) and isinstance(sp["train.perturbation_eps"], Float)
    t = trial_config(cfg.model_dump(mode="json"), {"train.perturbation": "pgd", "train.perturbation_eps": 0.3})
    assert (t.train.perturbation, t.train.perturbation_eps) == ("pgd", 0.3)
    with pytest.raises(ConfigError, match="train.perturbation"):
        load_config(BASE, space('{"train.perturbation": {"type": "choice", "values": ["none", "gan"]}}'))
