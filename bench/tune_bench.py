"""Sweep benchmark on ML-1M (SWR protocol): `experiments/ml1m_swr_tune.yaml` (16 trials, <= 6 epochs here,
Optuna TPE) run twice, with ASHA and with FIFO (every trial to the end), one after the other in one
process; plus the experiment's default configuration trained once. Prints and writes
bench/results/tune.json: trials/hour and epochs of each sweep, the ASHA winner's overall and
per-scenario test AUC against the default configuration's. Numbers, not assertions.

  python bench/tune_bench.py                        # the full benchmark (~30 min on 2 cores)
  python bench/tune_bench.py --samples 4 --epochs 2 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--schedulers", nargs="+", default=["asha", "fifo"])
    args = ap.parse_args()

    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare
    from mcl_ray.core.ray_env import init_ray
    from mcl_ray.train.trainer import train_one
    from mcl_ray.tune.sweep import sweep

    base = ["run_dir=runs/bench_tune", f"tune.num_samples={args.samples}", f"tune.epochs={args.epochs}"]
    cfg = load_config(ROOT / "experiments/ml1m_swr_tune.yaml", base)
    init_ray(cfg.ray, ROOT / "runs")
    prep = prepare(cfg)
    out: dict = {"samples": args.samples, "epoch_cap": args.epochs, "sweeps": {}}
    for sched in args.schedulers:
        c = load_config(ROOT / "experiments/ml1m_swr_tune.yaml",
                        base + [f"run_dir=runs/bench_tune_{sched}", f"tune.scheduler={sched}"])
        t0 = time.perf_counter()
        res = sweep(c, prep.out_dir, Path(c.resolved_run_dir()), force=True)
        s = json.loads((res.tune_dir / "summary.json").read_text())
        out["sweeps"][sched] = {**s, "wall_seconds": time.perf_counter() - t0,
                                "early_stopped": sum(r["status"] == "early-stopped" for r in res.trials)}
        print(f"{sched}: {s['trials']} trials, {s['epochs']} epochs in {s['fit_seconds'] / 60:.1f} min = "
              f"{s['trials_per_hour']:.1f} trials/h; winner val {s['winner']['best_val_auc']:.4f} "
              f"test {s['winner_test']['overall']['auc']:.4f} {s['winner']['params']}", flush=True)
    # the default configuration, same epoch cap, evaluated on the test split like the winner
    d = load_config(ROOT / "experiments/ml1m_swr_tune.yaml", base + [f"train.epochs={args.epochs}"])
    r = train_one(d, prep.out_dir, ROOT / "runs/bench_tune/default", seed=d.train.seed)
    out["default_test"] = {"overall": r.metrics["overall"], "by_scenario": r.metrics["by_scenario"]}
    print(f"default config: test AUC {r.metrics['overall']['auc']:.4f}")
    if "asha" in out["sweeps"] and "fifo" in out["sweeps"]:
        a, f = out["sweeps"]["asha"], out["sweeps"]["fifo"]
        out["asha_vs_fifo_trials_per_hour"] = a["trials_per_hour"] / f["trials_per_hour"]
        print(f"ASHA {a['trials_per_hour']:.1f} vs FIFO {f['trials_per_hour']:.1f} trials/h "
              f"({out['asha_vs_fifo_trials_per_hour']:.2f}x)")
    dest = ROOT / "bench/results/tune.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
