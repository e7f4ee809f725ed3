"""Evaluate a trained folder on a split: AUC/logloss overall and per scenario, user-grouped AUC,
top-K ranking on held-out positives per scenario; metrics JSON + PNG plots.

Test metrics go to `metrics.json` (what export packages as the model card's test numbers); any
other split goes to `metrics_<split>.json`, so evaluating on validation never replaces them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mcl_ray.core.config import ConfigError, ExperimentConfig
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.keys import key_array
from mcl_ray.data.history import ItemRaters, latest_rater_rows, read_user_history
from mcl_ray.data.splits import iter_split, read_pairs, read_split, unique_keys, value_counts
from mcl_ray.data.vocab import Vocabularies, encode_entities, entity_table
from mcl_ray.evaluate.fairness import by_group, exposure, popularity_buckets
from mcl_ray.evaluate.metrics import binary_metrics, gauc, topk_per_user
from mcl_ray.evaluate.summary import EvalMetrics
from mcl_ray.models.batch import Batch
from mcl_ray.models.weights import MODEL, load_trained


def metrics_file(split: str) -> str:
    return "metrics.json" if split == "test" else f"metrics_{split}.json"


@torch.no_grad()
def predict(model: torch.nn.Module, data: Batch, batch_size: int, device: torch.device) -> np.ndarray:
    """Probabilities [N] in row order, in slices of batch_size (dropout off)."""
    model.train(False)
    out = [torch.sigmoid(model(data.slice(i, i + batch_size).to(device)).float()).cpu()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


@torch.no_grad()
def ranking(model, spec: FeatureSpec, cfg: ExperimentConfig, prepare_dir: Path, test: pa.Table,
            seen_splits: list[str], retriever: torch.nn.Module | None = None) -> tuple[dict, dict, list, list, dict]:
    """Score every trainable item for sampled test users in their scenario; rank held-out positives.

    Returns (per scenario {users, recall@K, ...}, per user {recall@K, ndcg@K}, each ranked user's
    top-K item keys (K: the first of evaluate.top_k), the candidate item keys, and with a retrieval
    model the same per-scenario metrics of two-stage serving: the ranking model's scores kept for
    the retrieval model's top retrieval.candidates items only, the same users).

    Everything per user (features, seen items, scenario) is read for the sampled users only, so
    memory follows `evaluate.ranking_users`, not the number of users in the data."""
    ev = cfg.evaluate
    vocabs = Vocabularies.load(prepare_dir, spec)
    t = test.to_pandas()
    pos = t[t[spec.label_column] > 0]
    users = np.array(sorted(pos[spec.user_key].unique()))
    rng = np.random.default_rng(cfg.train.seed)
    if ev.ranking_users < len(users):
        users = np.sort(rng.choice(users, ev.ranking_users, replace=False))
    t = t[t[spec.user_key].isin(set(users))]
    pos = pos[pos[spec.user_key].isin(set(users))]
    scen_of = t.groupby(spec.user_key)[spec.scenario_column].agg(lambda s: s.mode().iloc[0])
    seen = read_pairs(prepare_dir, spec, seen_splits, users=users)
    seen_of = seen.to_pandas().groupby(spec.user_key)[spec.item_key].apply(set) if ev.exclude_seen else {}
    pos_items = pos.groupby(spec.user_key)[spec.item_key].apply(set)
    # behaviour history: a ranked user's history after all of their train rows, as serving builds it
    hist = read_user_history(prepare_dir, spec, users) if spec.sequence else None
    # item-side behaviour: every item's raters after all train rows (each item's last K train rows suffice)
    raters = ItemRaters(latest_rater_rows(prepare_dir, spec), spec) if spec.raters else None

    def table(name, key, wanted=None):
        if not name:
            return None
        tab = pq.read_table(prepare_dir / name)
        return tab.filter(pc.is_in(key_array(tab[key]), value_set=key_array(pa.array(wanted)))) if wanted is not None else tab

    # without a users table a hashed user is known by its train/valid rows (as a vocabulary would know it)
    known = pc.unique(seen[spec.user_key]) if len(seen) else pa.array([], pa.string())
    u_keys, u_feats = encode_entities(entity_table(table(spec.users_table, "user_id", users), "user_id", vocabs,
                                                   known), "user_id", spec, vocabs, "user")
    item_keys = (unique_keys(prepare_dir, spec, ["train"], spec.item_key)
                 if "item_id" in vocabs.hashed and not spec.items_table else None)
    i_keys, i_feats = encode_entities(entity_table(table(spec.items_table, "item_id"), "item_id", vocabs, item_keys),
                                      "item_id", spec, vocabs, "item")
    # candidates: items the model has an id for (seen in train)
    keep = i_feats["item_id"] > 0 if "item_id" in i_feats else np.ones(len(i_keys), bool)
    i_keys = [k for k, m in zip(i_keys, keep) if m]
    i_feats = {k: v[keep] for k, v in i_feats.items()}
    item_pos = {k: i for i, k in enumerate(i_keys)}
    user_row = {k: i for i, k in enumerate(u_keys)}

    n_items = len(i_keys)
    cat_names = [f.name for f in spec.categorical]
    num_names = [f.name for f in spec.numeric]
    all_items = np.arange(n_items)
    item_raters = raters.of(i_feats[spec.sequence[0].ids_of]) if raters is not None else None  # [items, 2, K]
    # metrics per user as soon as it is scored: no [users x catalogue] score matrix is kept (a
    # steady trickle of such rows between big model temporaries fragments the heap, too)
    per_scen: dict[int, dict[str, list]] = {}
    two_stage: dict[int, dict[str, list]] = {}
    k0 = ev.top_k[0]
    top_items = []
    per_user = {}
    if retriever is not None:  # the retrieval model's item vectors, once (exact search: what the exact index returns)
        item_vecs = retriever.item_vectors(Batch.candidates(cat_names, num_names, i_feats, [({}, all_items, 0)]))
    for u in users:
        if u not in user_row:
            continue
        s = int(scen_of[u])
        feats = {f: v[user_row[u]] for f, v in u_feats.items()}
        batch = Batch.candidates(cat_names, num_names, i_feats, [(feats, all_items, s)],
                                 history=[hist.of(u)] if hist is not None else None, raters=item_raters)
        scores = model(batch).float()
        for it in seen_of.get(u, set()):
            if it in item_pos:
                scores[item_pos[it]] = -torch.inf
        rel = torch.zeros(n_items, dtype=torch.bool)
        rel[[item_pos[it] for it in pos_items.get(u, set()) if it in item_pos]] = True
        if rel.any():
            pu = {k: float(v[0]) for k, v in topk_per_user(scores[None], rel[None], ev.top_k).items()}
            for k, v in pu.items():
                per_scen.setdefault(s, {}).setdefault(k, []).append(v)
            if retriever is not None:
                u_vec = retriever.user_vectors(batch.slice(0, 1))  # [1, E]
                near = (item_vecs @ u_vec.T).squeeze(1)
                near[scores == -torch.inf] = -torch.inf  # seen items are dropped before the top N, as in serving
                kept = torch.topk(near, min(cfg.retrieval.candidates, n_items)).indices
                two = torch.full_like(scores, -torch.inf)
                two[kept] = scores[kept]
                for k, v in topk_per_user(two[None], rel[None], ev.top_k).items():
                    two_stage.setdefault(s, {}).setdefault(k, []).append(float(v[0]))
            per_user[u] = {k: pu[k] for k in (f"recall@{k0}", f"ndcg@{k0}")}
            top = torch.topk(scores, min(k0, n_items))
            top_items.append([i_keys[j] for j, v in zip(top.indices.tolist(), top.values.tolist()) if v > -math.inf])
    def means(acc: dict[int, dict[str, list]]) -> dict:
        return {spec.scenario_names[s]: {"users": len(next(iter(m.values()))), **{k: float(np.mean(v)) for k, v in m.items()}}
                for s, m in sorted(acc.items())}
    by_scen = means(per_scen)
    return by_scen, per_user, top_items, i_keys, means(two_stage)


def fairness_groups(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path) -> list[str]:
    """The user attributes to report fairness by; a configured one the users table lacks is a
    config error (checked before training starts, not after)."""
    ev = cfg.evaluate
    if ev.fairness_groups == [] or (ev.fairness_groups is None and not spec.users_table):
        return []
    cols = pq.read_schema(Path(prepare_dir) / spec.users_table).names if spec.users_table else []
    if ev.fairness_groups is None:
        return [f.name for f in spec.categorical if f.source == "user" and f.name != "user_id" and f.name in cols]
    missing = [g for g in ev.fairness_groups if g not in cols or g == "user_id"]
    if missing:
        have = sorted(c for c in cols if c not in ("user_id", "text")) if cols else "nothing (no users table)"
        raise ConfigError(f"evaluate.fairness_groups: {missing} is not a column of the users table; it has {have}")
    return list(ev.fairness_groups)


def user_attributes(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path) -> dict[str, pd.Series]:
    """attribute -> values indexed by user key, for the fairness groups (evaluate.fairness_groups)."""
    ev = cfg.evaluate
    names = fairness_groups(cfg, spec, prepare_dir)
    if not names:
        return {}
    users = pq.read_table(prepare_dir / spec.users_table, columns=["user_id", *names])
    keys = key_array(users["user_id"]).to_pandas()
    out = {}
    for n in names:
        vals = pd.Series(key_array(users[n]).to_pandas().to_numpy(object), index=keys)
        if ev.fairness_groups is None and vals.nunique() > ev.fairness_max_values:
            continue  # an id-like attribute (zip code): not a group
        out[n] = vals[~vals.index.duplicated()]
    return out


def fairness(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path, y, p, users, rank) -> dict:
    """Per user group: AUC/logloss/positive rate (test rows) and top-K quality (ranked users), and
    top-K exposure by item popularity; each with its max-min gap (evaluate/fairness.py)."""
    attrs = user_attributes(cfg, spec, prepare_dir)
    per_user = rank[1] if rank else None
    out: dict = {"groups": {}}
    for name, of in attrs.items():
        groups = pd.Series(users, dtype=object).map(of).to_numpy(object)
        out["groups"][name] = by_group(y, p, groups, per_user, {u: of.get(u) for u in per_user} if per_user else None)
    if rank:
        counts = value_counts(prepare_dir, spec, "train", spec.item_key)
        n = cfg.evaluate.popularity_buckets
        out["exposure"] = {"k": cfg.evaluate.top_k[0],
                           **exposure(rank[2], popularity_buckets(counts, n), counts, n, rank[3])}
    return out


def retrieval_model(cfg: ExperimentConfig, spec: FeatureSpec, prepare_dir: Path) -> torch.nn.Module | None:
    """The run's retrieval model (<run>/retrieval, next to prepare/) when the experiment has one."""
    rdir = prepare_dir.parent / "retrieval"
    if not cfg.retrieval.enabled or not (rdir / MODEL).exists():
        return None
    rcfg = ExperimentConfig.model_validate_json((rdir / "config.json").read_text())
    return load_trained(spec, rcfg.model, rdir / MODEL)


def evaluate_train_dir(train_dir: Path, prepare_dir: Path, split: str = "test") -> EvalMetrics:
    cfg = ExperimentConfig.model_validate_json((train_dir / "config.json").read_text())
    spec = FeatureSpec.load(prepare_dir)
    model = load_trained(spec, cfg.model, train_dir / MODEL)
    # Streamed batch by batch (a sample is small and read whole): what stays in memory is four
    # columns (label, scenario, user, item) and the predictions, not the feature matrix.
    keep = [spec.label_column, spec.scenario_column, spec.user_key, spec.item_key]
    sample = cfg.train.sample_rows.get(split)
    batches = ([read_split(prepare_dir, spec, split, extra=keep[2:], sample=sample, seed=cfg.train.seed)]
               if sample else iter_split(prepare_dir, spec, split, extra=keep[2:], batch_rows=cfg.train.eval_batch_size))
    parts, preds = [], []
    for t in batches:
        preds.append(predict(model, Batch.from_table(t, spec), cfg.train.eval_batch_size, torch.device("cpu")))
        parts.append(t.select(keep))
    table = pa.concat_tables(parts)
    p = np.concatenate(preds) if preds else np.zeros(0, np.float32)
    y = table[spec.label_column].to_numpy().astype(np.float32)
    scen = table[spec.scenario_column].to_numpy().astype(np.int64)
    out = binary_metrics(y, p, scen, spec.scenario_names)
    users = table[spec.user_key].to_numpy(zero_copy_only=False)
    out["overall"]["gauc"] = gauc(y, p, users)
    for s, name in enumerate(spec.scenario_names):
        out["by_scenario"][name]["gauc"] = gauc(y[scen == s], p[scen == s], users[scen == s])
    # top-K needs ids to rank by; users/items tables are optional (the vocabularies list the ids)
    if cfg.evaluate.ranking_users > 0 and {"user_id", "item_id"} <= {f.name for f in spec.categorical}:
        retriever = retrieval_model(cfg, spec, prepare_dir)
        rank = ranking(model, spec, cfg, prepare_dir, table, [s for s in ("train", "valid") if s != split], retriever)
        out["ranking"] = rank[0]
        if retriever is not None:
            out["ranking_two_stage"] = {"candidates": cfg.retrieval.candidates, "by_scenario": rank[4]}
    else:
        rank = None
    fair = fairness(cfg, spec, prepare_dir, y, p, users, rank)
    if fair["groups"] or fair.get("exposure"):
        out["fairness"] = fair
    out.update(split=split, backbone=cfg.model.backbone, seed=cfg.train.seed)
    (train_dir / metrics_file(split)).write_text(json.dumps(out, indent=2))
    from mcl_ray.evaluate.plots import plot_run  # matplotlib: only where plots are drawn, not in workers

    plot_run(train_dir, out)
    return out
