"""Fairness by group: the same quality numbers per user group, item exposure by popularity, and
the max-min gap of each.

User groups are the values of user attributes (gender, age, any configured column of the users
table): per value, AUC / logloss / positive rate over its test rows and the top-K quality of its
ranked users. Items are bucketed by train popularity into buckets holding equal shares of the
train interactions (bucket 0, "head", is the few most popular items); exposure is the share of
all top-K slots each bucket receives."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mcl_ray.evaluate.metrics import auc_logloss

GAP_METRICS = ("auc", "logloss", "positive_rate")


def gap(values: list[float]) -> float:
    """max - min over the defined values (nan when fewer than two are defined)."""
    vals = [v for v in values if v == v]
    return float(max(vals) - min(vals)) if len(vals) > 1 else float("nan")


def by_group(y: np.ndarray, p: np.ndarray, groups: np.ndarray, topk: dict[str, dict[str, float]] | None = None,
             user_group: dict | None = None) -> dict:
    """One attribute: {"values": {value: {n, positive_rate, auc, logloss[, users, recall@K...]}}, "gap": {...}}.

    y, p, groups: test rows (label, probability, the row's user's value; None = unknown, left out).
    topk: per ranked user {user: {"recall@10": .., ...}}; user_group: user -> value."""
    out: dict[str, dict] = {}
    g = pd.Series(groups, dtype=object)
    known = g.notna().to_numpy()
    as_text = g.astype(str).to_numpy()
    for v in sorted(set(as_text[known]), key=_natural):
        m = known & (as_text == v)
        out[v] = dict(auc_logloss(y[m], p[m]))
    if topk and user_group:
        keys = sorted({k for per in topk.values() for k in per})
        for v, row in out.items():
            users = [u for u in topk if str(user_group.get(u)) == v]
            row["users"] = len(users)
            for k in keys:
                row[k] = float(np.mean([topk[u][k] for u in users])) if users else float("nan")
    metrics = [k for k in next(iter(out.values()), {}) if k in GAP_METRICS or "@" in k]
    return {"values": out, "gap": {k: gap([row[k] for row in out.values()]) for k in metrics}}


def popularity_buckets(counts: dict[str, int], n_buckets: int) -> dict[str, int]:
    """item -> bucket (0 = most popular): items ranked by count, cut where the cumulative share of
    interactions crosses 1/B, 2/B, ... (ties in count keep the key order, so it is deterministic)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(c for _, c in ranked) or 1
    out, before = {}, 0
    for k, c in ranked:
        out[k] = min(int(before * n_buckets / total), n_buckets - 1)
        before += c
    return out


def exposure(top_items: list[list[str]], bucket_of: dict[str, int], counts: dict[str, int], n_buckets: int,
             candidates: list[str]) -> dict:
    """Share of the top-K slots per popularity bucket, next to the bucket's share of the candidate
    items and of train interactions; gap = max - min of the per-item exposure ratio
    (slot share / item share: 1 everywhere means exposure proportional to catalogue share)."""
    slots = np.zeros(n_buckets)
    for items in top_items:
        for it in items:
            slots[bucket_of.get(it, n_buckets - 1)] += 1  # never interacted with in train: the tail
    cand = np.zeros(n_buckets)
    for it in candidates:
        cand[bucket_of.get(it, n_buckets - 1)] += 1
    inter = np.zeros(n_buckets)
    for it, c in counts.items():
        inter[bucket_of[it]] += c
    names = _bucket_names(n_buckets)
    rows = []
    for b in range(n_buckets):
        slot_share = slots[b] / slots.sum() if slots.sum() else float("nan")
        item_share = cand[b] / cand.sum() if cand.sum() else float("nan")
        rows.append({"bucket": names[b], "items": int(cand[b]), "item_share": float(item_share),
                     "train_share": float(inter[b] / inter.sum()) if inter.sum() else float("nan"),
                     "exposure_share": float(slot_share),
                     "exposure_ratio": float(slot_share / item_share) if item_share else float("nan")})
    return {"buckets": rows, "gap": {"exposure_share": gap([r["exposure_share"] for r in rows]),
                                     "exposure_ratio": gap([r["exposure_ratio"] for r in rows])}}


def _bucket_names(n: int) -> list[str]:
    if n == 3:
        return ["head", "mid", "tail"]
    return ["head"] + [f"b{i}" for i in range(1, n - 1)] + ["tail"] if n > 1 else ["all"]


def _natural(v: str):
    """'2' < '10' < 'F' (numbers first, numerically)."""
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)
