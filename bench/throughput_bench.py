"""Training throughput on ML-1M (SWR features, shared_bottom, batch 4096, 1 thread per process).

  python bench/throughput_bench.py [--epochs 2] [--backbone shared_bottom]

Measured in one run, side by side:
  hand    a hand-written single-process PyTorch loop over the same tensors (no Ray)
  ray1    the Ray Train path, 1 worker          ray2    the Ray Train path, 2 DDP workers (gloo)
  the per-batch conversion cost of Ray Data's iter_torch_batches vs the in-memory slicing used by
  the training loop, next to the cost of one optimisation step.
Steady-state samples/s come from the epochs' training time; the fixed start-up cost (cluster
already up: worker group, dataset split, tensor load, validation + checkpoint per epoch) is reported
separately. Results: bench/results/throughput.json. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def hand_loop(cfg, spec, pdir, epochs: int) -> dict:
    import torch.nn.functional as F

    from mcl_ray.models.backbones import build_model
    from mcl_ray.models.batch import load_split

    torch.set_num_threads(1)
    data = load_split(pdir, spec, "train")
    torch.manual_seed(0)
    model = build_model(spec, cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    n, bs, rates = len(data), cfg.train.batch_size, []
    for ep in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            b = data.take(perm[i:i + bs])
            loss = F.binary_cross_entropy_with_logits(model(b), b.label)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": statistics.median(rates), "epochs": epochs}


def conversion_cost(cfg, spec, pdir, batches: int = 30) -> dict:
    """ms per 4096-row batch: Ray Data iter_torch_batches vs slicing preloaded tensors."""
    import ray

    from mcl_ray.data.splits import model_columns
    from mcl_ray.models.batch import load_split

    ds = ray.data.read_parquet(str(pdir / spec.splits["train"])).select_columns(model_columns(spec)).materialize()
    it = ds.iter_torch_batches(batch_size=4096)
    next(iter(it))
    t0 = time.perf_counter()
    for i, _ in enumerate(ds.iter_torch_batches(batch_size=4096)):
        if i + 1 >= batches:
            break
    ray_ms = (time.perf_counter() - t0) / batches * 1000
    data = load_split(pdir, spec, "train")
    perm = torch.randperm(len(data))
    t0 = time.perf_counter()
    for i in range(batches):
        data.take(perm[i * 4096:(i + 1) * 4096])
    slice_ms = (time.perf_counter() - t0) / batches * 1000
    return {"iter_torch_batches_ms": ray_ms, "tensor_slice_ms": slice_ms}


def ray_path(cfg, pdir, run_dir: Path, workers: int, epochs: int) -> dict:
    from mcl_ray.train.trainer import train_one

    c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers, "epochs": epochs})})
    t0 = time.perf_counter()
    res = train_one(c, pdir, run_dir / f"w{workers}", seed=1, force=True, evaluate=False)
    wall = time.perf_counter() - t0
    train_s = sum(h["epoch_seconds"] for h in res.history)
    return {"samples_per_s": statistics.median(h["samples_per_s"] for h in res.history), "wall_s": wall,
            "fixed_overhead_s": wall - train_s, "epochs": len(res.history)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--backbone", default="shared_bottom")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_throughput"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/throughput.json"))
    a = ap.parse_args()
    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare
    from mcl_ray.core.ray_env import init_ray

    cfg = load_config(ROOT / "experiments/ml1m_swr.yaml",
                      [f"run_dir={a.run_dir}", f"model.backbone={a.backbone}", "train.torch_threads=1",
                       "evaluate.ranking_users=0",
                       # the SWR id features only: text features need the encode stage and
                       # measure the encoder, not the training path this bench is about
                       "model.text.mode=off"])
    t0 = time.perf_counter()
    init_ray(cfg.ray)
    ray_init_s = time.perf_counter() - t0
    res = prepare(cfg)
    pdir, spec = res.out_dir, res.spec
    out = {"backbone": a.backbone, "batch_size": cfg.train.batch_size, "ray_init_s": ray_init_s}
    out["hand"] = hand_loop(cfg, spec, pdir, a.epochs)
    print(f"hand-written loop: {out['hand']['samples_per_s']:,.0f} samples/s", flush=True)
    out["ray1"] = ray_path(cfg, pdir, Path(a.run_dir), 1, a.epochs)
    print(f"Ray Train 1 worker: {out['ray1']['samples_per_s']:,.0f} samples/s", flush=True)
    out["ray2"] = ray_path(cfg, pdir, Path(a.run_dir), 2, a.epochs)
    print(f"Ray Train 2 workers: {out['ray2']['samples_per_s']:,.0f} samples/s", flush=True)
    out["conversion"] = conversion_cost(cfg, spec, pdir)
    step_ms = cfg.train.batch_size / out["hand"]["samples_per_s"] * 1000
    out["conversion"]["train_step_ms"] = step_ms
    out["ratio_ray1_vs_hand"] = out["ray1"]["samples_per_s"] / out["hand"]["samples_per_s"]
    out["ratio_ray2_vs_ray1"] = out["ray2"]["samples_per_s"] / out["ray1"]["samples_per_s"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    c = out["conversion"]
    print(f"""
throughput ({a.backbone}, batch {cfg.train.batch_size}, 1 thread per process, median of {a.epochs} epochs)
  hand-written loop        {out['hand']['samples_per_s']:>10,.0f} samples/s
  Ray Train, 1 worker      {out['ray1']['samples_per_s']:>10,.0f} samples/s   ratio {out['ratio_ray1_vs_hand']:.2f}x
  Ray Train, 2 workers     {out['ray2']['samples_per_s']:>10,.0f} samples/s   ratio vs 1 worker {out['ratio_ray2_vs_ray1']:.2f}x
  fixed start-up cost      1 worker {out['ray1']['fixed_overhead_s']:.1f}s, 2 workers {out['ray2']['fixed_overhead_s']:.1f}s \
(+ ray.init {ray_init_s:.1f}s once)
  per-batch conversion     iter_torch_batches {c['iter_torch_batches_ms']:.1f} ms vs tensor slice \
{c['tensor_slice_ms']:.2f} ms (a training step: {c['train_step_ms']:.1f} ms)
results -> {a.out}""")


if __name__ == "__main__":
    main()
