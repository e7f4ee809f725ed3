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
    fairness: dict  # {"groups": {attribute: {"values": {value: Scores + top-K}, "gap": {...}}}, "exposure": {...}}
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
    if all(x.get("fairness") for x in ms):
        out["fairness"] = _agg_tree([x["fairness"] for x in ms])
    out["seeds"] = [x.get("seed") for x in ms]
    out["backbone"] = ms[0].get("backbone")
    return out


def _agg_tree(trees: list):
    """Mean ± std over seeds of every number in nested metrics; a key some seeds lack (a group value
    only one seed's sampled rows hold) is aggregated over the seeds that have it (its n says how
    many). A gap is the mean of the per-seed gaps. Lists (popularity buckets) go by position;
    strings are kept from the first seed."""
    first = trees[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for t in trees if isinstance(t, dict) for k in t))
        return {k: _agg_tree([t[k] for t in trees if isinstance(t, dict) and k in t]) for k in keys}
    if isinstance(first, list):
        return [_agg_tree([t[i] for t in trees if i < len(t)]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return aggregate(float(t) for t in trees)
    return first


def _fmt(v, means_only: bool = False) -> str:
    if isinstance(v, dict):
        v = v["mean"] if means_only else v
        if isinstance(v, dict):
            return format_agg(v)  # type: ignore[arg-type]
    return "n/a" if v is None or v != v else f"{v:.4f}"


def _num(v) -> float:
    return v["mean"] if isinstance(v, dict) else v


def fairness_tables(f: dict, means_only: bool = False) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Fairness metrics (one seed's or summarised over seeds) as text cells: (group header, group
    rows, exposure rows). Group rows: attribute, value, test rows, positive rate, AUC, logloss[,
    ranked users, NDCG/Recall@K]; each attribute ends with its gap row (max - min over its values)."""
    fmt = lambda v: _fmt(v, means_only)  # noqa: E731
    topk = sorted({k for g in f.get("groups", {}).values() for row in g["values"].values() for k in row if "@" in k})
    head = ["attribute", "value", "rows", "pos. rate", "AUC", "logloss"] + (["users", *topk] if topk else [])
    rows = []
    for attr, g in f.get("groups", {}).items():
        for v, m in g["values"].items():
            rows.append([attr, v, f"{int(_num(m['n'])):,}", fmt(m["positive_rate"]), fmt(m["auc"]), fmt(m["logloss"])]
                        + ([f"{int(_num(m.get('users', 0)))}", *[fmt(m.get(k)) for k in topk]] if topk else []))
        gp = g["gap"]
        rows.append([attr, "gap", "", fmt(gp.get("positive_rate")), fmt(gp.get("auc")),
                     fmt(gp.get("logloss"))] + (["", *[fmt(gp.get(k)) for k in topk]] if topk else []))
    ex = f.get("exposure")
    ex_rows = []
    if ex:
        for b in ex["buckets"]:
            ex_rows.append([b["bucket"], f"{int(_num(b['items'])):,}", fmt(b["item_share"]), fmt(b["train_share"]),
                            fmt(b["exposure_share"]), fmt(b["exposure_ratio"])])
        ex_rows.append(["gap", "", "", "", fmt(ex["gap"]["exposure_share"]), fmt(ex["gap"]["exposure_ratio"])])
    return head, rows, ex_rows


EXPOSURE_HEAD = ["popularity", "items", "item share", "train share", "slot share", "slots / items"]


def fairness_markdown(f: dict) -> list[str]:
    """The fairness tables in markdown (report.md, MODEL_CARD.md)."""
    head, rows, ex_rows = fairness_tables(f)
    lines: list[str] = []
    if rows:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    if ex_rows:
        k = f["exposure"]["k"]
        lines += [f"Top-{_num(k):.0f} exposure by item popularity (buckets of equal train-interaction share; slot "
                  "share: of all top-K slots; gap: max - min):", "",
                  "| " + " | ".join(EXPOSURE_HEAD) + " |", "|" + "---|" * len(EXPOSURE_HEAD)]
        lines += ["| " + " | ".join(r) + " |" for r in ex_rows]
        lines.append("")
    return lines
