"""Load test of POST /v1/recommend on loopback: Ray Serve app (1 model replica) vs a bare
FastAPI + uvicorn app with the same scoring function, same artifact, same run.

For each concurrency level (1, 8, 32, 64 requests in flight) a bounded closed-loop generator sends
--requests requests (random known users, their own scenario, k=10, exclude_seen) and records
latency per request and status codes. Prints a table and writes bench/results/serve.json (--out).
With --noop, a third target: the same Serve topology and shapes with a model that does no work
(bench/noop_app.py), the framework's ceiling on this machine. The model replica's peak RSS is
recorded. A two-stage artifact (retrieval.enabled) is served two-stage by every target. The Serve
targets run in the throughput mode the deploy files adopt (--plain: Ray's defaults).

  python bench/serve_bench.py --artifact runs/ml1m_swr/artifact
  python bench/serve_bench.py --artifact runs/x/artifact --noop --out bench/results/serve_two_stage_ml1m.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from mcl_ray.core.ray_env import free_port

ROOT = Path(__file__).resolve().parents[1]


def bodies(artifact: Path, n: int, seed: int = 0) -> list[dict]:
    import pyarrow.parquet as pq

    from mcl_ray.artifact import open_artifact

    art = open_artifact(artifact)
    users = pq.read_table(art.file(art.spec.users_table)).to_pandas()
    rule = art.cfg.prepare.scenario
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = users.iloc[rng.randrange(len(users))]
        scen = next((name for name, vals in (rule.groups or {}).items() if u[rule.column] in vals),
                    art.spec.scenario_names[0])
        out.append({"user_id": str(u["user_id"]), "scenario": scen, "k": 10, "exclude_seen": True})
    return out


async def load(url: str, reqs: list[dict], concurrency: int) -> dict:
    lat, codes = [], {}
    it = iter(reqs)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker():
            for body in it:
                t = time.perf_counter()
                async with s.post(url, json=body) as r:
                    await r.read()
                    codes[r.status] = codes.get(r.status, 0) + 1
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100)
    return {"requests": len(lat), "rps": len(lat) / wall, "p50_ms": q[49] * 1e3, "p95_ms": q[94] * 1e3,
            "p99_ms": q[98] * 1e3, "codes": {str(k): v for k, v in sorted(codes.items())}}


def wait_ready(url: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(url)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", type=Path, default=ROOT / "runs/ml1m_swr/artifact")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=400, help="per level")
    ap.add_argument("--skip-bare", action="store_true")
    ap.add_argument("--serve-args", default="{}", help="JSON of extra build_app args, e.g. '{\"max_ongoing_requests\": 64}'")
    ap.add_argument("--noop", action="store_true", help="also measure a no-op Serve app of the same shapes")
    ap.add_argument("--plain", action="store_true", help="Ray's default Serve mode, not the throughput mode "
                                                         "(THROUGHPUT_OPTIMIZED + HAProxy) the deploy files adopt")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serve.json")
    args = ap.parse_args()
    from mcl_ray.core.ray_env import SERVE_HAPROXY_ENV, SERVE_THROUGHPUT_ENV

    serve_env = {} if args.plain else {**SERVE_THROUGHPUT_ENV, **SERVE_HAPROXY_ENV}
    os.environ.update(serve_env)  # before the local cluster starts: Serve reads them at start
    reqs = bodies(args.artifact, args.requests)
    results: dict = {"artifact": str(args.artifact), "requests_per_level": args.requests, "serve_env": serve_env,
                     "serve": {}, "bare": {}}

    # bare FastAPI + uvicorn, one process
    port = free_port()
    env = {**os.environ, "MCL_RAY_ARTIFACT": str(args.artifact.resolve()), "OMP_NUM_THREADS": "1"}
    if args.skip_bare:
        args.levels_bare = []
    bare = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/docs")
        for c in ([] if args.skip_bare else args.levels):
            asyncio.run(load(f"http://127.0.0.1:{port}/v1/recommend", reqs[:50], c))  # warm-up
            results["bare"][c] = asyncio.run(load(f"http://127.0.0.1:{port}/v1/recommend", reqs, c))
            print("bare ", c, results["bare"][c], flush=True)
    finally:
        bare.terminate()
        bare.wait()

    # Ray Serve: 1 model replica, default batching
    from ray import serve

    from mcl_ray.cli import start_serve
    from mcl_ray.core.ray_env import init_ray

    init_ray(None, ROOT / "runs")
    port = free_port()
    base = start_serve(args.artifact, "127.0.0.1", port, num_replicas=1, **json.loads(args.serve_args))
    try:
        results["serve"] = levels(base, "serve", reqs, args.levels)
        results["model_replica_rss_mib"] = replica_rss_mib()
        print(f"model replica RSS {results['model_replica_rss_mib']:.0f} MiB", flush=True)
        if args.noop:
            # the same Serve instance and port: a restart of Serve right after serve.shutdown() raced with
            # the old controller's exit in the throughput mode
            from ray import cloudpickle

            sys.path.insert(0, str(ROOT))
            import bench.noop_app as noop_app
            from mcl_ray.artifact import open_artifact

            cloudpickle.register_pickle_by_value(noop_app)  # the replicas need not import bench/
            serve.delete("recommender")
            serve.run(noop_app.build_noop_app(open_artifact(args.artifact).spec.scenario_names), name="noop",
                      route_prefix="/", blocking=False)
            results["noop"] = levels(base, "noop ", reqs, args.levels)
    finally:
        serve.shutdown()

    if args.skip_bare:
        return
    print(f"\n{'in flight':>9} | {'serve p50/p95/p99 ms':>22} {'rps':>6} | {'bare p50/p95/p99 ms':>22} {'rps':>6} | ratio")
    for c in args.levels:
        s, b = results["serve"][c], results["bare"][c]
        print(f"{c:>9} | {s['p50_ms']:6.1f} {s['p95_ms']:6.1f} {s['p99_ms']:7.1f} {s['rps']:7.1f} | "
              f"{b['p50_ms']:6.1f} {b['p95_ms']:6.1f} {b['p99_ms']:7.1f} {b['rps']:7.1f} | {s['rps'] / b['rps']:.2f}x"
              + (f" | no-op Serve p99 {results['noop'][c]['p99_ms']:.1f} ms, {results['noop'][c]['rps']:.1f} rps, "
                 f"serve / no-op {s['rps'] / results['noop'][c]['rps']:.2f}x" if args.noop else ""))
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


def levels(base: str, name: str, reqs: list[dict], in_flight: list[int]) -> dict:
    """Once the app answers: per level, a 50-request warm-up, then the measured run."""
    wait_ready(f"{base}/healthz")
    out = {}
    for c in in_flight:
        asyncio.run(load(f"{base}/v1/recommend", reqs[:50], c))
        out[c] = asyncio.run(load(f"{base}/v1/recommend", reqs, c))
        print(name, c, out[c], flush=True)
    return out


def processes():
    """(pid, argv) of every process of this machine we may read."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            yield pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue


def replica_rss_mib() -> float:
    """Peak-now RSS of the model deployment's replica process(es), found by their process title."""
    best = 0.0
    for pid, argv in processes():
        if not any(b"RecommenderModel" in a for a in argv):
            continue
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return best


if __name__ == "__main__":
    main()
