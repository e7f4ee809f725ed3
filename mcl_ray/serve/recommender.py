"""The serving core, without Ray Serve: an artifact loaded for scoring.

`Recommender` holds the candidates (`ItemCatalog`: encoded item features, titles, MMR vectors) and
the known users (`KnownUsers`: encoded user features, seen items) in memory. With a retrieval model
in the artifact (`Retriever`), a request's user tower vector fetches the N nearest items from the
item index and the ranking model scores those N; without one it scores the whole catalogue. Either
way one vectorised forward pass serves a batch of requests (features encoded as in evaluation:
data.vocab + models.batch.Batch.candidates); serve.ranking turns scores into lists, and every
answer says which stages ran and how long each took.
Bad input raises `RequestError` with an HTTP status (the Serve app maps it to a 4xx).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mcl_ray.artifact import HISTORY, ITEM_KEYS, RETRIEVAL, Artifact, ArtifactError, load_model, open_artifact
from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.data.history import ItemRaters, UserHistory
from mcl_ray.data.vocab import Vocabularies, encode_entities, entity_table, zscore
from mcl_ray.models.batch import Batch
from mcl_ray.models.blocks import InputLayer
from mcl_ray.models.item_index import INDEX, ItemIndex
from mcl_ray.models.weights import MODEL, load_trained
from mcl_ray.serve.ranking import exclude, mmr, top_k


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
    candidates: int | None = None  # recommend: retrieve at most this many (None: the artifact's N)
    as_of: int | None = None  # history models: the behaviour history as of this time (None: all of it)


class ItemCatalog:
    """The candidates: items the model has an id for, their encoded item-side features, titles and
    the vectors MMR compares (the model's own embeddings of those features)."""

    def __init__(self, items: pa.Table, spec: FeatureSpec, vocabs: Vocabularies, model: torch.nn.Module):
        keys, cols = encode_entities(items, "item_id", spec, vocabs, "item")
        keep = cols["item_id"] > 0
        self.keys = [k for k, m in zip(keys, keep) if m]
        self.pos = {k: i for i, k in enumerate(self.keys)}
        titles = items["title"].to_pylist() if "title" in items.column_names else keys
        self.titles = [t for t, m in zip(titles, keep) if m]
        self.cols = {n: v[keep] for n, v in cols.items()}  # feature -> ids [I]
        self.vecs = self._vectors(model)  # [I, E]

    def __len__(self) -> int:
        return len(self.keys)

    def _vectors(self, model: torch.nn.Module) -> torch.Tensor:
        inp = next((m for m in model.modules() if isinstance(m, InputLayer)), None)
        cat = {n: v for n, v in self.cols.items() if inp is not None and n in inp.cat_names}
        if not cat:  # llm_ranker has no id embeddings: every item unlike every other
            return torch.eye(len(self.keys))
        with torch.no_grad():
            parts = [inp.embeddings[inp.cat_names.index(n)](torch.from_numpy(v)) for n, v in cat.items()]
        return torch.nn.functional.normalize(torch.cat(parts, 1), dim=1)


class KnownUsers:
    """Users of the training data: their encoded user-side features and the candidate positions
    they already interacted with (for exclude_seen)."""

    def __init__(self, users: pa.Table, seen: pa.Table, spec: FeatureSpec, vocabs: Vocabularies,
                 catalog: ItemCatalog):
        keys, self.cols = encode_entities(users, "user_id", spec, vocabs, "user")
        self.row = {k: i for i, k in enumerate(keys)}
        self.profile_fields = [f.name for f in spec.features
                               if f.source == "user" and f.kind in ("categorical", "numeric") and f.name != "user_id"]
        acc: dict[str, list[int]] = {}
        for a, b in zip(seen[spec.user_key].to_pylist(), seen[spec.item_key].to_pylist()):
            if b in catalog.pos:
                acc.setdefault(a, []).append(catalog.pos[b])
        self.seen = {a: np.unique(np.array(v, np.int64)) for a, v in acc.items()}

    def features(self, user_id: str) -> dict[str, float] | None:
        row = self.row.get(user_id)
        return None if row is None else {n: v[row] for n, v in self.cols.items()}


class Retriever:
    """Stage one: a request's user-tower vector -> the N nearest items of the index, as catalogue
    positions (the index was built at export over the same catalogue; keys map it back)."""

    def __init__(self, art: Artifact, catalog: ItemCatalog, threads: int):
        folder = art.file(RETRIEVAL)
        cfg = ExperimentConfig.model_validate_json((folder / "config.json").read_text())
        self.model = load_trained(art.spec, cfg.model, folder / MODEL)
        self.index = ItemIndex.load(folder / INDEX, threads=threads)
        keys = pq.read_table(folder / ITEM_KEYS)["item_key"].to_pylist()
        self.to_catalog = np.array([catalog.pos.get(k, -1) for k in keys], np.int64)
        self.n = art.cfg.retrieval.candidates
        self.cat = [f.name for f in art.spec.categorical]
        self.num = [f.name for f in art.spec.numeric]

    @torch.no_grad()
    def candidates(self, feats: list[dict[str, float]], scenarios: list[int], ns: list[int],
                   drop: list[np.ndarray | None]) -> tuple[list[np.ndarray], list[int]]:
        """Catalogue positions of each request's n nearest items, best first, leaving out the positions
        in `drop` (seen items: the index is asked for n + their number, so n remain), and how many
        dropped items the index returned."""
        # one row per request: user-side features from the request, the item side OOV (the user tower ignores it)
        batch = Batch.candidates(self.cat, self.num, {}, [(f, np.zeros(1, np.int64), s) for f, s in zip(feats, scenarios)])
        _, pos = self.index.search(self.model.user_vectors(batch).numpy(),
                                   max(n + (len(d) if d is not None else 0) for n, d in zip(ns, drop)))
        out, removed = [], []
        for row, n, d in zip(pos, ns, drop):
            cat = self.to_catalog[row[row >= 0]]  # HNSW may return fewer than asked (-1)
            cat = cat[cat >= 0]
            gone = np.isin(cat, d) if d is not None else np.zeros(len(cat), bool)
            out.append(cat[~gone][:n])
            removed.append(int(gone.sum()))
        return out, removed


class Recommender:
    """An artifact loaded for serving: request features -> one batched forward pass over the
    candidates -> exclude seen -> top-k or MMR."""

    def __init__(self, artifact: str | Artifact, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.art = art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
        self.spec = spec = art.spec
        self.model = load_model(art)
        self.version = art.manifest["version"]
        self.scenarios = spec.scenario_names  # in index order; a held-out one is known but not served
        self.untrained = [n for n in art.cfg.train.holdout_scenarios if n in self.scenarios]
        self.vocabs = Vocabularies.load(art.path, spec)
        # text features need nothing here: the model looks them up by user/item id (tables in its weights)
        # what a request may send in `context`: interaction-level and context features (omitted: the
        # training default, OOV for categorical, the train mean for numeric)
        self.feature = {f.name: f for f in spec.features}
        self.context_names = [f.name for f in spec.features if f.source in ("context", "interaction")
                              and f.kind in ("categorical", "numeric")]
        if not spec.items_table and "item_id" not in self.vocabs.values and "item_id" not in self.vocabs.hashed:
            raise ArtifactError(f"{art.path}: no items table and no item_id feature, so no candidates to serve")
        seen = pq.read_table(art.file("seen.parquet"))
        self.items = ItemCatalog(self._table(spec.items_table, "item_id", seen[spec.item_key]), spec, self.vocabs,
                                 self.model)
        self.users = KnownUsers(self._table(spec.users_table, "user_id", seen[spec.user_key]), seen, spec,
                                self.vocabs, self.items)
        self.retriever = (Retriever(art, self.items, torch_threads) if (art.file(RETRIEVAL) / INDEX).exists()
                          else None)
        # behaviour history (prepare.history): each user's train rows, in memory like the known users
        rows = pq.read_table(art.file(HISTORY)) if spec.sequence else None
        self.history = UserHistory(rows, spec) if spec.sequence else None
        # item-side behaviour (prepare.history.raters): each item's raters, from the same train rows
        self.raters = ItemRaters(rows, spec) if spec.raters else None

    def user_history(self, qs: list[Query]) -> list[np.ndarray] | None:
        """Each request's behaviour history [3, L] (empty for a cold-start user), or None without history."""
        if self.history is None:
            return None
        return [self.history.of(q.user_id, q.as_of) for q in qs]

    def item_raters(self, qs: list[Query], idx: list[np.ndarray]) -> np.ndarray | None:
        """Every (request, candidate) pair's item raters [n, 2, K] in candidate order, or None without them."""
        if self.raters is None:
            return None
        items = self.items.cols[self.spec.sequence[0].ids_of]
        return np.concatenate([self.raters.of(items[ii], q.as_of) for q, ii in zip(qs, idx)])

    def _table(self, name: str | None, key: str, seen_keys) -> pa.Table:
        """The users/items table; without one (interactions only), every id the model knows."""
        return entity_table(pq.read_table(self.art.file(name)) if name else None, key, self.vocabs, seen_keys)

    def _value(self, field: str, value, where: str) -> float:
        """A request value -> the model's input: a categorical id (unseen: OOV) or a z-score."""
        f = self.feature[field]
        if f.kind == "categorical":
            return self.vocabs.id(field, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RequestError(422, f"{where}.{field} must be a number (got {value!r})") from None
        return float(zscore(f, [value])[0])

    # ------------------------------------------------------------------ validation

    def info(self) -> dict:
        return {"version": self.version, "backbone": self.art.cfg.model.backbone,
                "scenarios": [n for n in self.scenarios if n not in self.untrained],
                "untrained_scenarios": self.untrained, "items": len(self.items), "users": len(self.users.row),
                # two-stage (an index of the retrieval model's item vectors) or the whole catalogue ranked
                "retrieval": ({"index": self.retriever.index.kind, "candidates": self.retriever.n}
                              if self.retriever is not None else None),
                "features": [{"name": f.name, "kind": f.kind, "source": f.source} for f in self.spec.features],
                "profile_fields": self.users.profile_fields, "context_fields": self.context_names,
                # what a request may send, and what an omitted field becomes
                "request_fields": {where: {n: {"kind": self.feature[n].kind,
                                               "when_omitted": "OOV id" if self.feature[n].kind == "categorical"
                                               else f"train mean {self.feature[n].mean:.4g}"} for n in names}
                                   for where, names in (("profile", self.users.profile_fields),
                                                        ("context", self.context_names))},
                "metrics": self.art.metrics, "created": self.art.manifest.get("created"),
                "data_fingerprint": self.art.manifest.get("data_fingerprint")}

    def _user_features(self, q: Query) -> dict[str, float]:
        if q.scenario not in self.scenarios:
            raise RequestError(422, f"unknown scenario {q.scenario!r}; this model serves {self.scenarios}")
        if q.scenario in self.untrained:
            raise RequestError(422, f"scenario {q.scenario!r} was held out of training (train.holdout_scenarios) "
                                    f"and has not been adapted: add it with `mcl-ray adapt RUN_DIR --scenario "
                                    f"{q.scenario}` and serve that artifact")
        feats = self.users.features(q.user_id)
        if feats is None:
            if q.profile is None:
                raise RequestError(404, f"unknown user {q.user_id!r}; send `profile` "
                                        f"({', '.join(self.users.profile_fields)}) for a cold-start answer")
            feats = {n: 0 for n in self.users.cols}  # cold start: user_id is OOV
        if q.profile:
            bad = sorted(set(q.profile) - set(self.users.profile_fields))
            if bad:
                raise RequestError(422, f"unknown profile field(s) {bad}; allowed: {self.users.profile_fields}")
            for n, v in q.profile.items():
                feats[n] = self._value(n, v, "profile")  # an unseen value is the OOV id, like in training
        if q.context:
            bad = sorted(set(q.context) - set(self.context_names))
            if bad:
                raise RequestError(422, f"unknown context field(s) {bad}; this model uses {self.context_names or 'none'}")
            for n, v in q.context.items():
                feats[n] = self._value(n, v, "context")
        return feats

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _scores(self, qs: list[Query], feats: list[dict[str, float]], idx: list[np.ndarray]) -> list[torch.Tensor]:
        """One forward pass over all (request, candidate) pairs of the batch."""
        batch = Batch.candidates([f.name for f in self.spec.categorical], [f.name for f in self.spec.numeric],
                                 self.items.cols,
                                 [(f, ii, self.scenarios.index(q.scenario)) for q, f, ii in zip(qs, feats, idx)],
                                 history=self.user_history(qs), raters=self.item_raters(qs, idx))
        p = torch.sigmoid(self.model(batch).float())
        return list(torch.split(p, [len(i) for i in idx]))

    def recommend_many(self, qs: list[Query]) -> list[dict | RequestError]:
        """Top-k per request; a bad request yields its RequestError without failing the others.
        retrieve (two-stage artifacts) -> rank the candidates -> exclude seen -> top-k or MMR."""
        out: list = [None] * len(qs)
        ok, feats = [], []
        for i, q in enumerate(qs):
            try:
                feats.append(self._user_features(q))
                ok.append(i)
            except RequestError as e:
                out[i] = e
        if not ok:
            return out
        t0 = time.perf_counter()
        scen = [self.scenarios.index(qs[i].scenario) for i in ok]
        if self.retriever is not None:
            ns = [min(qs[i].candidates or self.retriever.n, self.retriever.n) for i in ok]
            drop = [self.users.seen.get(qs[i].user_id) if qs[i].exclude_seen else None for i in ok]
            cands, removed = self.retriever.candidates(feats, scen, ns, drop)
        else:
            cands, removed = [np.arange(len(self.items))] * len(ok), None
        t1 = time.perf_counter()
        scores = self._scores([qs[i] for i in ok], feats, cands)
        t2 = time.perf_counter()
        for j, (i, s, c) in enumerate(zip(ok, scores, cands)):
            if removed is None:
                out[i] = self._select(qs[i], s.clone())
            else:  # seen items were left out at retrieval: nothing left to exclude
                out[i] = self._select(qs[i], s.clone(), c, removed[j])
        t3 = time.perf_counter()
        stages = {"retrieve": round((t1 - t0) * 1000, 3), "rank": round((t2 - t1) * 1000, 3),
                  "select": round((t3 - t2) * 1000, 3)}
        if self.retriever is None:
            del stages["retrieve"]
        for i, c in zip(ok, cands):  # the stages ran once for the whole batch
            out[i].update(retrieval="index" if self.retriever is not None else "full_catalogue",
                          candidates=len(c), timings_ms=stages)
        return out

    def _select(self, q: Query, s: torch.Tensor, cand: np.ndarray | None = None, seen_dropped: int = 0) -> dict:
        """Scores s of the candidates -> top-k or MMR. cand None: s covers the whole catalogue in
        order, and seen items are excluded here; else s covers the catalogue positions `cand`, from
        which retrieval already dropped `seen_dropped` seen items."""
        if cand is None:
            removed = exclude(s, self.users.seen.get(q.user_id) if q.exclude_seen else None)
            vecs = self.items.vecs
        else:
            removed = seen_dropped
            vecs = self.items.vecs[torch.from_numpy(cand)]
        k = min(q.k, len(s) - (removed if cand is None else 0))
        chosen = mmr(s, vecs, k, q.diversity) if q.diversity > 0 else top_k(s, k)
        pos = chosen if cand is None else cand[chosen].tolist()
        items = [{"item_id": self.items.keys[p], "title": self.items.titles[p], "score": round(float(s[j]), 6)}
                 for j, p in zip(chosen, pos)]
        return {"user_id": q.user_id, "scenario": q.scenario, "items": items, "model_version": self.version,
                "excluded_seen": removed, "cold_start": q.user_id not in self.users.row}

    def score(self, q: Query) -> dict:
        f = self._user_features(q)
        missing = [i for i in q.item_ids if i not in self.items.pos]
        if missing:
            raise RequestError(404, f"{len(missing)} unknown item id(s), e.g. {missing[:3]}")
        idx = np.array([self.items.pos[i] for i in q.item_ids], np.int64)
        s = self._scores([q], [f], [idx])[0]
        return {"user_id": q.user_id, "scenario": q.scenario, "model_version": self.version,
                "scores": [{"item_id": i, "score": round(float(v), 6)} for i, v in zip(q.item_ids, s)]}
