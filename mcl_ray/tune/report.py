"""Sweep report: trials table, optimisation history, learning curves and parameter importance
(Optuna's fANOVA) as PNGs, and the winner against the experiment's default configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mcl_ray.core.config import Choice, ExperimentConfig, IntRange, LogUniform
from mcl_ray.tune.space import encode_value


def param_importances(cfg: ExperimentConfig, rows: list[dict]) -> dict[str, float]:
    """fANOVA importances over the finished trials (empty when there are too few to say)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for key, p in cfg.tune.space.items():
        if isinstance(p, Choice):
            dists[key] = CategoricalDistribution([encode_value(v) for v in p.values])
        elif isinstance(p, IntRange):
            dists[key] = IntDistribution(p.low, p.high, log=p.log)
        else:
            dists[key] = FloatDistribution(p.low, p.high, log=isinstance(p, LogUniform))
    done = [r for r in rows if r["epochs"] > 0 and not math.isnan(r["best_val_auc"])]
    if len(done) < 3 or len(dists) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for r in done:
        params = {k: encode_value(r["params"][k]) for k in dists if k in r["params"]}
        if len(params) != len(dists):
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r["best_val_auc"]))
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError):  # e.g. every trial has the same value
        return {}


def write_report(tune_dir: Path, cfg: ExperimentConfig, rows: list[dict], winner: dict, test: dict,
                 default: dict | None, fit_seconds: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # optimisation history: each trial's best validation AUC in start order, and the best so far
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["order"] for r in rows if r["epochs"]]
    ys = [r["best_val_auc"] for r in rows if r["epochs"]]
    best, run = [], -math.inf
    for y in ys:
        run = max(run, y)
        best.append(run)
    ax.scatter(xs, ys, s=18, label="trial")
    ax.step(xs, best, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial (start order)", ylabel="validation AUC (best epoch)", title=f"{cfg.name}: optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(tune_dir / "history.png", dpi=110)
    plt.close(fig)

    # learning curves: ASHA's early stops show as short lines
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["val_auc_curve"]:
            ax.plot(range(1, len(r["val_auc_curve"]) + 1), r["val_auc_curve"], alpha=0.7,
                    lw=2.5 if r is winner or r["trial_id"] == winner["trial_id"] else 1)
    ax.set(xlabel="epoch", ylabel="validation AUC", title="trials' learning curves (thick: winner)")
    fig.tight_layout()
    fig.savefig(tune_dir / "curves.png", dpi=110)
    plt.close(fig)

    imp = param_importances(cfg, rows)
    if imp:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(imp)))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="parameter importance")
        fig.tight_layout()
        fig.savefig(tune_dir / "importance.png", dpi=110)
        plt.close(fig)

    keys = list(cfg.tune.space)
    lines = [f"# Sweep report: {cfg.name}", "",
             f"{len(rows)} trials in {fit_seconds / 60:.1f} min ({len(rows) / (fit_seconds / 3600):.1f} trials/hour), "
             f"{sum(r['epochs'] for r in rows)} epochs in all, scheduler {cfg.tune.scheduler}, "
             "metric: best validation AUC. "
             f"Winner `{winner['trial_id']}`; test metrics were computed for the winner only.", "",
             "## Winner vs the experiment's default configuration", "",
             "| | " + " | ".join(keys) + " | epochs | val AUC |", "|" + "---|" * (len(keys) + 3)]
    lines.append(_row("winner", winner, keys))
    if default is not None:
        lines.append(_row("default", default, keys))
    lines += ["", f"Winner test AUC: {test['overall']['auc']:.4f} overall; "
              + ", ".join(f"{k} {v['auc']:.4f}" for k, v in test["by_scenario"].items()), ""]
    if imp:
        lines += ["## Parameter importance", "", "![importance](importance.png)", "",
                  "| parameter | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in imp.items()] + [""]
    lines += ["## Optimisation history", "", "![history](history.png) ![curves](curves.png)", "",
              "## Trials", "", "| # | trial | status | " + " | ".join(keys) + " | epochs | val AUC | train s |",
              "|" + "---|" * (len(keys) + 6)]
    for r in rows:
        lines.append(f"| {r['order']} | {r['trial_id']} | {r['status']} | "
                     + " | ".join(_fmt(r["params"].get(k)) for k in keys)
                     + f" | {r['epochs']} | {_fmt(r['best_val_auc'])} | {r['seconds']:.0f} |")
    errors = [r for r in rows if r["error"]]
    if errors:
        lines += ["", "## Failed trials", ""] + [f"- `{r['trial_id']}`: {r['error']}" for r in errors]
    out = tune_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    (tune_dir / "importance.json").write_text(json.dumps(imp, indent=1))
    (tune_dir / "summary.json").write_text(json.dumps({
        "trials": len(rows), "fit_seconds": fit_seconds, "trials_per_hour": len(rows) / (fit_seconds / 3600),
        "epochs": sum(r["epochs"] for r in rows), "scheduler": cfg.tune.scheduler,
        "winner": {k: winner[k] for k in ("trial_id", "params", "epochs", "best_val_auc")},
        "default": {k: default[k] for k in ("trial_id", "params", "epochs", "best_val_auc")} if default else None,
        "winner_test": {"overall": test["overall"], "by_scenario": test["by_scenario"]}}, indent=1))
    return out


def _row(label: str, r: dict, keys: list[str]) -> str:
    return f"| {label} | " + " | ".join(_fmt(r["params"].get(k)) for k in keys) + \
        f" | {r['epochs']} | {_fmt(r['best_val_auc'])} |"


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 0.01 or abs(v) >= 1000 else f"{v:.4f}")
    return str(v)
