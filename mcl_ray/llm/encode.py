"""The encode stage: embed the text fields named in feature_spec.json with a Ray Data actor pool.

Output per field: <prepare_dir>/embeddings/<field>.parquet (key, text_hash, embedding[float32 x H])
plus <field>.json (encoder, fingerprint, dim, counts), and the path recorded in the feature spec
(`text.<field>.embedding`). Cached by (encoder fingerprint, text hash): an unchanged text is never
encoded twice; a changed one is re-encoded alone; a changed encoder re-encodes everything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mcl_ray.config import ExperimentConfig
from mcl_ray.data.prepare import key_array
from mcl_ray.feature_spec import Feature, FeatureSpec
from mcl_ray.llm.encoder import (EncoderError, TextEncoder, check_encoder, encoder_fingerprint, resolve_encoder,
                                 text_hash)


@dataclass
class EncodeResult:
    fields: dict[str, dict]  # field -> stats (rows, encoded, reused, seconds, texts_per_s, file)
    seconds: float


def encode_texts_ray(keys: list[str], texts: list[str], hashes: list[str], model_path: Path, ec) -> np.ndarray:
    """Ray Data map_batches over an actor pool of TextEncoder; returns embeddings in input order."""
    import ray.data

    from mcl_ray.ray_env import dataset_in_blocks

    table = pa.table({"key": keys, "text": texts, "text_hash": hashes})
    ds = dataset_in_blocks(table, min(len(keys) // ec.batch_size, 4 * ec.concurrency))
    out = ds.map_batches(
        TextEncoder,
        fn_constructor_kwargs={"path": str(model_path), "max_length": ec.max_length,
                               "device": "cuda" if ec.use_gpu else "cpu", "bf16": ec.use_gpu and ec.bf16,
                               "torch_threads": ec.torch_threads},
        batch_size=ec.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=ec.concurrency),
        num_cpus=0 if ec.use_gpu else ec.torch_threads, num_gpus=1 if ec.use_gpu else 0,
    ).to_arrow_refs()
    table = pa.concat_tables(ray.get(out)) if out else None
    order = {k: i for i, k in enumerate(keys)}
    emb = np.zeros((len(keys), 0), np.float32)
    if table is not None and table.num_rows:
        vecs = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
        emb = np.zeros((len(keys), vecs.shape[1]), np.float32)
        emb[[order[k] for k in table["key"].to_pylist()]] = vecs
    return emb


def encode_stage(cfg: ExperimentConfig, prepare_dir: Path, console=None, force: bool = False) -> EncodeResult:
    t0 = time.perf_counter()
    ec = cfg.encode
    spec = FeatureSpec.load(prepare_dir)
    if not spec.text:
        raise EncoderError("the feature spec names no text fields (prepare.text is null); nothing to encode")
    model_path = resolve_encoder(ec.model)
    mcfg = check_encoder(model_path)
    fp = encoder_fingerprint(model_path)
    vocabs = json.loads((prepare_dir / spec.vocabularies).read_text())
    out_dir = prepare_dir / "embeddings"
    out_dir.mkdir(exist_ok=True)
    stats = {}
    for field, tf in spec.text.items():
        ts = time.perf_counter()
        table = pq.read_table(prepare_dir / tf.table, columns=[tf.key, tf.column])
        keys = key_array(table[tf.key]).to_pylist()
        texts = [t or "" for t in table[tf.column].to_pylist()]
        if ec.scope == "vocab" and tf.key in vocabs:  # only what a model can look up by id
            known = set(vocabs[tf.key])
            keep = [i for i, k in enumerate(keys) if k in known]
            keys, texts = [keys[i] for i in keep], [texts[i] for i in keep]
        hashes = text_hash(texts)
        dest = out_dir / f"{field}.parquet"
        meta_file = out_dir / f"{field}.json"
        cached: dict[str, tuple[str, np.ndarray]] = {}
        if dest.exists() and meta_file.exists() and not force and json.loads(meta_file.read_text())["fingerprint"] == fp:
            old = pq.read_table(dest)
            for k, h, e in zip(old["key"].to_pylist(), old["text_hash"].to_pylist(),
                               old["embedding"].to_numpy(zero_copy_only=False)):
                cached[k] = (h, e)
        todo = [i for i, (k, h) in enumerate(zip(keys, hashes)) if cached.get(k, ("",))[0] != h]
        dim = mcfg["hidden_size"]
        emb = np.zeros((len(keys), dim), np.float32)
        for i, k in enumerate(keys):
            hit = cached.get(k)
            if hit is not None and hit[0] == hashes[i]:
                emb[i] = hit[1]
        if todo:
            say(console, f"encode {field}: {len(todo):,} of {len(keys):,} texts to encode with {ec.model} "
                         f"({ec.concurrency} actor(s), batch {ec.batch_size})")
            emb[todo] = encode_texts_ray([keys[i] for i in todo], [texts[i] for i in todo],
                                         [hashes[i] for i in todo], model_path, ec)
        else:
            say(console, f"encode {field}: all {len(keys):,} texts cached for this encoder; nothing to do")
        tmp = dest.with_suffix(".tmp")
        pq.write_table(pa.table({"key": keys, "text_hash": hashes,
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)}),
                       tmp)
        tmp.replace(dest)
        secs = time.perf_counter() - ts
        stats[field] = {"rows": len(keys), "encoded": len(todo), "reused": len(keys) - len(todo), "dim": dim,
                        "seconds": secs, "texts_per_s": len(todo) / secs if todo else None,
                        "file": str(dest.relative_to(prepare_dir))}
        meta_file.write_text(json.dumps({"encoder": ec.model, "path": str(model_path), "fingerprint": fp,
                                         **stats[field]}, indent=1))
        spec.text[field].embedding = stats[field]["file"]
        # the data contract: one text_embedding feature per encoded field (models/text.py reads it)
        spec.features = [f for f in spec.features if f.name != f"{field}_text"] + [
            Feature(name=f"{field}_text", kind="text_embedding", source=field, dim=dim)]
    spec.save(prepare_dir / "feature_spec.json")
    return EncodeResult(stats, time.perf_counter() - t0)


def load_embeddings(prepare_dir: Path, spec: FeatureSpec, field: str) -> tuple[list[str], np.ndarray]:
    tf = spec.text[field]
    if tf.embedding is None:
        raise EncoderError(f"no embeddings for text field {field!r}; run `mcl-ray encode` first")
    t = pq.read_table(Path(prepare_dir) / tf.embedding)
    return t["key"].to_pylist(), np.stack(t["embedding"].to_numpy(zero_copy_only=False))


def say(console, msg: str) -> None:
    if console is not None:
        console.print(msg)
