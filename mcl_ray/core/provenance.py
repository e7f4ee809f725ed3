"""Provenance: the code (git commit), libraries and Ray job behind a run, and the run metadata file
appended by every stage."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from mcl_ray.core.config import ExperimentConfig


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mcl-ray", "torch", "ray", "optuna", "pyarrow", "transformers", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def ray_job() -> dict:
    """The Ray job this driver is (and its `ray job submit` id when submitted that way)."""
    out: dict = {"ray_job_id": None, "ray_submission_id": None}
    try:
        import ray

        if ray.is_initialized():
            out["ray_job_id"] = ray.get_runtime_context().get_job_id()
        # the job supervisor hands the driver its job config, submission id included
        cfg = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        out["ray_submission_id"] = (cfg.get("metadata") or {}).get("job_submission_id")
    except (ImportError, ValueError):
        pass
    return out


def write_run_metadata(run_dir: str | Path, cfg: ExperimentConfig, stage: str, data_fingerprint: str | None = None) -> Path:
    """runs/<name>/metadata.json: one entry per stage invocation, newest last (appended, never lost)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metadata.json"
    meta = json.loads(path.read_text()) if path.exists() else {"runs": []}
    meta["runs"].append({
        "stage": stage,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(Path(__file__).parent),
        "libraries": library_versions(),
        "ray_address": os.environ.get("RAY_ADDRESS"),
        **ray_job(),
        "data_fingerprint": data_fingerprint,
        "config": cfg.model_dump(mode="json"),
    })
    meta["runs"] = meta["runs"][-50:]  # bounded
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)
    return path
