"""The cost of the behaviour-history fields: ms per training step (forward, backward, Adam) of
shared_bottom on ML-1M-sized tables, batch 4096, history length 20, 1 thread, measured side by side
in one run (the variants take turns, round after round, so machine noise hits them alike):

  none        no history fields (the SWR feature set)
  mean        model.history.pooling=[mean]
  din         [din]: the attention's first layer factored (HistoryPooling.din_weights, what trains)
  din_plain   [din]: the same weights applied to the [B, L, 4D] input cat[q, k, q-k, q*k] as written
              in the DIN paper (the previous implementation), for comparison
  din+mean    [din, mean] (ml1m_swr_best.yaml)

Random ids with the shapes of ML-1M (vocabularies, 3 scenarios, 0-20 real history entries per
row): the cost depends on shapes only, so no data is needed. Numbers, not assertions.

  .venv/bin/python bench/history_pooling_bench.py [--rounds 7] [--steps 10]

Results: bench/results/history_pooling.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = {"user_id": 6041, "item_id": 3707, "gender": 3, "occupation": 22, "zip": 3440, "first_genre": 19, "age": 8}
L, B = 20, 4096


def spec_and_batch():
    from mcl_ray.core.feature_spec import Feature, FeatureSpec
    from mcl_ray.data.history import sequence_features
    from mcl_ray.models.batch import Batch

    cats = [Feature(name=n, kind="categorical", source="user" if n != "item_id" else "item", vocab_size=v)
            for n, v in VOCAB.items()]
    spec = FeatureSpec(features=[*cats, *sequence_features(cats[1], L, 3)], scenario_names=["s0", "s1", "s2"],
                       splits={}, num_rows={}, data_fingerprint="bench")
    g = torch.Generator().manual_seed(0)
    valid = torch.arange(L)[None] < torch.randint(0, L + 1, (B, 1), generator=g)
    hist = torch.stack([torch.randint(1, VOCAB["item_id"], (B, L), generator=g) * valid,
                        torch.randint(1, 3, (B, L), generator=g) * valid,
                        torch.randint(0, 3, (B, L), generator=g) * valid], 1).int()
    cat = torch.stack([torch.randint(1, v, (B,), generator=g) for v in VOCAB.values()], 1)
    batch = Batch(cat=cat, num=torch.zeros(B, 0), scenario=torch.randint(0, 3, (B,), generator=g),
                  label=torch.randint(0, 2, (B,), generator=g).float(), hist=hist)
    return spec, batch


def plain_din(self, q, k):  # the unfactored form: the attention MLP over cat[q, k, q-k, q*k]
    qe = q.unsqueeze(1).expand_as(k)
    return self.attention(torch.cat([qe, k, qe - k, qe * k], dim=-1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench/results/history_pooling.json"))
    a = ap.parse_args()
    import torch.nn.functional as F

    from mcl_ray.core.config import ModelConfig
    from mcl_ray.models.backbones import build_model
    from mcl_ray.models.blocks import HistoryPooling

    torch.set_num_threads(1)
    spec, batch = spec_and_batch()
    variants = {"none": [], "mean": ["mean"], "din": ["din"], "din_plain": ["din"], "din+mean": ["din", "mean"]}
    runs = {}
    for name, pooling in variants.items():
        torch.manual_seed(0)
        model = build_model(spec, ModelConfig(backbone="shared_bottom", embedding_dim=16, hidden=[256, 128],
                                              tower_hidden=[64], dropout=0.1, history={"pooling": pooling}))
        if name == "din_plain":
            pool = next(m for m in model.modules() if isinstance(m, HistoryPooling))
            pool.din_weights = types.MethodType(plain_din, pool)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        runs[name] = (model, opt)

    def step(model, opt) -> None:
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.label)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for model, opt in runs.values():  # warm-up
        for _ in range(2):
            step(model, opt)
    ms = {name: [] for name in runs}
    for r in range(a.rounds):
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(model, opt)
            ms[name].append((time.perf_counter() - t0) / a.steps * 1000)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {v[-1]:.0f} ms" for n, v in ms.items()), flush=True)
    med = {n: statistics.median(v) for n, v in ms.items()}
    out = {"batch": B, "history_length": L, "threads": 1, "rounds": a.rounds, "steps_per_round": a.steps,
           "ms_per_step_median": med, "ms_per_step": ms,
           "din_factored_over_plain": med["din"] / med["din_plain"],
           "din_mean_over_none": med["din+mean"] / med["none"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print("\nms per training step (median over rounds), batch 4096, 1 thread:")
    for n, v in med.items():
        print(f"  {n:10s} {v:7.1f}   x{v / med['none']:.2f} of none")
    print(f"din factored / plain: {out['din_factored_over_plain']:.2f}")
    print(f"results -> {a.out}")


if __name__ == "__main__":
    main()
