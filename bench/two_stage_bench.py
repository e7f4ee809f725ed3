"""Two-stage serving against ranking the whole catalogue: quality on ML-1M, latency on ML-1M and on
a generated 1M-item catalogue (numbers, not assertions).

  python bench/two_stage_bench.py                       # both parts (about 25 min here)
  python bench/two_stage_bench.py --parts ml1m          # ML-1M only

ml1m: `mcl-ray run experiments/ml1m_swr.yaml` with retrieval on, text features off and an epoch cap
(`--epochs`, both models), one seed. Quality: NDCG@10 / Recall@10 per scenario of two-stage
(retrieve N = 500, rank those) and of ranking every item, same test users (`mcl-ray evaluate`'s
`ranking_two_stage`), and Recall@N of retrieval alone. Latency: the serving core in-process
(`Recommender.recommend_many`, one request at a time, one torch / faiss thread, random known users
in their scenario, k=10, exclude_seen), two-stage against the same artifact with its retrieval
stage switched off; p50 / p99 over --requests requests after a warm-up.

1m: synthetic data with 1,000,000 items (2M interactions, 200k users, 4 scenarios), 1 epoch per
model; export builds an HNSW index over the catalogue; the same latency measurement. Results:
bench/results/two_stage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
from bench.scale_bench import cli as run  # noqa: E402  (one CLI-subprocess helper for the benches)


def latency(artifact: Path, n: int, seed: int = 0) -> dict:
    """p50 / p99 ms of one request at a time, two-stage and whole catalogue, the same requests."""
    import pyarrow.parquet as pq

    from mcl_ray.serve.recommender import Query, Recommender

    rec = Recommender(artifact, torch_threads=1)
    seen = pq.read_table(rec.art.file("seen.parquet"))
    users = sorted(set(seen.column(rec.spec.user_key).to_pylist()) & set(rec.users.row))
    rng = random.Random(seed)
    qs = [Query(user_id=u, scenario=rng.choice(rec.scenarios), k=10) for u in rng.sample(users, min(n, len(users)))]
    out = {"items": len(rec.items), "index": rec.retriever.index.kind, "candidates": rec.retriever.n,
           "rss_mib": round(_rss_mib())}
    retriever = rec.retriever
    # ranking a 1M-item catalogue takes seconds per request: fewer of those
    n_full = len(qs) if len(rec.items) < 100_000 else min(len(qs), 30)
    for name, r, todo in (("two_stage", retriever, qs), ("full_catalogue", None, qs[:n_full])):
        rec.retriever = r
        for q in todo[:10]:  # warm-up
            rec.recommend_many([q])
        lat, stages = [], []
        for q in todo:
            t = time.perf_counter()
            a = rec.recommend_many([q])[0]
            lat.append((time.perf_counter() - t) * 1000)
            stages.append(a["timings_ms"])
        qt = statistics.quantiles(lat, n=100)
        out[name] = {"requests": len(todo), "p50_ms": round(qt[49], 2), "p99_ms": round(qt[98], 2),
                     "stage_p50_ms": {k: round(statistics.median(s[k] for s in stages), 2) for k in stages[0]}}
        print(f"  {name:<15} p50 {qt[49]:8.2f} ms  p99 {qt[98]:8.2f} ms  {out[name]['stage_p50_ms']}", flush=True)
    return out


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ml1m(env: dict, work: Path, epochs: int, requests: int) -> dict:
    run_dir = work / "ml1m"
    sets = [f"run_dir={run_dir}", "retrieval.enabled=true", "model.text.mode=off", f"train.epochs={epochs}"]
    flags = [a for s in sets for a in ("--set", s)]
    wall = run(["run", "experiments/ml1m_swr.yaml", *flags, "--no-serve-demo"], env)
    m = json.loads((run_dir / "train/seed_2024/metrics.json").read_text())
    r = json.loads((run_dir / "retrieval/metrics.json").read_text())
    n = m["ranking_two_stage"]["candidates"]
    quality = {}
    for scen, full in m["ranking"].items():
        two = m["ranking_two_stage"]["by_scenario"][scen]
        quality[scen] = {"full_ndcg@10": full["ndcg@10"], "two_stage_ndcg@10": two["ndcg@10"],
                         "ratio_ndcg@10": two["ndcg@10"] / full["ndcg@10"] if full["ndcg@10"] else None,
                         "full_recall@10": full["recall@10"], "two_stage_recall@10": two["recall@10"],
                         f"retrieval_recall@{n}": r["ranking"][scen][f"recall@{n}"], "users": full["users"]}
        print(f"  {scen:<16} NDCG@10 full {full['ndcg@10']:.4f} two-stage {two['ndcg@10']:.4f} "
              f"({quality[scen]['ratio_ndcg@10']:.3f}x); retrieval recall@{n} {quality[scen][f'retrieval_recall@{n}']:.3f}",
              flush=True)
    mean = lambda k: statistics.mean(q[k] for q in quality.values())  # noqa: E731
    return {"epochs_cap": epochs, "run_seconds": round(wall, 1), "candidates": n, "by_scenario": quality,
            "mean_ratio_ndcg@10": round(mean("two_stage_ndcg@10") / mean("full_ndcg@10"), 4),
            "test_auc": m["overall"]["auc"], "latency": latency(run_dir / "artifact", requests)}


def one_million(env: dict, work: Path, requests: int) -> dict:
    run_dir = work / "m1"
    cfg = work / "m1.yaml"
    shutil.copy(ROOT / "experiments/synthetic_quick.yaml", cfg)
    sets = [f"run_dir={run_dir}", "data.num_interactions=2000000", "data.num_users=200000",
            "data.num_items=1000000", "data.num_scenarios=4", "data.num_blocks=32", "model.text.mode=off",
            "prepare.text=null", "train.epochs=1", "evaluate.ranking_users=0", "retrieval.enabled=true"]
    flags = [a for s in sets for a in ("--set", s)]
    wall = run(["run", str(cfg), *flags, "--no-serve-demo"], env)
    return {"interactions": 2_000_000, "run_seconds": round(wall, 1), "latency": latency(run_dir / "artifact", requests)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["ml1m", "1m"], default=["ml1m", "1m"])
    ap.add_argument("--epochs", type=int, default=8, help="ML-1M epoch cap of both models")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench/results/two_stage.json"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="mcl-2stage-", dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    results: dict = {"machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
                     "date": time.strftime("%Y-%m-%d"), "requests": a.requests}
    try:
        if "ml1m" in a.parts:
            print("ML-1M (retrieval + ranking, then latency)", flush=True)
            results["ml1m"] = ml1m(env, work, a.epochs, a.requests)
        if "1m" in a.parts:
            print("1,000,000 items (synthetic)", flush=True)
            results["items_1m"] = one_million(env, work, a.requests)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
