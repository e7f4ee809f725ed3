"""Starting or joining a Ray cluster with this project's defaults, and keeping Ray's own output
(driver-side log records, worker stdout, Serve/Data/Train chatter) in a log file of the run
directory instead of the console: `<run_dir>/ray.log`. `--verbose` (MCL_RAY_VERBOSE=1) brings it
back to the console."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from mcl_ray.core.config import RayConfig
from mcl_ray.core.progress import console


# Defaults for local clusters, tests and CI; a user's own environment wins (setdefault).
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Token auth is on by default in this Ray and writes ~/.ray/auth_token; local runs need none.
    "RAY_AUTH_MODE": "disabled",
}


# Ray Serve's high-throughput mode, read by Serve's controller and proxies when they start (so it is
# set in the environment of the Ray processes, not in the Serve YAML). Measured side by side on the
# two-stage ML-1M artifact (bench/serve_options_bench.py): 2.6x the requests per second of Ray's
# defaults at 8 in flight and half the p99. HAProxy binds the ingress replicas' own ports and its
# stats port on all interfaces, so `mcl-ray serve` turns it on only when it serves a network anyway.
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
SERVE_HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def apply_serve_env(host: str) -> dict[str, str]:
    """Serve's throughput mode for a cluster this process starts (a user's own setting wins); HAProxy
    too unless `host` is a loopback address. Returns what is in effect."""
    import ipaddress

    wanted = dict(SERVE_THROUGHPUT_ENV)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        wanted.update(SERVE_HAPROXY_ENV)
    for k, v in wanted.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in (*SERVE_THROUGHPUT_ENV, *SERVE_HAPROXY_ENV) if k in os.environ}


def apply_env_defaults() -> None:
    for k, v in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def size_footer_readers() -> int:
    """How many actors Ray Data starts to read Parquet footers at each `read_parquet`: one per 4
    CPUs of the cluster, at most Ray's default of 32 (a user's own setting wins).

    Ray starts that pool anew for every read, a process per actor. Measured on a 2-core machine:
    reading a one-file split took 10-12 s with Ray's 32 actors and 2.6-3.2 s with one; the pool
    pays off only where footers sit on remote storage and many CPUs read them."""
    import ray

    if FOOTER_READERS_ENV not in os.environ:
        cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
        os.environ[FOOTER_READERS_ENV] = str(max(1, min(32, int(cpus) // 4)))
    return int(os.environ[FOOTER_READERS_ENV])


def ray_tmpdir(run_root: str | Path = "runs") -> str:
    """RAY_TMPDIR if set, else <run_root>/.ray; Unix socket paths must stay short, so fall back to /tmp."""
    if os.environ.get("RAY_TMPDIR"):
        return os.environ["RAY_TMPDIR"]
    cand = Path(run_root).resolve() / ".ray"
    if len(str(cand)) > 60:
        cand = Path(tempfile.gettempdir()) / f"mcl-ray-{os.getuid()}"
    return str(cand)


def quiet_ray_data() -> None:
    """Ray Data's own progress bars off (the stages draw one bar each); its logs to warnings."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose() and sys.stderr.isatty()
    ctx.print_on_execution_start = verbose()
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


RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray._private", "filelock")


def verbose() -> bool:
    return os.environ.get("MCL_RAY_VERBOSE", "") not in ("", "0")


def route_ray_logs(log_dir: str | Path | None = None) -> Path | None:
    """Send the driver's Ray log records to <log_dir>/ray.log (console only with --verbose). Without
    log_dir: the file chosen before (Serve adds its own console handler when it starts)."""
    if verbose() or (log_dir is None and not _log_file):
        return None
    path = Path(log_dir) / "ray.log" if log_dir is not None else _log_file[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    _log_file[:] = [path]
    _cluster_messages_to_log()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _native_stderr_to(path)
    for name in RAY_LOGGERS:
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if isinstance(h, (logging.StreamHandler, logging.FileHandler))]:
            lg.removeHandler(h)  # Ray adds a stderr handler to "ray" at import time
            if isinstance(h, logging.FileHandler):
                h.close()
        lg.addHandler(handler)
        lg.propagate = False
    return path


_redirected: list[str] = []  # fd 2 already points at a log file (once per process)
_log_file: list[Path] = []  # the ray.log in use


def _cluster_messages_to_log() -> None:
    """Ray prints the cluster's error/warning messages (raylet notes on retried tasks, worker
    start-up counts, ...) to this process's stdout; send them to the "ray" logger instead, i.e.
    to ray.log. Ray looks the printer up by name at each message, so replacing it is enough; an
    internal name, hence tolerant of its absence in another Ray version."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    if getattr(ray_worker.print_to_stdstream, "__module__", "") == __name__:
        return

    def to_log(data, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            logging.getLogger("ray").warning("(%s) %s", data.get("pid", "?"), line)

    ray_worker.print_to_stdstream = to_log


def _native_stderr_to(path: Path) -> None:
    """Ray's C++ core worker in this process (and the local cluster's processes, which inherit it)
    write straight to file descriptor 2: point fd 2 at the log file and keep Python's sys.stderr
    (our console, tracebacks) on the terminal through a duplicate. Only for a real process stderr,
    once: never under pytest's or a CliRunner's capture."""
    try:
        if _redirected or sys.stderr.fileno() != 2:
            return
    except (AttributeError, ValueError, OSError):  # a captured stream without a file descriptor
        return
    sys.stderr.flush()
    keep = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    old = sys.stderr
    sys.stderr = os.fdopen(keep, "w", buffering=1, encoding=old.encoding, errors="backslashreplace")
    for h in logging.getLogger().handlers:  # e.g. basicConfig's: it holds the stream, not fd 2
        if isinstance(h, logging.StreamHandler) and h.stream is old:
            h.setStream(sys.stderr)
    _redirected.append(str(path))


def init_ray(cfg: RayConfig | None = None, run_root: str | Path = "runs", log_dir: str | Path | None = None) -> None:
    """Join the configured cluster, RAY_ADDRESS, or an already started one; else start a local one.

    Worker output is not forwarded to this console (log_to_driver) unless --verbose: the stages
    print their own progress from the driver, and Ray keeps worker logs in its session folder."""
    import ray

    apply_env_defaults()
    quiet_ray_data()
    log_file = route_ray_logs(log_dir)
    if ray.is_initialized():
        size_footer_readers()
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        console.print(f"[dim]joining the Ray cluster at {address}[/]")
        ray.init(address=address, log_to_driver=verbose())
    else:
        ray.init(num_cpus=cfg.num_cpus, log_to_driver=verbose(), **local_cluster_kwargs(run_root))
    route_ray_logs(log_dir)  # again: ray.init may have configured its loggers anew
    size_footer_readers()
    if log_file is not None:
        console.print(f"[dim]Ray's logs: {log_file} (--verbose shows them here)[/]")


def dataset_in_blocks(table, blocks: int):
    """A Ray Dataset of `table` cut into up to `blocks` blocks here, in the driver: every actor of a
    pool gets work, and no repartition/read task has to find a CPU while actors hold them all (that
    deadlocked 2 encoder actors on a 2-CPU cluster)."""
    import ray.data

    step = max(1, -(-table.num_rows // max(1, blocks)))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])


def free_port(preferred: int = 0) -> int:
    """A free TCP port on 127.0.0.1: `preferred` when it is free, else any."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
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
