"""The serving core, without Ray Serve: an artifact loaded for scoring.

`Recommender` keeps the item feature matrix, user features, titles and known interactions in
memory and scores every candidate item for one or many requests in one vectorised forward pass.
Bad input raises `RequestError` with an HTTP status (the Serve app maps it to a 4xx).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from mcl_ray.artifact import Artifact, load_model, open_artifact
from mcl_ray.data.vocab import Vocabularies, encode_entities
from mcl_ray.models.batch import Batch
from mcl_ray.models.blocks import InputLayer


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Query:
    """One recommend/score request after validation against the API schema."""

    user_id: str
    scenario: str
    k: int = 10
    exclude_seen: bool = True
    diversity: float = 0.0
    profile: dict | None = None
    context: dict | None = None
    item_ids: list[str] | None = None  # score: the candidates


class Recommender:
    def __init__(self, artifact: str | Artifact, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.art = art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        spec = art.spec
        self.spec = spec
        self.model = load_model(art)
        self.version = art.manifest["version"]
        self.vocabs = Vocabularies.load(art.path, spec)
        self.cat_names = [f.name for f in spec.categorical]
        self.sources = {f.name: f.source for f in spec.categorical}
        if spec.numeric:  # numeric features need per-item values the artifact does not carry yet
            raise ValueError("serving supports categorical and text features only in this version")
        # text features need nothing here: the model looks them up by user/item id (tables in its weights)
        self.context_names = [n for n in self.cat_names if self.sources[n] == "context"]

        items = pq.read_table(art.file(spec.items_table))
        keys, item_cols = encode_entities(items, "item_id", spec, self.vocabs, "item")
        keep = item_cols["item_id"] > 0  # candidates: items the model has an id for
        self.item_keys = [k for k, m in zip(keys, keep) if m]
        self.item_pos = {k: i for i, k in enumerate(self.item_keys)}
        self.titles = (items["title"].to_pylist() if "title" in items.column_names else self.item_keys)
        self.titles = [t for t, m in zip(self.titles, keep) if m]
        self.item_cols = {n: v[keep] for n, v in item_cols.items()}

        users = pq.read_table(art.file(spec.users_table))
        user_keys, self.user_cols = encode_entities(users, "user_id", spec, self.vocabs, "user")
        self.user_row = {k: i for i, k in enumerate(user_keys)}
        self.profile_fields = [n for n in self.user_cols if n != "user_id"]

        seen = pq.read_table(art.file("seen.parquet"))
        u, it = seen[spec.user_key].to_pylist(), seen[spec.item_key].to_pylist()
        acc: dict[str, list[int]] = {}
        for a, b in zip(u, it):
            if b in self.item_pos:
                acc.setdefault(a, []).append(self.item_pos[b])
        self.seen: dict[str, np.ndarray] = {a: np.unique(np.array(v, np.int64)) for a, v in acc.items()}
        self.item_vecs = self._item_vectors()
        self.scenarios = spec.scenario_names

    def _item_vectors(self) -> torch.Tensor:
        """Item representations for MMR diversity: the model's embeddings of the item-side features."""
        inp = next((m for m in self.model.modules() if isinstance(m, InputLayer)), None)
        if inp is None:  # llm_ranker has no id embeddings: MMR sees every item as unlike every other
            return torch.eye(len(self.item_keys))
        with torch.no_grad():
            parts = [inp.embeddings[inp.cat_names.index(n)](torch.from_numpy(v)) for n, v in self.item_cols.items()]
        vec = torch.cat(parts, 1) if parts else torch.eye(len(self.item_keys))
        return torch.nn.functional.normalize(vec, dim=1)

    # ------------------------------------------------------------------ validation

    def info(self) -> dict:
        return {"version": self.version, "backbone": self.art.cfg.model.backbone,
                "scenarios": self.scenarios, "items": len(self.item_keys), "users": len(self.user_row),
                "features": [{"name": f.name, "kind": f.kind, "source": f.source} for f in self.spec.features],
                "profile_fields": self.profile_fields, "context_fields": self.context_names,
                "metrics": self.art.metrics, "created": self.art.manifest.get("created"),
                "data_fingerprint": self.art.manifest.get("data_fingerprint")}

    def _user_features(self, q: Query) -> dict[str, int]:
        if q.scenario not in self.scenarios:
            raise RequestError(422, f"unknown scenario {q.scenario!r}; this model serves {self.scenarios}")
        feats: dict[str, int] = {}
        row = self.user_row.get(q.user_id)
        if row is not None:
            feats = {n: int(v[row]) for n, v in self.user_cols.items()}
        elif q.profile is None:
            raise RequestError(404, f"unknown user {q.user_id!r}; send `profile` ({', '.join(self.profile_fields)}) "
                                    "for a cold-start answer")
        else:
            feats = {n: 0 for n in self.user_cols}  # cold start: user_id is OOV
        if q.profile:
            bad = sorted(set(q.profile) - set(self.profile_fields))
            if bad:
                raise RequestError(422, f"unknown profile field(s) {bad}; allowed: {self.profile_fields}")
            for n, v in q.profile.items():
                feats[n] = self.vocabs.id(n, v)  # an unseen value is the OOV id, like in training
        if q.context:
            bad = sorted(set(q.context) - set(self.context_names))
            if bad:
                raise RequestError(422, f"unknown context field(s) {bad}; this model uses {self.context_names or 'none'}")
            for n, v in q.context.items():
                feats[n] = self.vocabs.id(n, v)
        return feats

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _scores(self, qs: list[Query], feats: list[dict[str, int]], idx: list[np.ndarray]) -> list[torch.Tensor]:
        """One forward pass over all (request, candidate) pairs of the batch."""
        batch = Batch.candidates(self.cat_names, len(self.spec.numeric), self.item_cols,
                                 [(f, ii, self.scenarios.index(q.scenario)) for q, f, ii in zip(qs, feats, idx)])
        p = torch.sigmoid(self.model(batch).float())
        return list(torch.split(p, [len(i) for i in idx]))

    def recommend_many(self, qs: list[Query]) -> list[dict | RequestError]:
        """Top-k per request; a bad request yields its RequestError without failing the others."""
        out: list = [None] * len(qs)
        ok, feats = [], []
        for i, q in enumerate(qs):
            try:
                feats.append(self._user_features(q))
                ok.append(i)
            except RequestError as e:
                out[i] = e
        all_items = np.arange(len(self.item_keys))
        if ok:
            scores = self._scores([qs[i] for i in ok], feats, [all_items] * len(ok))
            for i, s in zip(ok, scores):
                out[i] = self._top_k(qs[i], s.clone())
        return out

    def _top_k(self, q: Query, s: torch.Tensor) -> dict:
        removed = 0
        if q.exclude_seen and q.user_id in self.seen:
            seen = torch.from_numpy(self.seen[q.user_id])
            s[seen] = -1.0
            removed = len(seen)
        k = min(q.k, len(self.item_keys) - removed)
        if q.diversity > 0:
            chosen = self._mmr(s, k, q.diversity)
        else:
            chosen = torch.topk(s, k).indices.tolist()
        items = [{"item_id": self.item_keys[i], "title": self.titles[i], "score": round(float(s[i]), 6)}
                 for i in chosen]
        return {"user_id": q.user_id, "scenario": q.scenario, "items": items, "model_version": self.version,
                "excluded_seen": removed, "cold_start": q.user_id not in self.user_row}

    def _mmr(self, s: torch.Tensor, k: int, diversity: float) -> list[int]:
        """Maximal marginal relevance: argmax (1-d)*score - d*max cosine similarity to the chosen."""
        pool = torch.topk(s, min(len(s), max(20 * k, 200))).indices  # candidates worth re-ranking
        rel, vec = s[pool], self.item_vecs[pool]
        sim_max = torch.full((len(pool),), -1.0)
        taken = torch.zeros(len(pool), dtype=torch.bool)
        chosen = []
        for _ in range(k):
            gain = (1 - diversity) * rel - diversity * sim_max.clamp(min=0)
            gain[taken] = -torch.inf
            j = int(torch.argmax(gain))
            taken[j] = True
            chosen.append(int(pool[j]))
            sim_max = torch.maximum(sim_max, vec @ vec[j])
        return chosen

    def score(self, q: Query) -> dict:
        f = self._user_features(q)
        missing = [i for i in q.item_ids if i not in self.item_pos]
        if missing:
            raise RequestError(404, f"{len(missing)} unknown item id(s), e.g. {missing[:3]}")
        idx = np.array([self.item_pos[i] for i in q.item_ids], np.int64)
        s = self._scores([q], [f], [idx])[0]
        return {"user_id": q.user_id, "scenario": q.scenario, "model_version": self.version,
                "scores": [{"item_id": i, "score": round(float(v), 6)} for i, v in zip(q.item_ids, s)]}
