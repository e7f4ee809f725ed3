"""The pipeline at sizes MovieLens never reaches (numbers, not assertions).

  python bench/scale_bench.py                         # 2M, 5M, 20M synthetic interactions (20M: over an hour here)
  python bench/scale_bench.py --sizes 2000000 5000000 # what bench/results/scale.json holds (about 15 min here)

Per size: synthetic data (users = rows / 10, items = rows / 100, 4 scenarios) through
`mcl-ray prepare` -> `mcl-ray train` (1 epoch, 1 worker, data_mode auto as a user gets it; the
stage also evaluates the test split) -> `mcl-ray evaluate` (again, timed alone) -> `mcl-ray export`
-> one /v1/recommend answer from the
artifact (the serving core in-process: load + one request). Every command is a separate process
on one local Ray cluster started for the bench, so the console figures are what a user sees.
Measured: wall per stage, rows/s, the peak RSS of every process (the CLI drivers, and each Ray
worker by PID, sampled every 0.25 s from /proc). At 5M the train stage also runs in stream mode,
side by side with memory mode (same data, same cluster). Text features are off: MiniLM on 200k
items would dominate the figures with encoder time (`bench/encode_bench.py` measures that).
Results: bench/results/scale.json and printed tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


class RssSampler:
    """Peak RSS per process of this machine's Ray cluster and the bench's own children."""

    def __init__(self):
        self.peak: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _run(self):
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if not any(k in cmd for k in ("ray::", "mcl-ray", "mcl_ray", "raylet", "gcs_server", "ray/")):
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            mib = int(line.split()[1]) / 1024
                            old = self.peak.get(int(pid), (0.0, ""))
                            if mib > old[0]:
                                self.peak[int(pid)] = (mib, cmd[:90])
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
            self._stop.wait(0.25)

    def reset(self):
        self.peak.clear()

    def summary(self) -> dict:
        drivers = [v for v in self.peak.values() if "mcl-ray" in v[1] or "mcl_ray" in v[1]]
        workers = [v for v in self.peak.values() if v[1].startswith("ray::")]
        top = sorted(self.peak.values(), reverse=True)[:5]
        return {"driver_peak_rss_mib": round(max((m for m, _ in drivers), default=0), 1),
                "worker_peak_rss_mib": round(max((m for m, _ in workers), default=0), 1),
                "max_process_rss_mib": round(max((m for m, _ in self.peak.values()), default=0), 1),
                "top_processes": [{"rss_mib": round(m, 1), "cmd": c} for m, c in top]}


def cli(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([str(BIN / "mcl-ray"), *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"mcl-ray {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def one_size(rows: int, env: dict, work: Path, sampler: RssSampler, stream_too: bool, keep: bool = False) -> dict:
    run = work / f"scale_{rows}"
    sets = [f"run_dir={run}", f"data.num_interactions={rows}", f"data.num_users={rows // 10}",
            f"data.num_items={rows // 100}", "data.num_scenarios=4", "data.num_blocks=64",
            "model.text.mode=off", "prepare.text=null", "train.epochs=1", "train.num_workers=1",
            "evaluate.ranking_users=200"]
    cfg = work / f"scale_{rows}.yaml"
    shutil.copy(ROOT / "experiments/synthetic_quick.yaml", cfg)
    flags = [a for s in sets for a in ("--set", s)]
    stages: dict[str, dict] = {}

    def stage(name: str, args: list[str]) -> None:
        sampler.reset()
        wall = cli(args, env)
        stages[name] = {"seconds": round(wall, 1), "rows_per_s": round(rows / wall), **sampler.summary()}
        print(f"  {rows:>11,} {name:<16} {wall:7.1f} s  driver {stages[name]['driver_peak_rss_mib']:7.0f} MiB  "
              f"worker {stages[name]['worker_peak_rss_mib']:7.0f} MiB", flush=True)

    stage("prepare", ["prepare", str(cfg), *flags])
    # what a user gets (auto: stream once a worker's shard exceeds train.memory_budget_mb); memory
    # at the size where both modes run side by side
    stage("train", ["train", str(cfg), *flags, "--set", f"train.data_mode={'memory' if stream_too else 'auto'}"])
    hist = json.loads((run / "train/seed_2024/history.json").read_text())[0]
    stages["train"]["data_mode"] = json.loads((run / "train/seed_2024/worker_rank0.json").read_text())["data_mode"]
    stages["train"]["samples_per_s"] = round(hist["samples_per_s"])
    stages["train"]["epoch_seconds"] = round(hist["epoch_seconds"], 1)
    stage("evaluate", ["evaluate", str(run)])
    stage("export", ["export", str(run)])
    sampler.reset()
    t0 = time.perf_counter()
    serve = subprocess.run([sys.executable, "-c", (
        "import json, sys, time; from mcl_ray.serve.recommender import Query, Recommender\n"
        f"t=time.perf_counter(); r=Recommender({str(run / 'artifact')!r}); load=time.perf_counter()-t\n"
        "import pyarrow.parquet as pq; u=pq.read_table(r.art.file('seen.parquet')).column(r.spec.user_key)[0].as_py()\n"
        "t=time.perf_counter(); out=r.recommend_many([Query(user_id=u, scenario=r.scenarios[0], k=10)])[0]\n"
        "print(json.dumps({'load_s': load, 'request_ms': (time.perf_counter()-t)*1000, 'items': len(out['items'])}))")],
        env=env, capture_output=True, text=True, cwd=ROOT)
    if serve.returncode != 0:
        raise SystemExit(serve.stderr[-3000:])
    answer = json.loads(serve.stdout.strip().splitlines()[-1])
    stages["serve"] = {"seconds": round(time.perf_counter() - t0, 1), **answer, **sampler.summary()}
    print(f"  {rows:>11,} serve            {stages['serve']['seconds']:7.1f} s  (load {answer['load_s']:.1f} s, "
          f"request {answer['request_ms']:.0f} ms, {answer['items']} items)", flush=True)
    metrics = json.loads((run / "train/seed_2024/metrics.json").read_text())
    out = {"rows": rows, "users": rows // 10, "items": rows // 100, "scenarios": 4, "stages": stages,
           "test_auc": metrics["overall"]["auc"],
           "seconds_total": round(sum(s["seconds"] for s in stages.values()), 1)}
    if stream_too:
        sampler.reset()
        wall = cli(["train", str(cfg), *flags, "--set", "train.data_mode=stream", "--force"], env)
        h = json.loads((run / "train/seed_2024/history.json").read_text())[0]
        out["stream_train"] = {"seconds": round(wall, 1), "samples_per_s": round(h["samples_per_s"]),
                               "epoch_seconds": round(h["epoch_seconds"], 1), **sampler.summary()}
        out["stream_vs_memory_samples_per_s"] = round(h["samples_per_s"] / stages["train"]["samples_per_s"], 3)
        print(f"  {rows:>11,} train (stream)   {wall:7.1f} s  {h['samples_per_s']:,.0f} samples/s vs memory "
              f"{stages['train']['samples_per_s']:,} ({out['stream_vs_memory_samples_per_s']:.2f}x)", flush=True)
    if not keep:
        shutil.rmtree(run, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[2_000_000, 5_000_000, 20_000_000])
    ap.add_argument("--stream-at", type=int, default=5_000_000, help="size at which memory and stream train side by side")
    ap.add_argument("--out", default=str(ROOT / "bench/results/scale.json"))
    ap.add_argument("--keep", action="store_true", help="keep each size's run folder (under runs/) for inspection")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mcl-scale-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None))
    env = {k: v for k, v in os.environ.items()}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_TMPDIR=tempfile.mkdtemp(prefix="mcls-"))
    from mcl_ray.core.ray_env import free_port

    gcs = free_port()
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={free_port()}"], env=env, start_new_session=True,
                            stdout=(work / "head.log").open("w"), stderr=subprocess.STDOUT)
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    results = []
    try:
        for _ in range(60):
            if subprocess.run([str(BIN / "ray"), "status"], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(2)
        print(f"{'rows':>13} {'stage':<16} {'wall':>9}", flush=True)
        with RssSampler() as sampler:
            for rows in a.sizes:
                results.append(one_size(rows, env, work, sampler, stream_too=rows == a.stream_at, keep=a.keep))
    finally:
        os.killpg(head.pid, 15)
        head.wait(120)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"run folders kept under {work}")
    per_row = {r["rows"]: round(r["seconds_total"] / r["rows"] * 1e6, 2) for r in results}
    summary = {"machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d"), "microseconds_per_row_end_to_end": per_row,
               "max_process_rss_mib": {r["rows"]: max(s["max_process_rss_mib"] for s in r["stages"].values())
                                       for r in results}}
    five = next((r for r in results if "stream_vs_memory_samples_per_s" in r), None)
    if five:
        summary["stream_vs_memory_samples_per_s"] = five["stream_vs_memory_samples_per_s"]
    Path(a.out).write_text(json.dumps({"summary": summary, "sizes": results}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
