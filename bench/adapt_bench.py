"""A new scenario from few rows on ML-1M: one SWR scenario is held out of training entirely, then
added from k of its train rows by each `mcl-ray adapt` method; AUC on its test rows, mean +- std over
3 seeds. Numbers, not assertions.

  python bench/adapt_bench.py                  # s0_age_under25 held out, k in 100 / 1,000 / 10,000
  python bench/adapt_bench.py --seeds 1 --ks 100 --epochs 2   # a smoke run

Protocol: the SWR feature set (text off, retrieval off), shared_bottom, the default experiment's
training settings (15-epoch cap, patience 4) with train.holdout_scenarios=[HELD]; seeds 2024-2026
(`mcl-ray train --seeds 3`, the real path). For each seed the same k rows (adapt.seed = the seed's
index) go to every method: finetune (the held-out tower starts from the mean of the trained
towers), meta (from a Reptile meta-initialisation over the two trained scenarios) and scratch (a
fresh model on the k rows alone); finetune and meta also train the embedding rows of ids no
trained scenario uses (adapt.new_ids: the held-out age group's own users), and "finetune-tower"
is finetune without them (its tower only). 20% of the k rows are held back for early stopping; the test rows
are the scenario's whole test split. "start" is the test AUC of the initialisation before any
adaptation step (k rows unused). Writes bench/results/adaptation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HELD = "s0_age_under25"
METHODS = ("finetune", "meta", "scratch", "finetune-tower")  # the last: adapt.new_ids=false


def ms(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "runs": [round(x, 4) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/bench_adapt")
    ap.add_argument("--held", default=HELD)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--ks", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/adaptation.json")
    a = ap.parse_args()
    run = ROOT / a.run_dir
    sets = [f"run_dir={run}", "model.text.mode=off", "retrieval.enabled=false", f"train.epochs={a.epochs}",
            f"train.holdout_scenarios=[{a.held}]"]
    cli = [str(ROOT / ".venv/bin/mcl-ray")]
    t0 = time.perf_counter()
    for cmd in (["prepare"], ["train", "--seeds", str(a.seeds)]):
        subprocess.run(cli + cmd + [str(ROOT / "experiments/ml1m_swr.yaml")] + [x for s in sets for x in ("--set", s)],
                       check=True)
    base_s = time.perf_counter() - t0

    import torch

    from mcl_ray.core.config import AdaptConfig
    from mcl_ray.train.adapt import Adapter

    torch.set_num_threads(1)
    seeds = sorted((run / "train").glob("seed_*"))[:a.seeds]
    rows: dict[tuple[str, int], list[dict]] = {}
    base = []
    for i, d in enumerate(seeds):
        m = json.loads((d / "metrics.json").read_text())
        base.append({"seed_dir": d.name, "test_auc_by_scenario": {k: v["auc"] for k, v in m["by_scenario"].items()},
                     "epochs": len(json.loads((d / "history.json").read_text()))})
        ad = Adapter(d, run / "prepare", a.held)
        t1 = time.perf_counter()
        meta_cfg = AdaptConfig(method="meta", seed=i)
        init = ad.meta_init(meta_cfg)
        meta_s = time.perf_counter() - t1
        for k in a.ks:
            for method in METHODS:
                ac = AdaptConfig(method=method.split("-")[0], k=k, seed=i, new_ids=not method.endswith("-tower"))
                _, s = ad.adapt(ac, init if method == "meta" else None)
                if method == "meta":
                    s["seconds"]["meta"] = meta_s
                s.pop("history")
                rows.setdefault((method, k), []).append(s)
                print(f"{d.name} k={k:>6} {method:>14}: start {s['init_test']['auc'] if s['init_test'] else float('nan'):.4f}"
                      f"  test AUC {s['test']['auc']:.4f}  steps {s['steps']}  ({sum(s['seconds'].values()):.1f} s)",
                      flush=True)

    table = []
    for (method, k), runs in rows.items():
        table.append({"method": method, "k": k, "test_auc": ms([r["test"]["auc"] for r in runs]),
                      "test_logloss": ms([r["test"]["logloss"] for r in runs]),
                      "start_auc": ms([r["init_test"]["auc"] for r in runs]) if runs[0]["init_test"] else None,
                      "best_step": ms([r["best_step"] for r in runs]),
                      "adapt_seconds": ms([r["seconds"]["adapt"] for r in runs]),
                      "meta_seconds": ms([r["seconds"]["meta"] for r in runs]) if method == "meta" else None,
                      "changed_elements": runs[0]["changed_elements"], "scenario_elements": runs[0]["scenario_elements"],
                      "runs": runs})
    out = {"bench": "adapt_bench", "script": Path(__file__).name, "held_out": a.held, "seeds": len(seeds),
           "ks": a.ks, "epochs_cap": a.epochs, "base": base, "base_seconds": round(base_s, 1),
           "adapt_defaults": AdaptConfig().model_dump(mode="json"), "table": table,
           "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
           "when": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    a.out.write_text(json.dumps(out, indent=1))
    print(f"\n{a.held} held out; test AUC of its test rows, mean +- std over {len(seeds)} seed(s)")
    print(f"{'k':>7} " + " ".join(f"{m:>20}" for m in METHODS))
    for k in a.ks:
        cells = []
        for m in METHODS:
            r = next(x for x in table if x["method"] == m and x["k"] == k)
            cells.append(f"{r['test_auc']['mean']:.4f} +- {r['test_auc']['std']:.4f}")
        print(f"{k:>7,} " + " ".join(f"{c:>20}" for c in cells))
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
