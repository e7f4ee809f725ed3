"""The model artifact: everything serving needs, in one folder, no pickles.

    artifact/
      model.safetensors      weights of the exported model
      config.json            the full ExperimentConfig it was trained with
      feature_spec.json      data contract (+ vocabs.json: feature -> values, id = position + 1)
      users.parquet          user attributes (cold start, user features)
      items.parquet          item attributes and titles (candidates)
      seen.parquet           known (user_key, item_key) interactions, for exclude_seen
      history.parquet        the train split's real (user_key, item_key, label) rows, sorted by user in
                             small row groups (a reader filters one user without reading the rest):
                             the evidence of explanations
      metrics.json           validation (and test) metrics, overall and per scenario
      retrieval/             (retrieval.enabled) the two-tower model: model.safetensors, config.json,
                             metrics.json, items.faiss (index of item vectors), item_keys.parquet
                             (index position -> item key)
      manifest.json          version, weights digest, data fingerprint, library versions, git commit
      model_card.json, MODEL_CARD.md

Written by `export_artifact` from any trained folder (a `train` seed or the winning Tune trial);
read by `open_artifact` + `load_model` (serving, tests). The folder is written next to its final place and
renamed into it, so a reader never sees half an artifact.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.errors import McrError
from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.files import file_digest, replace_folder
from mcl_ray.core.provenance import git_commit, library_versions
from mcl_ray.core.stage import Marker, Stage, fingerprint
from mcl_ray.core.keys import key_array
from mcl_ray.data.splits import read_pairs, read_split
from mcl_ray.data.vocab import Vocabularies, encode_entities, entity_table
from mcl_ray.evaluate.summary import fairness_markdown
from mcl_ray.models.batch import Batch
from mcl_ray.models.item_index import INDEX, ItemIndex
from mcl_ray.models.weights import MODEL, load_trained

ARTIFACT_FORMAT = 1
MANIFEST = "manifest.json"
RETRIEVAL = "retrieval"
HISTORY = "history.parquet"
ITEM_KEYS = "item_keys.parquet"


class ArtifactError(McrError):
    """A folder that is not a usable model artifact; the message says what is missing."""


class ExportStage(Stage[Path]):
    """Package a trained folder (model.safetensors + config.json + metrics) as a serving artifact;
    reused while the weights, their metrics and the prepared data are unchanged."""

    name = "export"
    uses_ray = False

    def __init__(self, train_dir: Path, prepare_dir: Path, out_dir: Path, source: dict | None = None,
                 force: bool = False, quiet: bool = False):
        self.train_dir, self.prepare_dir, self.out_dir = Path(train_dir), Path(prepare_dir), Path(out_dir)
        for need in (self.train_dir / MODEL, self.train_dir / "config.json", self.prepare_dir / "feature_spec.json"):
            if not need.exists():
                raise ArtifactError(f"cannot export: {need} is missing")
        super().__init__(ExperimentConfig.model_validate_json((self.train_dir / "config.json").read_text()), force, quiet)
        self.spec = FeatureSpec.load(self.prepare_dir)
        self.source = source or {}
        # the run's retrieval model (mcl-ray train with retrieval.enabled) travels with the ranker
        rdir = self.run_root() / RETRIEVAL
        self.retrieval_dir = rdir if self.cfg.retrieval.enabled and (rdir / MODEL).exists() else None
        if self.cfg.retrieval.enabled and self.retrieval_dir is None:
            self.say(f"[yellow]retrieval.enabled but no retrieval model in {rdir}: the artifact ranks the whole "
                     "catalogue (train it with `mcl-ray train`)")

    @property
    def marker(self) -> Marker:
        return Marker(self.out_dir / "export.json")

    def data_fingerprint(self) -> str:
        return self.spec.data_fingerprint

    def run_root(self) -> Path:  # the run directory the trained folder belongs to
        return self.prepare_dir.parent

    def fingerprint(self) -> str:
        files = [self.train_dir / n for n in (MODEL, "metrics.json", "history.json")]
        if self.retrieval_dir is not None:
            files.append(self.retrieval_dir / MODEL)
        return fingerprint(ARTIFACT_FORMAT, self.spec.data_fingerprint, self.source,
                           [file_digest(f) if f.exists() else None for f in files])

    def load_cached(self) -> Path:
        return self.out_dir

    def compute(self, fp: str) -> Path:
        return _export(self.train_dir, self.prepare_dir, self.out_dir, self.cfg, self.spec, self.source,
                       self.retrieval_dir, say=self.say)


def export_artifact(train_dir: Path, prepare_dir: Path, out_dir: Path, source: dict | None = None,
                    force: bool = False, quiet: bool = False) -> Path:
    return ExportStage(train_dir, prepare_dir, out_dir, source, force, quiet).run()


def write_history(prepare_dir: Path, spec: FeatureSpec, path: Path, row_group: int = 16_384) -> None:
    """The train split's real rows (no synthetic ones) as (user_key, item_key, label), sorted by user;
    with history features also their time, scenario, item ids (and label buckets), sorted by time within a user
    (what serving builds a request's behaviour history from: data/history.py:UserHistory)."""
    import pyarrow.compute as pc

    # the item ids, and the label buckets when bucketed; with raters, the user ids too
    seq = list(dict.fromkeys(f.ids_of for f in spec.sequence + spec.raters if f.ids_of))
    extra = [spec.timestamp_column, spec.scenario_column, *seq] if seq else []
    t = read_split(prepare_dir, spec, "train", columns=[spec.user_key, spec.item_key, spec.label_column,
                                                       spec.provenance_column, *extra])
    t = t.filter(pc.equal(t[spec.provenance_column], 0)).drop_columns([spec.provenance_column])
    t = pa.table({spec.user_key: key_array(t[spec.user_key]), spec.item_key: key_array(t[spec.item_key]),
                  "label": t[spec.label_column].cast(pa.float32()), **{c: t[c] for c in extra}})
    order = [(spec.user_key, "ascending")] + ([(spec.timestamp_column, "ascending")] if seq else [])
    pq.write_table(t.sort_by(order), path, row_group_size=row_group)


def _export(train_dir: Path, prepare_dir: Path, out_dir: Path, cfg: ExperimentConfig, spec: FeatureSpec,
            source: dict, retrieval_dir: Path | None = None, say=print) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(train_dir / MODEL, tmp / MODEL)
    (tmp / "config.json").write_text(cfg.model_dump_json(indent=2))
    # the text tables too (LLM profiles: what the model's profile embeddings were made from)
    for name in ("feature_spec.json", spec.vocabularies, spec.users_table, spec.items_table,
                 *(tf.table for tf in spec.text.values())):
        if name and (prepare_dir / name).exists() and not (tmp / name).exists():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(prepare_dir / name, tmp / name)
    seen = read_pairs(prepare_dir, spec, spec.splits)
    pq.write_table(seen, tmp / "seen.parquet")
    write_history(prepare_dir, spec, tmp / HISTORY)
    if retrieval_dir is not None:
        index = export_retrieval(retrieval_dir, prepare_dir, tmp / RETRIEVAL, cfg, spec, seen[spec.item_key])
        say(f"retrieval index: {len(index):,} items, {index.kind} ({tmp.name}/{RETRIEVAL}/{INDEX})")

    history = json.loads((train_dir / "history.json").read_text()) if (train_dir / "history.json").exists() else []
    best = max(history, key=lambda h: h["val_auc"]) if history else {}
    metrics = {"valid": {"overall": {"auc": best.get("val_auc")},
                         "by_scenario": {k.split("/", 1)[1]: {"auc": v} for k, v in best.items()
                                         if k.startswith("val_auc/")},
                         "best_epoch": best.get("epoch")}}
    if (train_dir / "metrics.json").exists():
        metrics["test"] = json.loads((train_dir / "metrics.json").read_text())
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))

    digest = file_digest(tmp / MODEL)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "version": f"{cfg.name}-{digest[:12]}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": digest,
        "data_fingerprint": spec.data_fingerprint,
        "backbone": cfg.model.backbone,
        "retrieval": (retrieval_dir is not None),
        "source": {"train_dir": str(train_dir.resolve()), **(source or {})},
        "libraries": library_versions(),
        "git_commit": git_commit(Path(__file__).parent),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    write_model_card(tmp, cfg, spec, manifest, metrics)
    replace_folder(tmp, out_dir)
    return out_dir


