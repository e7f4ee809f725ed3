"""Starting or joining a Ray cluster with this project's defaults (see DESIGN.md, Ray facts)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from mcl_ray.config import RayConfig

log = logging.getLogger(__name__)

# Defaults for local clusters, tests and CI; a user's own environment wins (setdefault).
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Token auth is on by default in this Ray and writes ~/.ray/auth_token; local runs need none.
    "RAY_AUTH_MODE": "disabled",
}


def apply_env_defaults() -> None:
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def ray_tmpdir(run_root: str | Path = "runs") -> str:
    """RAY_TMPDIR if set, else <run_root>/.ray; Unix socket paths must stay short, so fall back to /tmp."""
    if os.environ.get("RAY_TMPDIR"):
        return os.environ["RAY_TMPDIR"]
    cand = Path(run_root).resolve() / ".ray"
    if len(str(cand)) > 60:
        cand = Path(tempfile.gettempdir()) / f"mcl-ray-{os.getuid()}"
    return str(cand)


def quiet_ray_data() -> None:
    """Progress bars on a terminal; in logs (CI, jobs) only warnings: our own stage lines show progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() and not os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS")
    for name in ("ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tune_data_context(small_cluster_cpus: int = 8) -> None:
    """On small clusters, turn off Ray Data's per-operator resource reservation.

    Measured here (2 CPUs): with it on, a single map stage ran its 32 tasks one at a time (6.3 s
    for 32 x 0.2 s of work); off, two at a time (3.7 s). Large clusters keep Ray's default."""
    import ray
    import ray.data

    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    if 0 < cpus <= small_cluster_cpus:
        ray.data.DataContext.get_current().op_resource_reservation_enabled = False


def init_ray(cfg: RayConfig | None = None, run_root: str | Path = "runs") -> None:
    """Join the configured cluster, RAY_ADDRESS, or an already started one; else start a local one."""
    import ray

    apply_env_defaults()
    quiet_ray_data()
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=cfg.num_cpus, log_to_driver=True, **local_cluster_kwargs(run_root))


def dataset_in_blocks(table, blocks: int):
    """A Ray Dataset of `table` cut into up to `blocks` blocks here, in the driver: every actor of a
    pool gets work, and no repartition/read task has to find a CPU while actors hold them all (that
    deadlocked 2 encoder actors on a 2-CPU cluster)."""
    import ray.data

    step = max(1, -(-table.num_rows // max(1, blocks)))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_cluster_kwargs(run_root: str | Path = "runs") -> dict:
    """ray.init arguments for a local cluster.

    The dashboard serves Ray's state API, which Ray Train's placement-group cleaner uses to free
    the workers of a trial that Tune stops early (without it those CPUs stay reserved and the next
    trial waits forever); `serve deploy`/`serve status` use it too. The cleaner finds the API by
    auto-detection, which fails when a second Ray cluster runs on the machine ("multiple active Ray
    instances"), so every worker is told the address (RAY_API_SERVER_ADDRESS) of a port picked here.
    """
    tmp = ray_tmpdir(run_root)
    Path(tmp).mkdir(parents=True, exist_ok=True)
    port = free_port()
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port, "_temp_dir": tmp,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}
