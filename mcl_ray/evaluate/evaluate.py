"""Evaluate a trained run on the test split: AUC/logloss overall and per scenario, user-grouped
AUC, top-K ranking on held-out positives per scenario; metrics.json + PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mcl_ray.config import ExperimentConfig
from mcl_ray.data.prepare import key_array
from mcl_ray.evaluate.metrics import binary_metrics, gauc, topk_metrics
from mcl_ray.feature_spec import FeatureSpec
from mcl_ray.models.backbones import build_model
from mcl_ray.train import checkpoint as ck
from mcl_ray.train.loop import predict
from mcl_ray.train.tensors import read_split, table_to_tensors


def load_model(train_dir: Path, spec: FeatureSpec, cfg: ExperimentConfig) -> torch.nn.Module:
    model = build_model(spec, cfg.model)
    ck.load_weights(model, train_dir / ck.MODEL)
    return model.train(False)  # inference mode: dropout off


def encode_entities(table: pa.Table, key: str, spec: FeatureSpec, vocabs: dict[str, list[str]],
                    source: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Encode the features that come from the user (or item) table, keyed like the training rows."""
    cols = {}
    for f in spec.categorical:
        if f.source != source:
            continue
        col = key if f.name == key else f.name
        idx = pc.index_in(key_array(table[col]), value_set=pa.array(vocabs[f.name], pa.string()))
        cols[f.name] = pc.add(pc.fill_null(idx, -1), 1).to_numpy()
    return key_array(table[key]).to_pylist(), cols


@torch.no_grad()
def ranking(model, spec: FeatureSpec, cfg: ExperimentConfig, prepare_dir: Path, test: pa.Table,
            seen: pa.Table) -> dict:
    """Score every trainable item for sampled test users in their scenario; rank held-out positives."""
    ev = cfg.evaluate
    vocabs = json.loads((prepare_dir / spec.vocabularies).read_text())
    users_t = pq.read_table(prepare_dir / spec.users_table)
    items_t = pq.read_table(prepare_dir / spec.items_table)
    u_keys, u_feats = encode_entities(users_t, "user_id", spec, vocabs, "user")
    i_keys, i_feats = encode_entities(items_t, "item_id", spec, vocabs, "item")
    # candidates: items the model has an id for (seen in train)
    keep = i_feats["item_id"] > 0 if "item_id" in i_feats else np.ones(len(i_keys), bool)
    i_keys = [k for k, m in zip(i_keys, keep) if m]
    i_feats = {k: v[keep] for k, v in i_feats.items()}
    item_pos = {k: i for i, k in enumerate(i_keys)}
    user_row = {k: i for i, k in enumerate(u_keys)}

    t = test.to_pandas()
    pos = t[t[spec.label_column] > 0]
    users = np.array(sorted(pos["user_key"].unique()))
    rng = np.random.default_rng(cfg.train.seed)
    if ev.ranking_users < len(users):
        users = np.sort(rng.choice(users, ev.ranking_users, replace=False))
    scen_of = t.groupby("user_key")[spec.scenario_column].agg(lambda s: s.mode().iloc[0])
    seen_df = seen.to_pandas().groupby("user_key")["item_key"].apply(set) if ev.exclude_seen else {}
    pos_items = pos.groupby("user_key")["item_key"].apply(set)

    n_items = len(i_keys)
    cat_names = [f.name for f in spec.categorical]
    results: dict[str, dict] = {}
    per_scen: dict[int, tuple[list, list]] = {}
    for u in users:
        if u not in user_row:
            continue
        cat = np.zeros((n_items, len(cat_names)), np.int64)
        for j, f in enumerate(cat_names):
            if f in u_feats:
                cat[:, j] = u_feats[f][user_row[u]]
            elif f in i_feats:
                cat[:, j] = i_feats[f]
        s = int(scen_of[u])
        batch = {"cat": torch.from_numpy(cat), "num": torch.zeros(n_items, len(spec.numeric)),
                 "scenario": torch.full((n_items,), s, dtype=torch.long)}
        scores = model(batch).float()
        for it in (seen_df.get(u, set()) if ev.exclude_seen else set()):
            if it in item_pos:
                scores[item_pos[it]] = -torch.inf
        rel = torch.zeros(n_items, dtype=torch.bool)
        for it in pos_items.get(u, set()):
            if it in item_pos:
                rel[item_pos[it]] = True
        if rel.any():
            per_scen.setdefault(s, ([], []))[0].append(scores)
            per_scen[s][1].append(rel)
    for s, (sc, rl) in sorted(per_scen.items()):
        m = topk_metrics(torch.stack(sc), torch.stack(rl), ev.top_k)
        results[spec.scenario_names[s]] = {"users": len(sc), **m}
    return results


def evaluate_train_dir(train_dir: Path, prepare_dir: Path, split: str = "test") -> dict:
    cfg = ExperimentConfig.model_validate_json((train_dir / "config.json").read_text())
    spec = FeatureSpec.load(prepare_dir)
    model = load_model(train_dir, spec, cfg)
    table = read_split(prepare_dir, spec, split, extra=["user_key", "item_key"],
                       sample=cfg.train.sample_rows.get(split), seed=cfg.train.seed)
    data = table_to_tensors(table, spec)
    p = predict(model, data, cfg.train.eval_batch_size, torch.device("cpu"))
    y, scen = data["label"].numpy(), data["scenario"].numpy()
    out = binary_metrics(y, p, scen, spec.scenario_names)
    users = table["user_key"].to_numpy(zero_copy_only=False)
    out["overall"]["gauc"] = gauc(y, p, users)
    for s, name in enumerate(spec.scenario_names):
        out["by_scenario"][name]["gauc"] = gauc(y[scen == s], p[scen == s], users[scen == s])
    if cfg.evaluate.ranking_users > 0 and spec.users_table and spec.items_table:
        seen = pa.concat_tables([read_split(prepare_dir, spec, s, extra=["user_key", "item_key"])
                                 for s in ("train", "valid") if s in spec.splits and s != split])
        out["ranking"] = ranking(model, spec, cfg, prepare_dir, table, seen)
    out["split"] = split
    out["backbone"] = cfg.model.backbone
    out["seed"] = cfg.train.seed
    (train_dir / "metrics.json").write_text(json.dumps(out, indent=2))
    from mcl_ray.evaluate.plots import plot_run

    plot_run(train_dir, out)
    return out
