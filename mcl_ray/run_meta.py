"""Run metadata written into every run directory: what ran, on what code, data and libraries."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

from mcl_ray.artifact import git_commit, library_versions
from mcl_ray.config import ExperimentConfig


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
