"""Benchmark of the prepare stage (numbers, not assertions).

  python bench/prepare_bench.py                  # ML-1M + 5M synthetic, Ray at 1 and 2 CPUs vs pandas
  python bench/prepare_bench.py --synthetic-rows 1000000 --repeats 1   # a smaller run

Each measurement runs in its own process (a Ray cluster's CPU count is fixed per process) and
reports wall time, rows/s and the driver's peak RSS. The single-process reference runs the very
same fusion functions (mcl_ray.data.fuse / prepare) on whole tables with pandas/pyarrow, so the
comparison is Ray Data's parallel execution against no Ray at all, for identical work.
Results: bench/results/prepare.json and a printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_cfg(rows: int, run_dir: str):
    from mcl_ray.core.config import load_config

    return load_config(ROOT / "experiments/synthetic_quick.yaml", [
        f"run_dir={run_dir}", f"data.num_interactions={rows}", "data.num_users=50000", "data.num_items=5000",
        "data.num_blocks=32"])


def one_ray(source: str, rows: int, cpus: int) -> dict:
    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare
    from mcl_ray.core.ray_env import init_ray, quiet_ray_data
    from mcl_ray.core.config import RayConfig

    t0 = time.perf_counter()
    init_ray(RayConfig(num_cpus=cpus), ROOT / "runs")
    quiet_ray_data()
    t_init = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        if source == "ml1m":
            cfg = load_config(ROOT / "experiments/ml1m_swr.yaml", [f"run_dir={tmp}"])
        else:
            cfg = synthetic_cfg(rows, tmp)
        t1 = time.perf_counter()
        res = prepare(cfg, force=True)
        wall = time.perf_counter() - t1
    n = res.stats["rows"]["interactions"]["rows_in"]
    return {"path": "ray", "source": source, "cpus": cpus, "rows": n, "seconds": wall,
            "rows_per_s": n / wall, "ray_init_s": t_init, "driver_peak_rss_mib": peak_rss_mib()}


def one_pandas(rows: int) -> dict:
    """The same synthetic generation + fusion + vocab + encode + write, single process, no Ray."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mcl_ray.data import fuse, prepare as prep, synthetic
    from mcl_ray.data.raw import add_profile_text_columns

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        cfg = synthetic_cfg(rows, tmp)
        src, pc_cfg = cfg.data, cfg.prepare
        t0 = time.perf_counter()
        users = synthetic.make_users({"id": np.arange(src.num_users)}, src.seed, src.num_scenarios)
        items = synthetic.make_items({"id": np.arange(src.num_items)}, src.seed)
        item_cdf, liked = synthetic.planted_structure(src)
        inter = synthetic.make_interactions(
            {"id": np.arange(src.num_interactions)}, src.seed,
            np.array([int(s[3:]) for s in users["segment"]]), users["fav_genre"].to_numpy(),
            item_cdf, items["primary_genre"].to_numpy(), items["quality"].to_numpy(), liked)
        users_t = add_profile_text_columns(pa.Table.from_pandas(users.drop(columns=["fav_genre"])), ml1m_codes=True)
        items_t = pa.Table.from_pandas(items.drop(columns=["primary_genre", "quality"]))
        u_kept, _ = fuse.validate_keyed_table(users_t, "user_id", "users")
        i_kept, _ = fuse.validate_keyed_table(items_t, "item_id", "items")
        names = sorted(set(u_kept["segment"]))
        plan = fuse.plan_fusion(pc_cfg, list(inter.columns), u_kept, i_kept, {n: i for i, n in enumerate(names)})
        fused = fuse.fuse_batch(pa.Table.from_pandas(inter, preserve_index=False), plan)
        good = pa.Table.from_pandas(fused, preserve_index=False)
        categorical = {f.name: f.min_count for f in pc_cfg.categorical}
        prof = prep.profile_batch(good, list(categorical), list(pc_cfg.numeric)).to_pandas()
        vocabs = prep.fit_vocabs(prof, categorical)
        numeric = prep.fit_numeric(prof, list(pc_cfg.numeric))
        enc = prep.encode_batch(good, {f: pa.array(vs, pa.string()) for f, vs in vocabs.items()}, numeric)
        pq.write_to_dataset(enc, str(Path(tmp) / "data"), partition_cols=["split"])
        wall = time.perf_counter() - t0
    assert enc.num_rows == len(inter)
    return {"path": "pandas", "source": "synthetic", "cpus": 1, "rows": len(inter), "seconds": wall,
            "rows_per_s": len(inter) / wall, "driver_peak_rss_mib": peak_rss_mib()}


def child(args: list[str]) -> dict:
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic-rows", type=int, default=5_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs="*")
    ap.add_argument("--out", default=str(ROOT / "bench/results/prepare.json"))
    a = ap.parse_args()
    if a.child is not None:
        kind, rows, cpus = a.child[0], int(a.child[1]), int(a.child[2])
        res = one_pandas(rows) if kind == "pandas" else one_ray(kind, rows, cpus)
        print(json.dumps(res))
        return
    (ROOT / "runs").mkdir(exist_ok=True)
    runs = []
    plan = [("ml1m", 0, 2)]
    # interleave so machine noise hits every variant alike
    for _ in range(a.repeats):
        plan += [("pandas", a.synthetic_rows, 1), ("synthetic", a.synthetic_rows, 1),
                 ("synthetic", a.synthetic_rows, 2)]
    for kind, rows, cpus in plan:
        r = child([kind, str(rows), str(cpus)])
        print(f"  {r['path']:6s} {r['source']:9s} cpus={r['cpus']} rows={r['rows']:,} {r['seconds']:.1f}s "
              f"{r['rows_per_s']:,.0f} rows/s peak RSS {r['driver_peak_rss_mib']:.0f} MiB", flush=True)
        runs.append(r)

    def med(path, source, cpus, key="seconds"):
        v = [r[key] for r in runs if r["path"] == path and r["source"] == source and r["cpus"] == cpus]
        return statistics.median(v) if v else None

    pandas_s = med("pandas", "synthetic", 1)
    ray1, ray2 = med("ray", "synthetic", 1), med("ray", "synthetic", 2)
    summary = {
        "machine": f"{os.cpu_count()} cores",
        "ml1m_prepare_s": med("ray", "ml1m", 2),
        "ml1m_rows_per_s": med("ray", "ml1m", 2, "rows_per_s"),
        "ml1m_driver_peak_rss_mib": med("ray", "ml1m", 2, "driver_peak_rss_mib"),
        "synthetic_rows": a.synthetic_rows,
        "pandas_single_process_s": pandas_s,
        "ray_1cpu_s": ray1,
        "ray_2cpu_s": ray2,
        "ratio_ray2_vs_pandas": pandas_s / ray2,
        "ratio_ray1_vs_pandas": pandas_s / ray1,
        "scaling_2cpu_vs_1cpu": ray1 / ray2,
        "driver_peak_rss_mib": {"pandas": med("pandas", "synthetic", 1, "driver_peak_rss_mib"),
                                "ray_2cpu": med("ray", "synthetic", 2, "driver_peak_rss_mib")},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    print("\nprepare benchmark (medians)")
    for k, v in summary.items():
        print(f"  {k:28s} {v if not isinstance(v, float) else round(v, 3)}")
    print(f"results -> {a.out}")


if __name__ == "__main__":
    main()
