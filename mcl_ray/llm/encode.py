"""The encode stage: embed the text fields named in feature_spec.json with a Ray Data actor pool.

Output per field: <prepare_dir>/embeddings/<field>.parquet (key, text_hash, embedding[float32 x H])
plus <field>.json (encoder, fingerprint, dim, counts), and the path recorded in the feature spec
(`text.<field>.embedding`). Two levels of reuse: the stage marker (embeddings/fingerprint.json)
skips everything when encoder, data and settings are unchanged; below it, a per-text cache by
(encoder fingerprint, text hash) means a changed text is re-encoded alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.feature_spec import Feature, FeatureSpec
from mcl_ray.core.keys import key_array
from mcl_ray.core.ray_env import dataset_in_blocks
from mcl_ray.core.stage import Marker, Stage, fingerprint
from mcl_ray.data.vocab import Vocabularies
from mcl_ray.models.encoder import EncoderError, TextEncoder, check_encoder, encoder_fingerprint, resolve_encoder, \
    text_hash


@dataclass
class EncodeResult:
    fields: dict[str, dict]  # field -> stats (rows, encoded, reused, seconds, texts_per_s, file)
    seconds: float
    cached: bool = False


MAX_AUTO_ACTORS = 8  # encode.concurrency null: more actors than this load the model more often than they gain
# An actor's start (a process importing torch and transformers, then the model) costs about as much
# CPU as encoding 700 to 1,500 short texts (bench/results/encode.json: 1 and 2 actors against the plain loop).
TEXTS_PER_AUTO_ACTOR = 1500


def encoder_actors(ec, texts: int) -> int:
    """encode.concurrency, or (null) as many actors as the cluster's CPUs (GPUs) hold, at most
    MAX_AUTO_ACTORS and one per TEXTS_PER_AUTO_ACTOR texts: encode runs alone, and one actor would
    leave the other cores idle on a large table."""
    if ec.concurrency:
        return ec.concurrency
    import ray

    res = ray.cluster_resources()
    n = res.get("GPU", 0) if ec.use_gpu else res.get("CPU", 1) // ec.torch_threads
    return max(1, min(MAX_AUTO_ACTORS, int(n), texts // TEXTS_PER_AUTO_ACTOR))


def encode_texts_ray(keys: list[str], texts: list[str], hashes: list[str], model_path: Path, ec, bar=None) -> np.ndarray:
    """Ray Data map_batches over an actor pool of TextEncoder; returns embeddings in input order.
    The driver streams the results (bounded memory) and advances `bar` per batch."""
    import ray.data

    table = pa.table({"key": keys, "text": texts, "text_hash": hashes})
    actors = encoder_actors(ec, len(keys))
    ds = dataset_in_blocks(table, min(len(keys) // ec.batch_size, 4 * actors))
    out = ds.map_batches(
        TextEncoder,
        fn_constructor_kwargs={"path": str(model_path), "max_length": ec.max_length,
                               "device": "cuda" if ec.use_gpu else "cpu", "bf16": ec.use_gpu and ec.bf16,
                               "torch_threads": ec.torch_threads},
        batch_size=ec.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0 if ec.use_gpu else ec.torch_threads, num_gpus=1 if ec.use_gpu else 0,
    )
    order = {k: i for i, k in enumerate(keys)}
    emb: np.ndarray | None = None
    for b in out.iter_batches(batch_format="numpy", batch_size=None):
        vecs = np.stack(b["embedding"]) if len(b["key"]) else None
        if vecs is None:
            continue
        if emb is None:
            emb = np.zeros((len(keys), vecs.shape[1]), np.float32)
        emb[[order[k] for k in b["key"]]] = vecs
        if bar is not None:
            bar.update(advance=len(b["key"]))
    return emb if emb is not None else np.zeros((len(keys), 0), np.float32)


class EncodeStage(Stage[EncodeResult]):
    name = "encode"

    def __init__(self, cfg: ExperimentConfig, prepare_dir: Path, force: bool = False, quiet: bool = False):
        super().__init__(cfg, force, quiet)
        self.prepare_dir = Path(prepare_dir)
        self.model_path = resolve_encoder(cfg.encode.model)  # a bad encoder fails first, before any data is read
        self.model_cfg = check_encoder(self.model_path)
        self.spec = FeatureSpec.load(prepare_dir)
        if not self.spec.text:
            raise EncoderError("the feature spec names no text fields (prepare.text is null); nothing to encode")
        # Only the texts the model reads (model.text.fields): user texts can outnumber item texts
        # 10:1, and encoding them for an item-text model is minutes for nothing.
        used = cfg.model.text.fields if cfg.model.text.mode != "off" else list(self.spec.text)
        self.fields = [f for f in self.spec.text if f in used]
        if not self.fields:
            raise EncoderError(f"model.text.fields {used} names no text field of the prepared data "
                               f"(it has {sorted(self.spec.text)})")
        self.encoder_fp = encoder_fingerprint(self.model_path)

    @property
    def marker(self) -> Marker:
        return Marker(self.prepare_dir / "embeddings" / "fingerprint.json")

    def data_fingerprint(self) -> str:
        return self.spec.data_fingerprint

    def fingerprint(self) -> str:
        ec = self.cfg.encode
        return fingerprint(self.encoder_fp, self.spec.data_fingerprint, ec.scope, ec.max_length,
                           sorted(self.fields), files=[self.prepare_dir / self.spec.text[f].table for f in self.fields])

    def load_cached(self) -> EncodeResult:
        if any(self.spec.text[f].embedding is None for f in self.fields):  # spec rewritten by a new prepare
            return self.compute(self.fingerprint())
        out = self.prepare_dir / "embeddings"
        stats = {f: {**json.loads((out / f"{f}.json").read_text()), "encoded": 0} for f in self.fields}
        for s in stats.values():
            s["reused"], s["texts_per_s"] = s["rows"], None
        return EncodeResult(stats, 0.0, cached=True)

    def compute(self, fp: str) -> EncodeResult:
        spec = self.spec
        vocabs = Vocabularies.load(self.prepare_dir, spec)
        out_dir = self.prepare_dir / "embeddings"
        out_dir.mkdir(exist_ok=True)
        stats = {}
        for field in self.fields:
            tf = spec.text[field]
            stats[field] = self._encode_field(field, tf, vocabs, out_dir)
            spec.text[field].embedding = stats[field]["file"]
            # the data contract: one text_embedding feature per encoded field (models/text.py reads it)
            spec.features = [f for f in spec.features if f.name != f"{field}_text"] + [
                Feature(name=f"{field}_text", kind="text_embedding", source="item" if tf.key == "item_id" else "user",
                        dim=stats[field]["dim"])]
        spec.save(self.prepare_dir / "feature_spec.json")
        return EncodeResult(stats, time.perf_counter() - self.t0)

    def _encode_field(self, field: str, tf, vocabs: Vocabularies, out_dir: Path) -> dict:
        ec = self.cfg.encode
        ts = time.perf_counter()
        table = pq.read_table(self.prepare_dir / tf.table, columns=[tf.key, tf.column])
        keys = key_array(table[tf.key]).to_pylist()
        texts = [t or "" for t in table[tf.column].to_pylist()]
        if ec.scope == "vocab" and tf.key in vocabs.values:  # only what a model can look up by id
            known = set(vocabs.values[tf.key])
            keep = [i for i, k in enumerate(keys) if k in known]
            keys, texts = [keys[i] for i in keep], [texts[i] for i in keep]
        hashes = text_hash(texts)
        dest, meta_file = out_dir / f"{field}.parquet", out_dir / f"{field}.json"
        cached: dict[str, tuple[str, np.ndarray]] = {}
        if dest.exists() and meta_file.exists() and not self.force \
                and json.loads(meta_file.read_text())["fingerprint"] == self.encoder_fp:
            old = pq.read_table(dest)
            for k, h, e in zip(old["key"].to_pylist(), old["text_hash"].to_pylist(),
                               old["embedding"].to_numpy(zero_copy_only=False)):
                cached[k] = (h, e)
        dim = self.model_cfg["hidden_size"]
        emb = np.zeros((len(keys), dim), np.float32)
        todo = []
        for i, (k, h) in enumerate(zip(keys, hashes)):
            hit = cached.get(k)
            if hit is not None and hit[0] == h:
                emb[i] = hit[1]
            else:
                todo.append(i)
        with self.progress(f"{field} texts ({len(keys) - len(todo):,} cached)", len(todo), "texts") as bar:
            if todo:
                emb[todo] = encode_texts_ray([keys[i] for i in todo], [texts[i] for i in todo],
                                             [hashes[i] for i in todo], self.model_path, ec, bar)
        tmp = dest.with_suffix(".tmp")
        pq.write_table(pa.table({"key": keys, "text_hash": hashes,
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)}), tmp)
        tmp.replace(dest)
        secs = time.perf_counter() - ts
        st = {"rows": len(keys), "encoded": len(todo), "reused": len(keys) - len(todo), "dim": dim,
              "seconds": secs, "texts_per_s": len(todo) / secs if todo else None,
              "file": str(dest.relative_to(self.prepare_dir))}
        meta_file.write_text(json.dumps({"encoder": ec.model, "path": str(self.model_path),
                                         "fingerprint": self.encoder_fp, **st}, indent=1))
        return st


def encode_stage(cfg: ExperimentConfig, prepare_dir: Path, force: bool = False, quiet: bool = False) -> EncodeResult:
    return EncodeStage(cfg, prepare_dir, force, quiet).run()
