"""Scenario-Wise Rec protocol on ML-1M: every backbone x 3 seeds, overall and per-scenario test AUC
and logloss (mean +- std), next to the published numbers (the SWR paper, KDD'24). Numbers, not assertions.

  python bench/accuracy_bench.py                      # all backbones, 3 seeds, 2 jobs at a time
  python bench/accuracy_bench.py --backbones shared_bottom star --seeds 1 --epochs 2   # a smoke run
  python bench/accuracy_bench.py --backbones shared_bottom shared_bottom+text m2m m2m+text --epochs 12 \
      --out bench/results/text_ablation.json   # the text ablation (llm_ranker: add it, hours on CPU)

"+noise", "+fgm", "+pgd" train with that embedding perturbation (train.perturbation, eps
PERTURB_EPS); every variant also reports its test AUC with CORRUPT_SHARE of the test rows'
categorical ids replaced at random (robustness):

  python bench/accuracy_bench.py --backbones shared_bottom shared_bottom+noise shared_bottom+fgm \
      --out bench/results/perturbation.json

A "+stream" suffix trains in stream mode (the same protocol, data streamed from Ray Data):

  python bench/accuracy_bench.py --backbones shared_bottom shared_bottom+stream \
      --out bench/results/stream_vs_memory.json

A "+hist" suffix adds the behaviour-history fields (model.history.pooling=[din, mean]: DIN target
attention and the mean over each row's last --history-length train interactions, default HISTORY_LEN).
With any +hist variant (or --history) the data is prepared with prepare.history once and every variant
of the run trains on it, so all rows of a results file see the same prepared rows; the others ignore
the history:

  python bench/accuracy_bench.py --backbones shared_bottom shared_bottom+text shared_bottom+hist \
      shared_bottom+hist+text --run-dir runs/bench_history --out bench/results/history.json

A "+profile" suffix (with +text) adds the LLM user profiles as a third text field
(model.text.fields=[item, user, profile]): the profile stage writes one for every user with train
rows (PROFILE_OVERRIDES: vLLM on CPU, SmolLM2; 34 min for ML-1M here, cached by fingerprint) and encode
embeds them, once before the jobs:

  python bench/accuracy_bench.py --backbones shared_bottom shared_bottom+text shared_bottom+hist \
      shared_bottom+hist+text shared_bottom+hist+text+profile --resume \
      --run-dir runs/bench_history --out bench/results/history.json

--out is rewritten after every job (pending_jobs says how many were still running), and --resume
keeps the finished rows of --out and runs only the missing or failed jobs (a job's finished training
is reused; its evaluation runs again): an interrupted run loses no finished job. wall_seconds is then
that invocation's. The file is rewritten with the variants named, so name the finished ones too; a
resume with other --set overrides or another --history-length stops with an error. The LLM stages
(encode, profile, augment) run only for the jobs left to run; the file keeps the profile stats it
recorded.

--set KEY=VALUE (repeatable) adds one config override to every job, after the variant's own (e.g. a
learning rate to compare on validation): it is recorded in --out, and those jobs train in folders of
their own, next to the plain runs of the same --run-dir. A prepare.* key also shapes the run's one prepare,
which rebuilds the --run-dir's prepare folder: give such a run a --run-dir of its own:

  python bench/accuracy_bench.py --backbones shared_bottom+hist+text --seeds 1 --set train.lr=0.003 \
      --run-dir runs/bench_history --out bench/results/screen_lr.json

A "+text" suffix adds the LLM text features (model.text.mode=frozen: MiniLM embeddings of item and
user texts through a learned projection; the encode stage runs once before the jobs).
llm_ranker (the MiniLM cross-encoder) is far too slow for the full protocol on CPU, so it follows a
sample protocol: LLM_RANKER_SAMPLE rows of train/valid/test (seeded), LLM_RANKER_EPOCHS epochs,
batch 32, AdamW lr 5e-5; its test AUC is over the sampled test rows (compare with
"ref@sample": the other variants' AUC over the same test rows, also reported).

Settings (SWR's own): embedding dim 16, Adam lr 1e-3, batch 4096, weight decay 1e-5, early stopping
on validation AUC with patience 4; here capped at --epochs (default 15) to fit a 2-core machine.
Expert MLPs (mmoe, ple, m2m) are [128, 64] instead of [256, 128] for the same reason.
Each (backbone, seed) runs through the real path (Ray Train, 1 worker, 1 thread) in its own
process; --jobs of them run side by side. Results: bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {  # overall, (scenario 0, 1, 2); SWR paper, KDD'24
    "shared_bottom": (0.8095, (0.8116, 0.8128, 0.8041)), "mmoe": (0.8086, (0.8029, 0.8178, 0.8016)),
    "ple": (0.8091, (0.8118, 0.8187, 0.8002)), "star": (0.8096, (0.8137, 0.8133, 0.7979)),
    "m2m": (0.8115, (0.8111, 0.8163, 0.8057)), "pepnet": (None, None), "single": (None, None),
}
ORDER = ["m2m", "ple", "mmoe", "pepnet", "star", "single", "shared_bottom"]  # longest first
EXPERT_HIDDEN = {"mmoe": "[128,64]", "ple": "[128,64]", "m2m": "[128,64]"}
LLM_RANKER_SAMPLE = {"train": 8000, "valid": 1000, "test": 10000}
LLM_RANKER_EPOCHS = 1


PERTURB = {"noise": "random", "fgm": "fgm", "pgd": "pgd"}
PERTURB_EPS = 0.05
CORRUPT_SHARE = 0.2  # robustness: AUC when this share of the test rows' categorical ids is replaced at random


HISTORY_LEN = 20  # prepare.history.length of +hist runs
AUG_USERS = 400  # thin users (<= 30 train interactions) prompted once, shared by every +aug variant
THIN = 30
EPOCHS = 15  # the protocol's epoch cap (with patience 4 on validation AUC)
PROFILE_OVERRIDES = ["profile.backend=vllm", "profile.batch_size=64", "profile.torch_threads=2", "ray.num_cpus=4"]
PROFILE_FIELDS = "model.text.fields=[item, user, profile]"


def history_overrides(length: int) -> list[str]:
    """prepare.history for a history length (0: no history columns)."""
    return [f"prepare.history={{length: {length}}}"] if length else []


def parent_overrides(run_dir: str, history: int, sets: list[str]) -> list[str]:
    """The config of the run's one prepare (and encode, profile, augment). --set prepare.* keys shape the
    prepared data, so they apply here too (they rebuild the --run-dir's prepare folder: give such a run a
    --run-dir of its own); the other --set keys are the jobs' own."""
    return [f"run_dir={run_dir}", *history_overrides(history), *[s for s in sets if s.startswith("prepare.")]]


