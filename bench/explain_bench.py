"""Explanation latency, in process (what one /v1/explain costs a model replica), on one artifact:
p50 / p99 of the attributions + history evidence alone, and with the generator's sentence through
each backend that runs here (transformers; vllm when installed). One torch thread, as in serving.

Requests: random known users, each with the top item the model recommends them in their scenario.
Writes bench/results/explain.json.

  python bench/explain_bench.py --artifact runs/ml1m_swr/artifact
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

from bench.serve_bench import bodies  # noqa: E402


def pct(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=100) if len(xs) > 1 else [xs[0]] * 99
    return {"n": len(xs), "p50_ms": round(q[49] * 1e3, 1), "p99_ms": round(q[98] * 1e3, 1),
            "mean_ms": round(statistics.fmean(xs) * 1e3, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=100, help="without the sentence")
    ap.add_argument("--sentences", type=int, default=20, help="with the sentence, per backend")
    ap.add_argument("--backends", nargs="+", default=["transformers", "vllm"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/explain.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from mcl_ray.llm.backends import vllm_available
    from mcl_ray.llm.explain import SentenceWriter
    from mcl_ray.serve.explain import Explainer, ExplainQuery
    from mcl_ray.serve.recommender import Query, Recommender

    rec = Recommender(str(a.artifact), torch_threads=1)
    ex = Explainer(rec)
    reqs = bodies(a.artifact, a.requests, seed=1)
    queries = []
    for b in reqs:
        top = rec.recommend_many([Query(user_id=b["user_id"], scenario=b["scenario"], k=1)])[0]["items"][0]
        queries.append(ExplainQuery(user_id=b["user_id"], scenario=b["scenario"], item_id=top["item_id"]))
    ex.explain(queries[0])  # warm-up
    lat, deltas, answers = [], [], []
    for q in queries:
        t = time.perf_counter()
        out = ex.explain(q)
        lat.append(time.perf_counter() - t)
        deltas.append(abs(out["convergence_delta"]) / max(1e-6, abs(out["logit"] - out["baseline_logit"])))
        answers.append(out)
    res = {"machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
           "date": time.strftime("%Y-%m-%d"), "artifact": str(a.artifact), "torch_threads": torch.get_num_threads(),
           "ig_steps": rec.art.cfg.explain.steps, "without_sentence": pct(lat),
           "relative_convergence_delta_median": round(statistics.median(deltas), 4),
           "top_fields": _top_fields(answers), "with_sentence": {}}
    print(f"attributions + history: {res['without_sentence']}; median |delta| / |logit - baseline| "
          f"{res['relative_convergence_delta_median']}", flush=True)
    for backend in a.backends:
        if backend == "vllm" and not vllm_available():
            res["with_sentence"][backend] = "not installed"
            continue
        t = time.perf_counter()
        w = SentenceWriter(rec.art.cfg.explain.model_copy(update={"backend": backend}))
        load_s = time.perf_counter() - t
        lat, cut, samples = [], 0, []
        for q in queries[:a.sentences]:
            t = time.perf_counter()
            out = ex.explain(q)
            s = w.write(out)
            lat.append(time.perf_counter() - t)
            cut += s["cut"]
            if len(samples) < 3:
                samples.append({"facts": s["facts"], "sentence": s["sentence"]})
        res["with_sentence"][backend] = {**pct(lat), "load_s": round(load_s, 1), "cut": cut, "samples": samples}
        print(f"with the sentence ({backend}): {res['with_sentence'][backend]}", flush=True)
        del w
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


def _top_fields(answers: list[dict]) -> dict:
    """How often each field is the largest-magnitude attribution (what drives this model's scores)."""
    counts: dict[str, int] = {}
    for x in answers:
        f = x["fields"][0]["field"]
        counts[f] = counts.get(f, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    main()
