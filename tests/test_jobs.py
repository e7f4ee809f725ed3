"""Resumption after the driver is killed between/inside stages (completed stages are skipped,
training resumes). The pipeline as a Ray job on a separately started head is the README's
local-cluster block, run as written by tests/test_readme.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_killed_driver_resumes_and_skips_finished_stages(tmp_path, ray_cluster):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [str(BIN / "mcl-ray"), "run", str(ROOT / "experiments/ml1m_swr_quick.yaml"), "--set", f"run_dir={tmp_path}",
           "--set", "data.max_interactions=150000", "--set", "train.epochs=6", "--set", "train.patience=10",
           "--no-serve-demo"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "train/seed_2024/history.json"
    deadline = time.time() + 300
    while not history.exists():
        assert time.time() < deadline and p.poll() is None, "training never started"
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)  # the driver dies mid-training, no cleanup
    p.wait()
    done = len(json.loads(history.read_text()))
    assert done < 6
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "prepare: inputs and config unchanged" in log and "reusing" in log  # prepare skipped
    assert "encode: inputs and config unchanged" in log  # encode skipped
    assert "resuming from" in log  # train continues from its checkpoint
    hist = json.loads(history.read_text())
    assert [h["epoch"] for h in hist] == list(range(6))  # no epoch lost or repeated
    assert (tmp_path / "artifact/model.safetensors").exists()
    assert (tmp_path / "train/seed_2024/tensorboard").is_dir()