def overrides(variant: str, epochs: int, history: int = 0) -> list[str]:
    backbone, *extras = variant.split("+")
    o = [f"model.backbone={backbone}", f"train.epochs={epochs}", "train.num_workers=1", "train.torch_threads=1",
         *history_overrides(history)]
    if backbone in EXPERT_HIDDEN:
        o.append(f"model.hidden={EXPERT_HIDDEN[backbone]}")
    for x in extras:
        if x not in ("text", "stream", "hist", "profile", *PERTURB) and not x.startswith("aug"):
            raise SystemExit(f"unknown variant suffix +{x} (known: +text, +hist, +profile, +stream, "
                             f"+{', +'.join(PERTURB)}, +aug<weight>)")
    if "profile" in extras and "text" not in extras:
        raise SystemExit(f"{variant}: +profile is a text field, it needs +text too")
    if "hist" in extras:
        o.append("model.history.pooling=[din, mean]")
    for x in extras:
        if x in PERTURB:  # embedding perturbation in training (train.perturbation), eps PERTURB_EPS
            o += [f"train.perturbation={PERTURB[x]}", f"train.perturbation_eps={PERTURB_EPS}"]
    # +stream: workers iterate their Ray Data shard through a local shuffle buffer instead of
    # holding it as tensors (train.data_mode=stream); the rest of the protocol is unchanged
    o.append(f"train.data_mode={'stream' if 'stream' in extras else 'memory'}")
    o.append(f"model.text.mode={'frozen' if 'text' in extras else 'off'}")  # explicit: the default experiment has text on
    if "profile" in extras:
        o.append(PROFILE_FIELDS)
    o += augment_overrides([x for x in extras if x.startswith("aug")])
    if backbone == "llm_ranker":
        o += [f"train.sample_rows={json.dumps(LLM_RANKER_SAMPLE)}", f"train.epochs={LLM_RANKER_EPOCHS}",
              "train.batch_size=32", "train.optimizer=adamw", "train.lr=5e-5", "train.weight_decay=0.01",
              "train.eval_batch_size=256", "evaluate.ranking_users=0"]
    return o


