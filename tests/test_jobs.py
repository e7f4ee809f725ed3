"""The pipeline as a Ray job on a separately started head, and resumption after the driver is
killed between/inside stages (completed stages are skipped, training resumes)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from mcl_ray.core.ray_env import free_port

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_ray_job_submit_end_to_end(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="mclj-"))  # short: Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "VIRTUAL_ENV"}}
    # The venv is not on PATH (as for a head started from a plain shell): the entrypoint names it.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env.update(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               MCL_RAY_STAGING=str(tmp_path / "staging"))
    gcs, dash = free_port(), free_port()
    # Every fixed default port picked free: another Ray cluster on this machine (the test session's
    # own) holds the defaults, and a job agent that cannot bind never accepts a job.
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port")]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             *ports, f"--temp-dir={temp / 'ray'}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "Ray head did not come up"
                time.sleep(1)
        run_dir = tmp_path / "shared" / "run"  # the run directory on "shared storage", as a pyarrow URI
        submit = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
                  str(ROOT), "--", sys.executable, "-m", "mcl_ray", "run", "experiments/ml1m_swr_quick.yaml", "--set",
                  f"run_dir=file://{run_dir}",
                  "--set", "data.max_interactions=5000", "--set", "train.epochs=1", "--no-serve-demo"]
        for _ in range(60):  # the head's job agent starts a few seconds after its dashboard
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
        assert "test metrics: shared_bottom" in r.stdout  # the job's output streamed back
        assert "pushed" in r.stdout and (tmp_path / "staging").is_dir()  # worked on a staged copy, synced back
        for f in ("prepare/feature_spec.json", "prepare/embeddings/item.parquet", "train/seed_2024/metrics.json",
                  "artifact/model.safetensors", "artifact/MODEL_CARD.md", "metadata.json", "report.md"):
            assert (run_dir / f).exists(), f
        meta = json.loads((run_dir / "metadata.json").read_text())["runs"]
        assert [m["stage"] for m in meta] == ["prepare", "encode", "train", "export"]
        assert all(m["ray_job_id"] for m in meta) and meta[0]["data_fingerprint"]
        submission = meta[0]["ray_submission_id"]
        assert submission and submission.startswith("raysubmit_") and submission in r.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the head this test started (never `ray stop`)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)  # including its ray_current_cluster file


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
