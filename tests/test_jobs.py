"""Resumption after the driver is killed between/inside stages (completed stages are skipped,
training resumes). The pipeline as a Ray job on a separately started head is the README's
local-cluster block, run as written by tests/test_readme.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mcl_ray.core.ray_env import free_port

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_killed_driver_resumes_and_skips_finished_stages(tmp_path, ray_cluster):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [str(BIN / "mcl-ray"), "run", str(ROOT / "experiments/ml1m_swr_quick.yaml"), "--set", f"run_dir={tmp_path}",
           "--set", "data.max_interactions=60000", "--set", "train.epochs=4", "--set", "train.patience=10",
           "--set", "model.text.mode=off", "--no-serve-demo"]  # no encoder: the test is about resuming
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = tmp_path / "train/seed_2024/history.json"
    deadline = time.time() + 300
    while not history.exists():
        assert time.time() < deadline and p.poll() is None, "training never started"
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)  # the driver dies mid-training, no cleanup
    p.wait()
    done = len(json.loads(history.read_text()))
    assert done < 4
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "prepare: inputs and config unchanged" in log and "reusing" in log  # prepare skipped
    assert "resuming from" in log  # train continues from its checkpoint
    hist = json.loads(history.read_text())
    assert [h["epoch"] for h in hist] == list(range(4))  # no epoch lost or repeated
    assert (tmp_path / "artifact/model.safetensors").exists()
    assert (tmp_path / "train/seed_2024/tensorboard").is_dir()


def _start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """One raylet of a local multi-node cluster, stopped later by its process group (never `ray stop`)."""
    ports = [f"--{name}={free_port()}" for name in ("node-manager-port", "object-manager-port", "metrics-export-port",
                                                     "runtime-env-agent-port", "dashboard-agent-listen-port",
                                                     "dashboard-agent-grpc-port")]
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args, *ports], env=env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_node_cluster_prepare_and_ddp_workers_on_different_nodes(tmp_path):
    """Two raylets with their own resources on this machine: prepare runs on the cluster and a
    2-worker DDP fit places one worker on each node (STRICT_SPREAD), on a shared file:// run dir."""
    temp = Path(tempfile.mkdtemp(prefix="mcl2n-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               MCL_RAY_STAGING=str(tmp_path / "staging"))
    gcs = free_port()
    nodes = [_start_node(["--head", f"--port={gcs}", "--num-cpus=2", "--resources={\"node_a\": 1}",
                          "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                          f"--ray-client-server-port={free_port()}", f"--temp-dir={temp / 'ray'}"], env,
                         tmp_path / "head.log")]
    try:
        deadline = time.time() + 120
        while subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{gcs}"], env=env,
                             capture_output=True).returncode != 0:
            assert time.time() < deadline and nodes[0].poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(2)
        nodes.append(_start_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--resources={\"node_b\": 1}"], env,
                                 tmp_path / "worker.log"))
        while "node_b" not in subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{gcs}"], env=env,
                                             capture_output=True, text=True).stdout:
            assert time.time() < deadline and nodes[1].poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(2)
        run_dir = tmp_path / "shared" / "run"
        r = subprocess.run([str(BIN / "mcl-ray"), "run", str(ROOT / "experiments/ml1m_swr_quick.yaml"), "--no-serve-demo",
                            "--set", f"ray.address=127.0.0.1:{gcs}", "--set", f"run_dir=file://{run_dir}",
                            "--set", "data.max_interactions=5000", "--set", "model.text.mode=off",
                            "--set", "train.epochs=1", "--set", "train.num_workers=2",
                            "--set", "train.placement_strategy=STRICT_SPREAD", "--set", "evaluate.ranking_users=20"],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        workers = [json.loads((run_dir / f"train/seed_2024/worker_rank{i}.json").read_text()) for i in (0, 1)]
        assert workers[0]["world"] == 2 and workers[0]["node_id"] != workers[1]["node_id"]  # one per node
        assert (run_dir / "artifact/model.safetensors").exists() and (run_dir / "prepare/feature_spec.json").exists()
    finally:
        for p in reversed(nodes):
            os.killpg(p.pid, signal.SIGTERM)
        for p in nodes:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
