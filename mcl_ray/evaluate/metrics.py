"""Metrics: AUC / logloss overall and per scenario (scikit-learn), user-grouped AUC, and top-K
ranking metrics (torchmetrics retrieval functions) per scenario."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score
from mcl_ray.evaluate.summary import BinaryMetrics, Scores


def auc_logloss(y: np.ndarray, p: np.ndarray) -> Scores:
    out = {"n": int(len(y)), "positive_rate": float(y.mean()) if len(y) else float("nan")}
    if len(np.unique(y)) == 2:
        out["auc"] = float(roc_auc_score(y, p))
        out["logloss"] = float(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1]))
    else:
        out["auc"] = out["logloss"] = float("nan")
    return out


def binary_metrics(y: np.ndarray, p: np.ndarray, scenario: np.ndarray, names: list[str]) -> BinaryMetrics:
    """{'overall': {auc, logloss, n, positive_rate}, 'by_scenario': {name: {...}}}."""
    return {"overall": auc_logloss(y, p),
            "by_scenario": {name: auc_logloss(y[scenario == s], p[scenario == s]) for s, name in enumerate(names)}}


def gauc(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> float:
    """User-grouped AUC: per-user AUC weighted by the user's rows, over users with both labels.

    Vectorised (one grouped rank, no per-user call): per user, AUC = (sum of the positives' ranks -
    P(P+1)/2) / (P*N) with tied scores given their average rank, which is what roc_auc_score
    computes; a test split with millions of users takes seconds, not minutes."""
    if len(y) == 0:
        return float("nan")
    df = pd.DataFrame({"u": pd.factorize(users)[0], "y": np.asarray(y) > 0, "p": np.asarray(p, np.float64)})
    df["r"] = df.groupby("u")["p"].rank(method="average")
    df["rp"] = df["r"].where(df["y"], 0.0)
    g = df.groupby("u").agg(n=("y", "size"), pos=("y", "sum"), rank_pos=("rp", "sum"))
    g = g[(g["pos"] > 0) & (g["pos"] < g["n"])]
    if g.empty:
        return float("nan")
    auc = (g["rank_pos"] - g["pos"] * (g["pos"] + 1) / 2) / (g["pos"] * (g["n"] - g["pos"]))
    return float((auc * g["n"]).sum() / g["n"].sum())


def topk_per_user(scores: torch.Tensor, relevant: torch.Tensor, ks: list[int]) -> dict[str, np.ndarray]:
    """Recall/NDCG/HitRate/Precision/F1@K of each user [U] (torchmetrics' conventions: NDCG gives
    tied scores their average gain, the others break ties by position).

    scores: [U, I] (excluded items already set to -inf), relevant: [U, I] bool held-out positives."""
    # imported here: torchmetrics loads all its domains (text pulls in transformers), 4-9 s on a
    # 2-core machine, and every Ray Train worker imports this module but never ranks.
    from torchmetrics.functional.retrieval import (retrieval_hit_rate, retrieval_normalized_dcg,
                                                   retrieval_precision, retrieval_recall)

    out: dict[str, np.ndarray] = {}
    for k in ks:
        rec, ndcg, hit, prec = [], [], [], []
        for s, r in zip(scores, relevant):
            rec.append(retrieval_recall(s, r, top_k=k))
            ndcg.append(retrieval_normalized_dcg(s, r, top_k=k))
            hit.append(retrieval_hit_rate(s, r, top_k=k))
            prec.append(retrieval_precision(s, r, top_k=k))
        R, P = torch.stack(rec), torch.stack(prec)
        f1 = torch.where(R + P > 0, 2 * R * P / (R + P).clamp_min(1e-12), torch.zeros_like(R))
        out.update({f"recall@{k}": R.numpy(), f"ndcg@{k}": torch.stack(ndcg).numpy(),
                    f"hitrate@{k}": torch.stack(hit).numpy(), f"precision@{k}": P.numpy(), f"f1@{k}": f1.numpy()})
    return out


def topk_metrics(scores: torch.Tensor, relevant: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Mean over users of Recall/NDCG/HitRate/Precision/F1@K (see topk_per_user)."""
    return {k: float(v.mean()) for k, v in topk_per_user(scores, relevant, ks).items()}