def augment_overrides(aug: list[str]) -> list[str]:
    common = [f"augment.num_users={AUG_USERS}", f"augment.max_interactions={THIN}", "augment.batch_size=16",
              "ray.num_cpus=4"]
    if not aug:
        return common
    return common + ["augment.enabled=true", f"augment.weight={float(aug[0][3:])}"]


def auc_thin(train_dir: Path, prepare_dir: Path) -> float:
    """Test AUC over users with <= THIN train interactions (the users augmentation targets)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from mcl_ray.core.config import ExperimentConfig
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.data.splits import read_split
    from mcl_ray.evaluate.evaluate import predict
    from mcl_ray.models.batch import Batch
    from mcl_ray.models.weights import MODEL, load_trained

    cfg = ExperimentConfig.model_validate_json((train_dir / "config.json").read_text())
    spec = FeatureSpec.load(prepare_dir)
    counts = read_split(prepare_dir, spec, "train", extra=["user_key"])["user_key"].value_counts()
    thin = {c["values"] for c in counts.to_pylist() if c["counts"] <= THIN}
    test = read_split(prepare_dir, spec, "test", extra=["user_key"])
    mask = np.array([u in thin for u in test["user_key"].to_pylist()])
    data = Batch.from_table(test.filter(mask), spec)
    p = predict(load_trained(spec, cfg.model, train_dir / MODEL), data, 65536, torch.device("cpu"))
    return float(roc_auc_score(data.label.numpy(), p))


def auc_on_sample(train_dir: Path, prepare_dir: Path, seed: int) -> float:
    """Test AUC over llm_ranker's sampled test rows (same seed -> same rows), for a like-for-like comparison."""
    import torch
    from sklearn.metrics import roc_auc_score

    from mcl_ray.core.config import ExperimentConfig
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.data.splits import read_split
    from mcl_ray.evaluate.evaluate import predict
    from mcl_ray.models.batch import Batch
    from mcl_ray.models.weights import MODEL, load_trained

    cfg = ExperimentConfig.model_validate_json((train_dir / "config.json").read_text())
    spec = FeatureSpec.load(prepare_dir)
    data = Batch.from_table(read_split(prepare_dir, spec, "test", sample=LLM_RANKER_SAMPLE["test"], seed=seed), spec)
    p = predict(load_trained(spec, cfg.model, train_dir / MODEL), data, 65536, torch.device("cpu"))
    return float(roc_auc_score(data.label.numpy(), p))


