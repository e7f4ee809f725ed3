"""runs/<name>/report.md: one page per run directory, from the files the stages wrote
(prepare stats, training metrics and plots, the sweep report, the artifact's card, metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mcl_ray.evaluate.summary import fairness_markdown, format_agg


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def write_run_report(run_dir: str | Path) -> Path:
    root = Path(run_dir)
    lines = [f"# Run report: {root.name}", ""]
    meta = _load(root / "metadata.json")
    if meta and meta["runs"]:
        last = meta["runs"][-1]
        lines += [f"Last stage `{last['stage']}` at {last['time']}, git `{last['git_commit']}`, "
                  f"ray {last['libraries'].get('ray')}, torch {last['libraries'].get('torch')}; "
                  f"data fingerprint `{last['data_fingerprint']}`. Full history: `metadata.json`.", ""]

    stats = _load(root / "prepare" / "stats.json")
    if stats:
        lines += ["## Data (prepare)", "", "| split | " + " | ".join(stats["scenarios"]) + " | all | positive rate |",
                  "|" + "---|" * (len(stats["scenarios"]) + 3)]
        for split, d in stats["splits"].items():
            cells = [f"{d['by_scenario'].get(n, {}).get('rows', 0):,}" for n in stats["scenarios"]]
            lines.append(f"| {split} | " + " | ".join(cells) + f" | {d['rows']:,} | {d['positive_rate']:.3f} |")
        q = {k: v["rows_quarantined"] for k, v in stats["rows"].items()}
        lines += ["", f"Quarantined rows: {q} (kept in `prepare/quarantine/`).", ""]

    enc = sorted(f for f in (root / "prepare" / "embeddings").glob("*.json") if f.name != "fingerprint.json")
    if enc:
        lines += ["## Text features (encode)", "", "| field | encoder | texts | encoded this run | cached | texts/s |",
                  "|---|---|---|---|---|---|"]
        for f in enc:
            e = _load(f)
            rate = f"{e['texts_per_s']:.0f}" if e.get("texts_per_s") else "-"
            lines.append(f"| {f.stem} | {e['encoder']} (`{e['fingerprint'][:12]}`) | {e['rows']:,} | {e['encoded']:,} "
                         f"| {e['reused']:,} | {rate} |")
        lines.append("")

    aug = _load(root / "prepare" / "augment" / "stats.json")
    if aug:
        g = aug["generator"]
        lines += ["## Augmentation (LLM-generated rows, training split only)", "",
                  f"Generator `{g['model']}` via {g['backend']}, prompt {g['prompt_version']}, temperature "
                  f"{g['temperature']}. Requested {aug['requested']}, answered {aug['answered']}, valid {aug['valid']}, "
                  f"invalid {aug['invalid'] or 0}; {aug['duplicates_of_real']} duplicates of real interactions "
                  f"dropped; {aug['rows_written']} rows written ({aug['positives']} positive, {aug['negatives']} "
                  f"negative). Every prompt and answer: `prepare/augment/generations.parquet`.", ""]

    summary = _load(root / "train" / "summary.json")
    if summary:
        lines += ["## Training", "", f"Backbone `{summary['backbone']}`, seeds {summary['seeds']}.", "",
                  "| scenario | test AUC | logloss |", "|---|---|---|"]
        for name, m in summary["by_scenario"].items():
            lines.append(f"| {name} | {format_agg(m['auc'])} | {format_agg(m['logloss'])} |")
        lines.append(f"| **overall** | {format_agg(summary['overall']['auc'])} | {format_agg(summary['overall']['logloss'])} |")
        lines.append("")
        if summary.get("fairness"):
            lines += ["### Fairness by user group (test)", "",
                      "Metrics per value of each user attribute and their max-min gap; top-K exposure of items "
                      "by popularity (`evaluate.fairness_groups`, `evaluate.popularity_buckets`).", ""]
            lines += fairness_markdown(summary["fairness"])
        for seed_dir in sorted((root / "train").glob("seed_*")):
            pngs = sorted(seed_dir.glob("*.png"))
            if pngs:
                lines += [f"{seed_dir.name}: " + " ".join(f"![{p.stem}]({_rel(p, root)})" for p in pngs), ""]

    tune = root / "tune" / "summary.json"
    if tune.exists():
        s = _load(tune)
        lines += ["## Sweep", "", f"{s['trials']} trials ({s['scheduler']}), {s['trials_per_hour']:.1f} trials/hour; "
                  f"winner `{s['winner']['trial_id']}` val AUC {s['winner']['best_val_auc']:.4f}, "
                  f"test AUC {s['winner_test']['overall']['auc']:.4f}. Details: [tune/report.md](tune/report.md).", ""]
        for png in ("history.png", "curves.png", "importance.png"):
            if (root / "tune" / png).exists():
                lines.append(f"![{png[:-4]}](tune/{png})")
        lines.append("")

    card = root / "artifact" / "MODEL_CARD.md"
    manifest = _load(root / "artifact" / "manifest.json")
    if manifest:
        lines += ["## Model artifact", "", f"`artifact/` version `{manifest['version']}` "
                  f"(weights sha256 `{manifest['weights_sha256'][:16]}...`); model card: [artifact/MODEL_CARD.md]"
                  f"({_rel(card, root)}). Serve it: `mcl-ray serve {root / 'artifact'}`.", ""]
    tb = sorted(root.glob("**/tensorboard"))
    if tb:
        lines += [f"TensorBoard: `tensorboard --logdir {root}` ({len(tb)} run(s)).", ""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out
