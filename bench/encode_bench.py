"""Encoder throughput: the Ray Data actor-pool path vs a plain single-process transformers loop,
same texts (ML-1M item + user texts), same model, same batch size and torch threads, same run.
Prints texts/s and writes bench/results/encode.json. Numbers, not assertions.

  python bench/encode_bench.py [--actors 1 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare-dir", type=Path, default=ROOT / "runs/ml1m_swr/prepare")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    from mcl_ray.core.config import EncodeConfig
    from mcl_ray.llm.encode import encode_texts_ray
    from mcl_ray.models.encoder import TextEncoder, resolve_encoder, text_hash
    from mcl_ray.core.ray_env import init_ray

    texts = (pq.read_table(args.prepare_dir / "items.parquet")["text"].to_pylist()
             + pq.read_table(args.prepare_dir / "users.parquet")["text"].to_pylist())
    keys = [str(i) for i in range(len(texts))]
    path = resolve_encoder("all-MiniLM-L6-v2")
    res: dict = {"texts": len(texts), "batch_size": args.batch}

    t0 = time.perf_counter()
    enc = TextEncoder(str(path), torch_threads=1)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(texts), args.batch):
        enc.encode(texts[i:i + args.batch])
    plain = time.perf_counter() - t0
    res["plain"] = {"seconds": plain, "load_seconds": load, "texts_per_s": len(texts) / plain}
    print(f"plain loop, 1 thread: {len(texts) / plain:.0f} texts/s ({plain:.1f} s + {load:.1f} s load)", flush=True)

    init_ray(None, ROOT / "runs")
    for n in args.actors:
        ec = EncodeConfig(batch_size=args.batch, concurrency=n, torch_threads=1)
        t0 = time.perf_counter()
        encode_texts_ray(keys, texts, text_hash(texts), path, ec)
        secs = time.perf_counter() - t0  # includes actor start and model load, like a real stage run
        res[f"ray_{n}_actors"] = {"seconds": secs, "texts_per_s": len(texts) / secs,
                                  "vs_plain": (len(texts) / secs) / res["plain"]["texts_per_s"]}
        print(f"Ray Data, {n} actor(s) x 1 thread: {len(texts) / secs:.0f} texts/s "
              f"({res[f'ray_{n}_actors']['vs_plain']:.2f}x the plain loop; {secs:.1f} s incl. actor start)", flush=True)
    dest = ROOT / "bench/results/encode.json"
    dest.write_text(json.dumps(res, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
