"""Autoscaling shown, not only configured: a bounded load ramp against the recommender deployed from
serve_apps/recommender.yaml (its autoscaling_config as checked in: 1-4 model replicas, 16 ongoing
requests per replica, 10 s upscale and 120 s downscale delay) on a fresh `ray start --head`.

The ramp steps the number of requests in flight (closed loop, random known users) through
--phases; every --sample-s the model deployment's running and target replica counts are read from
Serve's REST API. Writes bench/results/autoscale.json and bench/results/autoscale.png (in flight,
replicas, p99 and req/s per --window-s window, over time).

The cluster runs Serve's throughput mode as the deploy files adopt it (--plain: Ray's defaults).
The head node is told --num-cpus logical CPUs (default 5: room for 4 model replicas at 1 CPU and
the ingress). This machine has 2 cores, so extra replicas share them: the bench shows the
controller following the load up and down, not throughput bought by replicas.

  python bench/autoscale_bench.py --artifact runs/bench_2stage_ml1m/artifact
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import bodies  # noqa: E402
from bench.serve_cluster import replicas, serve_cluster  # noqa: E402
from mcl_ray.core.ray_env import SERVE_HAPROXY_ENV, SERVE_THROUGHPUT_ENV  # noqa: E402

PHASES = "1:30,8:40,32:60,64:60,8:40,1:150"


async def ramp(url: str, reqs: list[dict], phases: list[tuple[int, float]], t0: float) -> list[tuple]:
    """Closed loop per phase: `c` workers send back to back until the phase ends. Returns
    (end time since t0, latency s, status) per request."""
    done: list[tuple] = []
    i = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        for c, seconds in phases:
            stop = time.time() + seconds

            async def worker():
                nonlocal i
                while time.time() < stop:
                    body = reqs[i % len(reqs)]
                    i += 1
                    t = time.time()
                    try:
                        async with s.post(url, json=body) as r:
                            await r.read()
                            status = r.status
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        status = 0
                    done.append((time.time() - t0, time.time() - t, status))

            await asyncio.gather(*[worker() for _ in range(c)])
    return done


def p99_ms(lat: list[float]) -> float | None:
    """Of sorted latencies in seconds (None: no request)."""
    return round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, 1) if lat else None


def windows(done: list[tuple], width: float, end: float) -> list[dict]:
    out = []
    t = 0.0
    while t < end:
        lat = sorted(x[1] for x in done if t <= x[0] < t + width)
        errs = sum(1 for x in done if t <= x[0] < t + width and x[2] != 200)
        out.append({"t": round(t + width / 2, 1), "requests": len(lat), "rps": round(len(lat) / width, 1),
                    "p50_ms": round(lat[len(lat) // 2] * 1e3, 1) if lat else None,
                    "p99_ms": p99_ms(lat),
                    "errors": errs})
        t += width
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    steps, t = [], 0.0
    for c, s in res["phases"]:
        steps += [(t, c), (t + s, c)]
        t += s
    a1.plot([x for x, _ in steps], [c for _, c in steps], color="grey", label="requests in flight")
    a1.set_ylabel("requests in flight")
    r = a1.twinx()
    r.step([x["t"] for x in res["replicas"]], [x["running"] for x in res["replicas"]], where="post",
           color="tab:blue", label="running replicas")
    r.step([x["t"] for x in res["replicas"]], [x["target"] for x in res["replicas"]], where="post",
           color="tab:orange", linestyle="--", label="target replicas")
    r.set_ylabel("model replicas")
    r.set_ylim(0, max(5, max(x["target"] for x in res["replicas"]) + 1))
    a1.legend(loc="upper left")
    r.legend(loc="upper right")
    w = [x for x in res["windows"] if x["p99_ms"] is not None]
    a2.plot([x["t"] for x in w], [x["p99_ms"] for x in w], color="tab:red", label="p99 ms")
    a2.set_ylabel("p99 latency (ms)")
    a2.set_xlabel("seconds")
    q = a2.twinx()
    q.plot([x["t"] for x in w], [x["rps"] for x in w], color="tab:green", label="req/s")
    q.set_ylabel("req/s")
    a2.legend(loc="upper left")
    q.legend(loc="upper right")
    fig.suptitle(f"Autoscaling ramp, serve_apps/recommender.yaml on {res['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--phases", default=PHASES, help="in_flight:seconds,... (default %(default)s)")
    ap.add_argument("--num-cpus", type=int, default=5, help="logical CPUs of the head node")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--plain", action="store_true", help="Ray's default Serve mode (not the throughput mode "
                                                         "the deploy files adopt)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/autoscale.json")
    a = ap.parse_args()
    env = {} if a.plain else {**SERVE_THROUGHPUT_ENV, **SERVE_HAPROXY_ENV}
    phases = [(int(c), float(s)) for c, s in (p.split(":") for p in a.phases.split(","))]
    reqs = bodies(a.artifact, 2000)
    log = ROOT / "runs" / "autoscale_bench.log"
    log.parent.mkdir(exist_ok=True)
    samples: list[dict] = []
    with serve_cluster(a.artifact, env, num_cpus=a.num_cpus, replicas=None, log_path=log) as (base, dashboard):
        t0 = time.time()
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    samples.append({"t": round(time.time() - t0, 1), **replicas(dashboard)})
                except OSError:
                    pass
                stop.wait(a.sample_s)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        print(f"ramp {a.phases} against {base}", flush=True)
        done = asyncio.run(ramp(f"{base}/v1/recommend", reqs, phases, t0))
        stop.set()
        th.join()
    end = sum(s for _, s in phases)
    res = {"machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d"), "artifact": str(a.artifact), "num_cpus_logical": a.num_cpus,
           "serve_env": env,
           "phases": phases, "requests": len(done), "errors": sum(1 for x in done if x[2] != 200),
           "max_running_replicas": max((x["running"] for x in samples), default=0),
           "replicas": samples, "windows": windows(done, a.window_s, end)}
    t = 0.0
    res["by_phase"] = []
    for c, s in phases:
        lat = sorted(x[1] for x in done if t <= x[0] < t + s)
        reps = [x["running"] for x in samples if t <= x["t"] < t + s]
        res["by_phase"].append({"in_flight": c, "from_s": t, "to_s": t + s, "requests": len(lat),
                                "rps": round(len(lat) / s, 1),
                                "p99_ms": p99_ms(lat),
                                "replicas_start": reps[0] if reps else None, "replicas_end": reps[-1] if reps else None,
                                "replicas_max": max(reps) if reps else None})
        t += s
    print(f"{'phase':>10} | {'in flight':>9} | {'req/s':>6} | {'p99 ms':>8} | replicas start / max / end")
    for p in res["by_phase"]:
        print(f"{p['from_s']:>4.0f}-{p['to_s']:<4.0f}s | {p['in_flight']:>9} | {p['rps']:>6} | {p['p99_ms']!s:>8} | "
              f"{p['replicas_start']} / {p['replicas_max']} / {p['replicas_end']}")
    print(f"{res['requests']} requests, {res['errors']} errors, at most {res['max_running_replicas']} running replicas")
    a.out.write_text(json.dumps(res, indent=1))
    plot(res, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