def export_retrieval(rdir: Path, prepare_dir: Path, out: Path, cfg: ExperimentConfig, spec: FeatureSpec,
                     seen_items: pa.ChunkedArray, chunk: int = 65_536) -> ItemIndex:
    """The retrieval model's weights and config, and the index of its item vectors over the serving
    catalogue (the items the ranking model has an id for), built in chunks of `chunk` items."""
    out.mkdir(parents=True)
    rcfg = ExperimentConfig.model_validate_json((rdir / "config.json").read_text())
    shutil.copy2(rdir / MODEL, out / MODEL)
    (out / "config.json").write_text(rcfg.model_dump_json(indent=2))
    if (rdir / "metrics.json").exists():
        shutil.copy2(rdir / "metrics.json", out / "metrics.json")
    model = load_trained(spec, rcfg.model, rdir / MODEL)
    vocabs = Vocabularies.load(prepare_dir, spec)
    items = entity_table(pq.read_table(prepare_dir / spec.items_table) if spec.items_table else None, "item_id",
                         vocabs, seen_items)
    keys, cols = encode_entities(items, "item_id", spec, vocabs, "item")
    keep = cols["item_id"] > 0
    cols = {n: v[keep] for n, v in cols.items()}
    keys = [k for k, m in zip(keys, keep) if m]
    cat, num = [f.name for f in spec.categorical], [f.name for f in spec.numeric]
    with torch.no_grad():
        vecs = [model.item_vectors(Batch.candidates(cat, num, cols, [({}, np.arange(a, min(a + chunk, len(keys))), 0)]))
                for a in range(0, len(keys), chunk)]
    vectors = torch.cat(vecs).numpy() if vecs else np.zeros((0, model.dim), np.float32)
    r = cfg.retrieval
    index = ItemIndex.build(vectors, r.exact_below, r.hnsw_m, r.hnsw_ef_construction, r.hnsw_ef_search)
    index.save(out / INDEX)
    pq.write_table(pa.table({"item_key": pa.array(keys)}), out / ITEM_KEYS)
    return index