def auc_corrupted(train_dir: Path, prepare_dir: Path, share: float = CORRUPT_SHARE, seed: int = 0) -> float:
    """Test AUC after replacing `share` of all (row, categorical feature) ids of the test split by
    ids drawn uniformly from the feature's vocabulary (seeded: every variant sees the same noise)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from mcl_ray.core.config import ExperimentConfig
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.evaluate.evaluate import predict
    from mcl_ray.models.batch import load_split
    from mcl_ray.models.weights import MODEL, load_trained

    cfg = ExperimentConfig.model_validate_json((train_dir / "config.json").read_text())
    if cfg.model.backbone == "llm_ranker":
        return float("nan")  # reads text, not ids (and the full test split takes hours on CPU)
    spec = FeatureSpec.load(prepare_dir)
    data = load_split(prepare_dir, spec, "test")
    rng = np.random.default_rng(seed)
    cat = data.cat.numpy().copy()
    sizes = np.array([f.vocab_size for f in spec.categorical])
    hit = (rng.random(cat.shape) < share) & (sizes >= 2)  # a feature with no known id has nothing to swap in
    cat[hit] = (rng.random(cat.shape) * (sizes - 1)).astype(np.int64)[hit] + 1
    data.cat = torch.from_numpy(cat)
    p = predict(load_trained(spec, cfg.model, train_dir / MODEL), data, 65536, torch.device("cpu"))
    return float(roc_auc_score(data.label.numpy(), p))


def job_dir_name(backbone: str, seed: int, extra: list[str], epochs: int = EPOCHS) -> str:
    """A job's train folder; runs with --set overrides or another --epochs cap get their own (a hash of
    them), so they never overwrite or reuse the plain runs of the same run dir."""
    key = [*extra, *([f"--epochs={epochs}"] if epochs != EPOCHS else [])]
    tag = "_" + hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8] if key else ""
    return f"{backbone}_seed{seed}{tag}"


def child(backbone: str, seed: int, epochs: int, run_dir: str, history: int, extra: list[str]) -> None:
    from mcl_ray.core.config import load_config
    from mcl_ray.core.ray_env import init_ray
    from mcl_ray.train.trainer import train_one

    cfg = load_config(ROOT / "experiments/ml1m_swr.yaml",
                      [f"run_dir={run_dir}", *overrides(backbone, epochs, history), *extra])
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    res = train_one(cfg, Path(run_dir) / "prepare", Path(run_dir) / "train" / job_dir_name(backbone, seed, extra, epochs), seed)
    m = res.metrics
    ref = auc_on_sample(res.train_dir, Path(run_dir) / "prepare", seed)
    thin = auc_thin(res.train_dir, Path(run_dir) / "prepare")
    corrupted = auc_corrupted(res.train_dir, Path(run_dir) / "prepare")
    best = max(res.history, key=lambda h: h["val_auc"])
    print(json.dumps({"backbone": backbone, "seed": seed, "auc": m["overall"]["auc"], "auc_at_sample": ref,
                      "val_auc": best["val_auc"],
                      "auc_thin_users": thin, "auc_corrupted": corrupted,
                      "logloss": m["overall"]["logloss"], "gauc": m["overall"]["gauc"],
                      "by_scenario": {k: {"auc": v["auc"], "logloss": v["logloss"]} for k, v in m["by_scenario"].items()},
                      "epochs": len(res.history), "best_epoch": best["epoch"],
                      "seconds": time.perf_counter() - t0,
                      "epoch_seconds": statistics.median(h["epoch_seconds"] for h in res.history)}))


def run_job(args, backbone: str, seed: int, slot: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=f"/tmp/mclb{slot}", RAY_DATA_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__, "--child", backbone, str(seed), str(args.epochs), args.run_dir,
                        str(int(args.history)), json.dumps(args.set)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        return {"backbone": backbone, "seed": seed, "error": p.stderr[-1500:]}
    # the child's result is its last JSON line (a library may print after it)
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        return {"backbone": backbone, "seed": seed, "error": "no result line; stdout: " + p.stdout[-1500:]}
    r = json.loads(lines[-1])
    print(f"  {backbone:14s} seed {seed}: AUC {r['auc']:.4f}  logloss {r['logloss']:.4f}  "
          f"{r['epochs']} epochs ({r['epoch_seconds']:.1f} s each)", flush=True)
    return r


def aggregate(backbones: list[str], runs: list[dict]) -> dict:
    """Per variant: mean and std over its finished seeds."""
    ok = [r for r in runs if "error" not in r]
    table = {}
    for b in backbones:
        rs = [r for r in ok if r["backbone"] == b]
        if not rs:
            continue
        agg = lambda xs: {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}  # noqa: E731
        scen = list(rs[0]["by_scenario"])
        table[b] = {"auc": agg([r["auc"] for r in rs]), "logloss": agg([r["logloss"] for r in rs]),
                    "val_auc": agg([r["val_auc"] for r in rs]),
                    "auc_at_sample": agg([r["auc_at_sample"] for r in rs]),
                    "auc_thin_users": agg([r["auc_thin_users"] for r in rs]),
                    "auc_corrupted": agg([r["auc_corrupted"] for r in rs]),
                    "by_scenario": {s: {"auc": agg([r["by_scenario"][s]["auc"] for r in rs]),
                                        "logloss": agg([r["by_scenario"][s]["logloss"] for r in rs])} for s in scen},
                    "seeds": len(rs), "published": PUBLISHED.get(b)}
    return table


def write_results(a, runs: list[dict], profile_stats: dict | None, t0: float, pending: int) -> dict:
    """--out with the runs finished so far, in job order; `pending` > 0 marks a file still being written."""
    order = {(b, 2024 + s): i for i, (b, s) in enumerate((b, s) for b in a.backbones for s in range(a.seeds))}
    runs = sorted(runs, key=lambda r: order.get((r["backbone"], r["seed"]), len(order)))
    table = aggregate(a.backbones, runs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"table": table, "runs": runs, "epochs_cap": a.epochs,
                                       "history_length": a.history or None, "overrides": a.set,
                                       **({"profile": profile_stats} if profile_stats else {}),
                                       **({"pending_jobs": pending} if pending else {}),
                                       "wall_seconds": time.time() - t0}, indent=2))
    return table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="*", default=ORDER)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_accuracy"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/accuracy.json"))
    ap.add_argument("--history", action="store_true", help="prepare with behaviour history (implied by +hist)")
    ap.add_argument("--history-length", type=int, default=HISTORY_LEN,
                    help="L of prepare.history when the run has history (every variant of the run sees the same rows)")
    ap.add_argument("--resume", action="store_true", help="keep the finished runs of --out (same script version), "
                    "run only the missing or failed ones (a finished training is reused, only its evaluation reruns)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every job of the run, after the variant's own (repeatable; "
                    "recorded in --out): e.g. --set train.lr=0.003")
    ap.add_argument("--child", nargs=6)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]), a.child[3], int(a.child[4]), json.loads(a.child[5]))
        return
    a.history = a.history_length if a.history or any("+hist" in b for b in a.backbones) else 0
    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare
    from mcl_ray.core.ray_env import init_ray

    jobs = [(b, 2024 + s) for b in a.backbones for s in range(a.seeds)]
    kept, old = [], {}
    if a.resume and Path(a.out).exists():  # keep the finished rows of an earlier invocation, rerun the rest
        old = json.loads(Path(a.out).read_text())
        if old.get("overrides", []) != a.set:
            raise SystemExit(f"--resume: {a.out} was run with --set {old.get('overrides', [])}, this run has "
                             f"{a.set}: use the same overrides or another --out")
        if old.get("history_length") != (a.history or None):
            raise SystemExit(f"--resume: {a.out} was prepared with history length {old.get('history_length')}, "
                             f"this run with {a.history or None}: use the same --history-length or another --out")
        if old.get("epochs_cap", a.epochs) != a.epochs:
            raise SystemExit(f"--resume: {a.out} was run with --epochs {old['epochs_cap']}, this run with "
                             f"{a.epochs}: use the same --epochs or another --out")
        done = {(r["backbone"], r["seed"]): r for r in old["runs"] if "error" not in r}
        kept = [done[j] for j in jobs if j in done]
        jobs = [j for j in jobs if j not in done]
        print(f"resume: {len(kept)} finished runs kept from {a.out}, {len(jobs)} to run", flush=True)
    # the profile stage runs when a +profile job is left to run; a resumed file keeps its recorded stats
    profile = any("+profile" in b for b, _ in jobs)
    base = [*parent_overrides(a.run_dir, a.history, a.set), *(PROFILE_OVERRIDES if profile else [])]
    cfg = load_config(ROOT / "experiments/ml1m_swr.yaml", base)
    init_ray(cfg.ray)
    res = prepare(cfg)  # once; every job reuses it
    if any("+text" in b for b, _ in jobs):
        from mcl_ray.llm.encode import encode_stage

        encode_stage(cfg, res.out_dir)
    profile_stats = old.get("profile") if any("+profile" in b for b in a.backbones) else None
    if profile:  # every user profiled once, then embedded
        from mcl_ray.llm.encode import encode_stage
        from mcl_ray.llm.profile import profile_stage

        pcfg = load_config(ROOT / "experiments/ml1m_swr.yaml", [*base, PROFILE_FIELDS])
        # the stage's own stats (time to profile every user), also when this run reused its output
        profile_stats = {k: v for k, v in profile_stage(pcfg, res.out_dir).stats.items() if k != "examples"}
        print("profile:", profile_stats)
        encode_stage(pcfg, res.out_dir)
    if any("+aug" in b for b, _ in jobs):  # one generation, every weight trains on it
        from mcl_ray.llm.augment import augment_stage

        acfg = load_config(ROOT / "experiments/ml1m_swr.yaml", [*parent_overrides(a.run_dir, a.history, a.set),
                                                                 *augment_overrides(["aug1"])])
        print("augment:", {k: v for k, v in augment_stage(acfg, res.out_dir).stats.items() if k != "fingerprint"})
    import ray

    ray.shutdown()
    t0 = time.time()
    runs = list(kept)
    with ThreadPoolExecutor(a.jobs) as pool:
        futs = [pool.submit(run_job, a, b, s, i % a.jobs) for i, (b, s) in enumerate(jobs)]
        for n, f in enumerate(as_completed(futs), 1):  # the file after every job: an interrupted run keeps them
            runs.append(f.result())
            write_results(a, runs, profile_stats, t0, pending=len(jobs) - n)
    table = write_results(a, runs, profile_stats, t0, pending=0)
    for e in [r for r in runs if "error" in r]:
        print(f"FAILED {e['backbone']} seed {e['seed']}:\n{e['error']}")
    print(f"\nSWR protocol on ML-1M, test split, {a.seeds} seeds (mean ± std); published in brackets")
    print(f"{'backbone':18s} {'overall AUC':>20s} {'logloss':>16s}   per-scenario AUC (s0 / s1 / s2)   "
          f"AUC on llm_ranker's test sample   AUC users <= {THIN} train rows   AUC {CORRUPT_SHARE:.0%} ids corrupted")
    for b, t in sorted(table.items(), key=lambda kv: -kv[1]["auc"]["mean"]):
        pub = t["published"][0] if t["published"] else None
        ps = t["published"][1] if t["published"] else None
        sc = " / ".join(f"{v['auc']['mean']:.4f}" + (f" [{ps[i]:.4f}]" if ps else "")
                        for i, v in enumerate(t["by_scenario"].values()))
        print(f"{b:18s} {t['auc']['mean']:.4f} ± {t['auc']['std']:.4f}" + (f" [{pub:.4f}]" if pub else " [  -   ]")
              + f" {t['logloss']['mean']:.4f} ± {t['logloss']['std']:.4f}   {sc}   "
              + f"{t['auc_at_sample']['mean']:.4f} ± {t['auc_at_sample']['std']:.4f}   "
              + f"{t['auc_thin_users']['mean']:.4f} ± {t['auc_thin_users']['std']:.4f}   "
              + f"{t['auc_corrupted']['mean']:.4f} ± {t['auc_corrupted']['std']:.4f}")
    print(f"results -> {a.out}")


if __name__ == "__main__":
    main()
