"""Why did the model give this user this score for this item in this scenario?

- **Attributions**: integrated gradients (captum's LayerIntegratedGradients) of the ranking logit
  with respect to the model's input layer, summed per feature field. The baseline is the row with
  every categorical feature OOV (id 0) and every numeric feature at its train mean (z-score 0), in
  the same scenario: attributions add up to logit(row) - logit(baseline) (completeness), up to the
  integration error that `convergence_delta` reports.
- **Evidence**: the user's train-history items most similar to the explained item, by cosine of
  the model's own item embeddings (the vectors MMR uses), from the artifact's history.parquet.

The facts are plain data; mcl_ray.llm.explain turns them into a sentence on request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mcl_ray.artifact import HISTORY
from mcl_ray.models.batch import Batch
from mcl_ray.models.blocks import InputLayer
from mcl_ray.serve.recommender import Query, Recommender, RequestError


@dataclass
class ExplainQuery:
    user_id: str
    scenario: str
    item_id: str
    profile: dict | None = None
    context: dict | None = None
    sentence: bool = False
    as_of: int | None = None


class Explainer:
    """Attributions and history evidence for one (user, item, scenario), on a loaded Recommender."""

    def __init__(self, rec: Recommender):
        from captum.attr import LayerIntegratedGradients

        self.rec = rec
        self.cfg = rec.art.cfg.explain
        self.input = next((m for m in rec.model.modules() if isinstance(m, InputLayer)), None)
        if self.input is None:
            self.ig = None  # e.g. llm_ranker: no per-field input layer to attribute to
        else:
            self.ig = LayerIntegratedGradients(self._logit, self.input)
        self.fields = (self.input.cat_names + self.input.num_names + self.input.text_names + self.input.hist_names
                       if self.input else [])
        self.source = {f.name: f.source for f in rec.spec.features}
        hist = rec.art.file(HISTORY)
        self.history = hist if hist.exists() else None

    def _logit(self, cat: torch.Tensor, num: torch.Tensor, scenario: torch.Tensor,
               hist: torch.Tensor | None = None, raters: torch.Tensor | None = None) -> torch.Tensor:
        return self.rec.model(Batch(cat=cat, num=num, scenario=scenario, hist=hist, raters=raters)).float()

    def _row(self, q: ExplainQuery) -> tuple[Batch, int]:
        rec = self.rec
        query = Query(user_id=q.user_id, scenario=q.scenario, profile=q.profile, context=q.context, as_of=q.as_of)
        feats = rec._user_features(query)
        pos = rec.items.pos.get(q.item_id)
        if pos is None:
            raise RequestError(404, f"unknown item {q.item_id!r}")
        idx = np.array([pos], np.int64)
        batch = Batch.candidates([f.name for f in rec.spec.categorical], [f.name for f in rec.spec.numeric],
                                 rec.items.cols, [(feats, idx, rec.scenarios.index(q.scenario))],
                                 history=rec.user_history([query]), raters=rec.item_raters([query], [idx]))
        return batch, pos

    def _value(self, j: int, batch: Batch):
        """The raw value of field j of the row, as the user would recognise it."""
        name = self.fields[j]
        n_cat, n_num = len(self.input.cat_names), len(self.input.num_names)
        if j < n_cat:
            i = int(batch.cat[0, j])
            vals = self.rec.vocabs.values.get(name)
            return None if i == 0 else (vals[i - 1] if vals is not None else f"bucket {i}")
        if j < n_cat + n_num:
            f = self.rec.feature[name]
            return round(float(batch.num[0, j - n_cat]) * (f.std or 1.0) + (f.mean or 0.0), 4)
        return "text embedding" if j < n_cat + n_num + len(self.input.text_names) else "behaviour history"

    def attributions(self, batch: Batch) -> dict:
        if self.ig is None:
            raise RequestError(422, f"backbone {self.rec.art.cfg.model.backbone} has no per-field input layer to "
                                    "attribute to")
        base = (torch.zeros_like(batch.cat), torch.zeros_like(batch.num))
        with torch.no_grad():
            logit = float(self._logit(batch.cat, batch.num, batch.scenario, batch.hist, batch.raters)[0])
            base_logit = float(self._logit(*base, batch.scenario, batch.hist, batch.raters)[0])
        attr, delta = self.ig.attribute((batch.cat, batch.num), baselines=base,
                                        additional_forward_args=(batch.scenario, batch.hist, batch.raters),
                                        n_steps=self.cfg.steps,
                                        return_convergence_delta=True)
        per_field = attr.detach().sum(-1)[0]  # [1, F, D] -> [F]
        rows = [{"field": name, "source": self.source.get(name, "history" if name in self.input.hist_names else "text"),
                 "value": self._value(j, batch), "attribution": round(float(per_field[j]), 6)}
                for j, name in enumerate(self.fields)]
        rows.sort(key=lambda r: -abs(r["attribution"]))
        return {"logit": round(logit, 6), "baseline_logit": round(base_logit, 6),
                "baseline_score": round(float(torch.sigmoid(torch.tensor(base_logit))), 6),
                "convergence_delta": round(float(delta[0]), 6), "fields": rows}

    def similar_history(self, user_id: str, pos: int) -> list[dict]:
        """The user's train-history items closest to the item (only liked ones, when the user has any)."""
        if self.history is None or self.cfg.history_items == 0:
            return []
        spec = self.rec.spec
        t = pq.read_table(self.history, filters=[(spec.user_key, "=", user_id)])
        if not t.num_rows:
            return []
        liked = t.filter(pc.greater(t["label"], 0.5))
        t = liked if liked.num_rows else t
        items = self.rec.items
        keys = [k for k in t[spec.item_key].to_pylist() if k in items.pos and items.pos[k] != pos]
        labels = dict(zip(t[spec.item_key].to_pylist(), t["label"].to_pylist()))
        if not keys:
            return []
        idx = torch.tensor([items.pos[k] for k in keys])
        sim = items.vecs[idx] @ items.vecs[pos]  # [H] cosine (rows are L2-normalised)
        top = torch.topk(sim, min(self.cfg.history_items, len(keys))).indices.tolist()
        return [{"item_id": keys[i], "title": items.titles[items.pos[keys[i]]], "similarity": round(float(sim[i]), 4),
                 "liked": bool(labels[keys[i]] > 0.5)} for i in top]

    def explain(self, q: ExplainQuery) -> dict:
        t0 = time.perf_counter()
        batch, pos = self._row(q)
        with torch.enable_grad():
            attr = self.attributions(batch)
        t1 = time.perf_counter()
        hist = self.similar_history(q.user_id, pos)
        t2 = time.perf_counter()
        items = self.rec.items
        return {"user_id": q.user_id, "scenario": q.scenario, "model_version": self.rec.version,
                "item": {"item_id": q.item_id, "title": items.titles[pos]},
                "score": round(float(torch.sigmoid(torch.tensor(attr["logit"]))), 6), **attr,
                "similar_history": hist,
                "timings_ms": {"attribute": round((t1 - t0) * 1000, 3), "history": round((t2 - t1) * 1000, 3)}}
