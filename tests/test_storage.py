"""Run directories on shared storage (pyarrow filesystem URIs): pull/push of the staged copy."""

import time

import pytest

from mcl_ray.core import storage
from mcl_ray.core.config import load_config


def test_push_then_pull_copies_only_what_changed(tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "train/seed_1/ray_results").mkdir(parents=True)
    (local / "prepare").mkdir()
    (local / "prepare/feature_spec.json").write_text("{}")
    (local / "train/seed_1/metrics.json").write_text('{"auc": 0.8}')
    (local / "train/seed_1/ray_results/state.json").write_text("x")
    uri = f"file://{remote}"
    assert storage.push(local, uri) == 2  # Ray Train's own state is not synced
    assert (remote / "train/seed_1/metrics.json").read_text() == '{"auc": 0.8}'
    assert not (remote / "train/seed_1/ray_results").exists()
    assert storage.push(local, uri) == 0  # nothing changed
    time.sleep(0.01)
    (local / "train/seed_1/metrics.json").write_text('{"auc": 0.81}')
    assert storage.push(local, uri) == 1

    other = tmp_path / "other"  # another machine: pulls the whole run directory, then nothing
    assert storage.pull(uri, other) == 2
    assert (other / "train/seed_1/metrics.json").read_text() == '{"auc": 0.81}'
    assert storage.pull(uri, other) == 0
    assert storage.pull(f"file://{tmp_path / 'nothing'}", tmp_path / "x") == 0  # a new run: nothing to pull


def test_uri_run_dir_is_staged_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("MCL_RAY_STAGING", str(tmp_path / "stage"))
    cfg = load_config("experiments/ml1m_swr_quick.yaml", [f"run_dir=file://{tmp_path}/r"])
    assert cfg.resolved_run_dir().startswith(str(tmp_path / "stage" / "ml1m_swr_quick-"))
    assert load_config("experiments/ml1m_swr_quick.yaml", [f"run_dir={tmp_path}/r"]).resolved_run_dir() == f"{tmp_path}/r"
    with pytest.raises(ValueError, match="pyarrow cannot open this URI"):
        storage.push(tmp_path, "nosuchscheme://bucket/run")
