"""The typed shape of evaluation metrics, and their mean ± std over seeds (light: no sklearn or
torch, so the CLI and the run report import it cheaply)."""

from __future__ import annotations

import statistics
from typing import Iterable, TypedDict


class Scores(TypedDict, total=False):
    n: int
    positive_rate: float
    auc: float  # nan when the rows hold a single class
    logloss: float
    gauc: float  # user-grouped AUC (evaluate only)


class BinaryMetrics(TypedDict):
    overall: Scores
    by_scenario: dict[str, Scores]


class EvalMetrics(BinaryMetrics, total=False):
    ranking: dict[str, dict[str, float]]  # scenario -> {"users": n, "recall@10": ..., ...}
    split: str
    backbone: str
    seed: int


class Agg(TypedDict):
    mean: float
    std: float  # sample standard deviation over seeds (0 for one)
    n: int


def aggregate(values: Iterable[float]) -> Agg:
    """Mean and sample std over seeds; NaNs (undefined metrics) are left out and not counted."""
    vals = [v for v in values if v == v]
    return {"mean": statistics.fmean(vals) if vals else float("nan"),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def format_agg(a: Agg) -> str:
    """0.8194 or 0.8194 ± 0.0003 (over more than one seed); 'n/a' when undefined."""
    if a["n"] == 0 or a["mean"] != a["mean"]:
        return "n/a"
    return f"{a['mean']:.4f}" + (f" ± {a['std']:.4f}" if a["n"] > 1 else "")


def summarize(ms: list[EvalMetrics]) -> dict:
    """Mean and sample std over seeds of AUC/logloss (overall, per scenario), user-grouped AUC and
    the top-K ranking metrics."""
    out: dict = {"overall": {m: aggregate(x["overall"][m] for x in ms) for m in ("auc", "logloss", "gauc")},
                 "by_scenario": {name: {m: aggregate(x["by_scenario"][name][m] for x in ms) for m in ("auc", "logloss")}
                                 for name in ms[0]["by_scenario"]}}
    if all("ranking" in x for x in ms) and ms[0]["ranking"]:
        out["ranking"] = {name: {k: aggregate(x["ranking"][name][k] for x in ms if name in x["ranking"])
                                 for k in ms[0]["ranking"][name] if "@" in k} for name in ms[0]["ranking"]}
    out["seeds"] = [x.get("seed") for x in ms]
    out["backbone"] = ms[0].get("backbone")
    return out