def write_model_card(folder: Path, cfg: ExperimentConfig, spec: FeatureSpec, manifest: dict, metrics: dict) -> None:
    test = metrics.get("test", {})
    card = {
        "name": cfg.name,
        "version": manifest["version"],
        "task": "binary click/like prediction per scenario, used for top-K recommendation",
        "backbone": cfg.model.backbone,
        "retrieval": manifest.get("retrieval", False),
        "scenarios": spec.scenario_names,
        "features": [{"name": f.name, "kind": f.kind, "source": f.source} for f in spec.features],
        "data": {"source": cfg.data.source, "rows": spec.num_rows, "fingerprint": spec.data_fingerprint},
        "label": cfg.prepare.label.model_dump(),
        "metrics": {"valid_auc": metrics["valid"]["overall"]["auc"],
                    "test_auc": test.get("overall", {}).get("auc"),
                    "test_auc_by_scenario": {k: v["auc"] for k, v in test.get("by_scenario", {}).items()},
                    "test_fairness": test.get("fairness")},
        "hyperparameters": {"model": cfg.model.model_dump(), "train": cfg.train.model_dump()},
        "limitations": "Trained offline on the data above; scores are calibrated to its label rate. "
                       "Users and items unseen in training get the OOV embedding (cold start from attributes).",
    }
    (folder / "model_card.json").write_text(json.dumps(_no_nan(card), indent=2))  # strict JSON: undefined -> null
    lines = [f"# Model card: {cfg.name}", "", f"- version: `{manifest['version']}`",
             f"- backbone: `{cfg.model.backbone}`", f"- data: `{cfg.data.source}`, rows {spec.num_rows}",
             f"- created: {manifest['created']}, git {manifest['git_commit']}", "",
             "| scenario | valid AUC | test AUC |", "|---|---|---|"]
    by_val = metrics["valid"]["by_scenario"]
    for s in spec.scenario_names:
        t = test.get("by_scenario", {}).get(s, {}).get("auc")
        v = by_val.get(s, {}).get("auc")
        lines.append(f"| {s} | {_f(v)} | {_f(t)} |")
    lines.append(f"| **overall** | {_f(metrics['valid']['overall']['auc'])} | {_f(test.get('overall', {}).get('auc'))} |")
    if test.get("fairness"):
        lines += ["", "## Fairness by user group (test)", ""] + fairness_markdown(test["fairness"])
    lines += ["", "## Hyperparameters", "", "```json", json.dumps(card["hyperparameters"], indent=1), "```", "",
              "## Limitations", "", card["limitations"], ""]
    (folder / "MODEL_CARD.md").write_text("\n".join(lines))


def _no_nan(x):
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


@dataclass
class Artifact:
    path: Path
    cfg: ExperimentConfig
    spec: FeatureSpec
    manifest: dict
    metrics: dict

    def file(self, name: str) -> Path:
        return self.path / name


def open_artifact(path: str | Path) -> Artifact:
    """Read and check an artifact folder (not the weights: `load_model` does that)."""
    p = Path(path)
    if not p.is_dir():
        raise ArtifactError(f"artifact folder not found: {p}")
    missing = [n for n in (MODEL, "config.json", "feature_spec.json", MANIFEST, "metrics.json") if not (p / n).exists()]
    if missing:
        raise ArtifactError(f"{p} is not a model artifact (missing {', '.join(missing)}); "
                            "create one with `mcl-ray export RUN_DIR` or `mcl-ray tune`")
    manifest = json.loads((p / MANIFEST).read_text())
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{p}: artifact format {manifest.get('format')} is not supported (expected {ARTIFACT_FORMAT})")
    return Artifact(p, ExperimentConfig.model_validate_json((p / "config.json").read_text()), FeatureSpec.load(p),
                    manifest, json.loads((p / "metrics.json").read_text()))


def load_model(art: Artifact):
    return load_trained(art.spec, art.cfg.model, art.file(MODEL))
