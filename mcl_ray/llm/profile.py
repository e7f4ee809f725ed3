"""The profile stage: the generator writes a short interest profile per user (KAR / LLMRec user
profiling) from that user's train rows only; the encode stage embeds it as the `profile` text
field, a feature keyed by user_id like the user text.

train split (real rows) -> per user: the last `liked` liked and `disliked` disliked items (title,
genres), most recent first -> prompt (PROFILE_PROMPT_VERSION) -> backend (vllm | transformers, free
text, at most max_new_tokens) -> <prepare_dir>/profile/profiles.parquet (user_id, text,
generated_tokens), stats.json; the feature spec records the field and its generator (provenance).
Cached by fingerprint (data, generator weights, prompt version, settings): unchanged inputs are
never profiled again. Valid and test rows never reach a prompt.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.feature_spec import FeatureSpec, TextField
from mcl_ray.core.keys import key_array
from mcl_ray.core.ray_env import dataset_in_blocks
from mcl_ray.core.stage import fingerprint
from mcl_ray.data.splits import read_split
from mcl_ray.llm.backends import generate_transformers, generate_vllm
from mcl_ray.llm.generator import GeneratorStage, request_blocks
from mcl_ray.llm.prompts import clean
from mcl_ray.models.encoder import encoder_fingerprint

PROFILE_PROMPT_VERSION = "p1"
FIELD = "profile"
TABLE = "profile/profiles.parquet"
SYSTEM = "You summarise a person's movie taste in one short sentence, using only the movies listed."


def profile_messages(liked: list[tuple[str, str]], disliked: list[tuple[str, str]]) -> list[dict]:
    def lines(xs):
        return "\n".join(f"- {clean(t)} ({clean(g, 60)})" for t, g in xs) or "- (none)"

    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Movies the user liked:\n{lines(liked)}\n\nMovies the user disliked:\n"
                                        f"{lines(disliked)}\n\nIn one sentence of at most 25 words, describe which "
                                        "kinds of movies this user likes and which they avoid."}]


def build_profile_requests(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path) -> pd.DataFrame:
    """One row per profiled user: id, user_key, messages_json (from the user's train rows only)."""
    pc_ = cfg.profile
    cols = [spec.user_key, spec.item_key, spec.label_column, spec.timestamp_column, spec.provenance_column]
    train = read_split(prepare_dir, spec, "train", columns=cols).to_pandas()
    train = train[train[spec.provenance_column] == 0]  # real rows: never an earlier augment's guesses
    users = np.array(sorted(train[spec.user_key].unique()), dtype=object)
    if pc_.users is not None and pc_.users < len(users):
        users = np.sort(np.random.default_rng(pc_.seed).choice(users, pc_.users, replace=False))
    train = train[train[spec.user_key].isin(set(users))].sort_values(
        [spec.user_key, spec.timestamp_column, spec.item_key], ascending=[True, False, True])
    items = pq.read_table(prepare_dir / spec.items_table).to_pandas() if spec.items_table else None
    title, genres = {}, {}
    if items is not None:
        keys = key_array(pa.array(items["item_id"])).to_pylist()
        title = dict(zip(keys, items["title"].astype(str) if "title" in items else keys))
        if "genres" in items:
            genres = dict(zip(keys, items["genres"].astype(str).str.replace("|", ", ", regex=False)))
    rows = []
    for n, (user, g) in enumerate(train.groupby(spec.user_key, sort=True)):
        pos = g[g[spec.label_column] > 0][spec.item_key].head(pc_.liked)
        neg = g[g[spec.label_column] <= 0][spec.item_key].head(pc_.disliked)
        msgs = profile_messages([(title.get(k, k), genres.get(k, "")) for k in pos],
                                [(title.get(k, k), genres.get(k, "")) for k in neg])
        rows.append({"id": n, "user_key": user, "n_candidates": 0,
                     "messages_json": json.dumps(msgs, ensure_ascii=False)})
    return pd.DataFrame(rows, columns=["id", "user_key", "n_candidates", "messages_json"])


@dataclass
class ProfileResult:
    stats: dict
    table: Path
    cached: bool


class ProfileStage(GeneratorStage[ProfileResult]):
    name = "profile"
    section = "profile"

    def fingerprint(self) -> str:
        blob = self.cfg.profile.model_dump(mode="json")
        for k in ("batch_size", "concurrency", "torch_threads", "use_gpu", "max_model_len"):
            blob.pop(k)  # scheduling, not what is written
        blob.update(data=self.spec.data_fingerprint, model=encoder_fingerprint(self.model_path),
                    prompt=PROFILE_PROMPT_VERSION, backend=self.backend)
        return fingerprint(blob)

    def load_cached(self) -> ProfileResult:
        stats = json.loads((self.out / "stats.json").read_text())
        self._register(stats["generator"])  # a spec rewritten since (same data) gets the field back
        return ProfileResult(stats, self.prepare_dir / TABLE, True)

    def compute(self, fp: str) -> ProfileResult:
        pc_ = self.cfg.profile
        requests = build_profile_requests(self.cfg, self.spec, self.prepare_dir)
        self.say(f"profile: {len(requests):,} users -> {self.backend} with {pc_.model} (at most {pc_.max_new_tokens} "
                 f"tokens each, batch {pc_.batch_size})")
        t0 = time.perf_counter()
        table = pa.Table.from_pandas(requests[["id", "messages_json", "n_candidates"]], preserve_index=False)
        ds = dataset_in_blocks(table, request_blocks(len(requests), pc_.batch_size))
        gen = generate_vllm if self.backend == "vllm" else generate_transformers
        out = gen(ds, str(self.model_path), pc_, max_new_tokens=pc_.max_new_tokens)
        parts = []
        with self.progress("users profiled", len(requests), "users") as bar:
            for b in out.select_columns(["id", "answer", "generated_tokens"]).iter_batches(batch_format="pandas",
                                                                                          batch_size=None):
                parts.append(b)
                bar.update(advance=len(b))
        seconds = time.perf_counter() - t0
        answers = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
            {"id": [], "answer": [], "generated_tokens": []})
        got = requests.merge(answers, on="id", how="left")
        texts = [clean(a, 400) if isinstance(a, str) else "" for a in got["answer"]]
        empty = sum(1 for t in texts if not t)
        self.out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"user_id": got["user_key"].astype(str).tolist(), "text": texts,
                                 "generated_tokens": got["generated_tokens"].fillna(0).astype(np.int64).tolist()}),
                       self.prepare_dir / TABLE)
        generator = {"model": pc_.model, "backend": self.backend, "prompt_version": PROFILE_PROMPT_VERSION,
                     "max_new_tokens": pc_.max_new_tokens, "temperature": pc_.temperature, "seed": pc_.seed,
                     "fingerprint": fp}
        tokens = int(got["generated_tokens"].fillna(0).sum())
        stats = {"users": len(requests), "empty": empty, "seconds": seconds,
                 "users_per_s": len(requests) / seconds if seconds else None, "generated_tokens": tokens,
                 "tokens_per_s": tokens / seconds if seconds else None, "generator": generator,
                 "examples": [{"user_id": u, "profile": t} for u, t in list(zip(got["user_key"], texts))[:5]]}
        (self.out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
        self._register(generator)
        return ProfileResult(stats, self.prepare_dir / TABLE, False)

    def _register(self, generator: dict) -> None:
        """The profile text field in the feature spec, with its provenance."""
        spec = FeatureSpec.load(self.prepare_dir)
        old = spec.text.get(FIELD)
        if old is not None and old.generator == generator:
            return
        spec.text[FIELD] = TextField(key="user_id", table=TABLE, template=f"(written by {generator['model']}, "
                                     f"prompt {PROFILE_PROMPT_VERSION})", generator=generator)
        spec.features = [f for f in spec.features if f.name != f"{FIELD}_text"]  # old embeddings: encode again
        spec.save(self.prepare_dir / "feature_spec.json")
        self.spec = spec


def profile_stage(cfg: ExperimentConfig, prepare_dir: Path, force: bool = False, quiet: bool = False) -> ProfileResult:
    return ProfileStage(cfg, prepare_dir, force, quiet).run()
