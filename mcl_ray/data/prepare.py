"""The prepare stage: validate -> fuse -> split -> fit vocabularies (train only) -> encode -> write.

Outputs under <run_dir>/prepare/:
  data/split={train,valid,test}/*.parquet   encoded rows (feature ids, label, scenario, weight, keys)
  users.parquet, items.parquet              validated attribute tables with their text field
  quarantine/{interactions,users,items}.parquet   rejected rows with _reason (policy quarantine)
  feature_spec.json, vocabs.json, stats.json, fingerprint.json
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from mcl_ray.core.errors import DataError
from mcl_ray.core.config import ExperimentConfig, MovieLensSource, PrepareConfig, TablesSource
from mcl_ray.core.keys import key_array, keys_of, value_key
from mcl_ray.core.ray_env import tune_data_context
from mcl_ray.core.stage import Marker, Stage, fingerprint
from mcl_ray.data import csv_tables, fuse, history, package_data, sources
from mcl_ray.data.vocab import hashed_ids, ids_of, zscores
from mcl_ray.core.feature_spec import Feature, FeatureSpec, TextField

log = logging.getLogger(__name__)

# Bump when the prepare logic changes what it writes: cached results are then recomputed.
PREPARE_VERSION = "2"
SPLITS = ("train", "valid", "test")


class DataValidationError(DataError):
    """Bad input rows under policy 'fail'; the message names table, source, column, count, examples."""


@dataclass
class PrepareResult:
    out_dir: Path
    spec: FeatureSpec
    stats: dict
    cached: bool


# ----------------------------------------------------------------------------- fingerprint


def input_files(cfg: ExperimentConfig) -> list[str]:
    src = cfg.data
    if isinstance(src, MovieLensSource):
        if src.path:
            return sorted(str(p) for p in Path(src.path).glob("*") if p.is_file())
        folder = package_data.locate(package_data.PACKAGES[src.source])
        return sorted(str(p) for p in folder.glob("*") if p.is_file())
    if isinstance(src, TablesSource):
        refs = [r for r in (src.interactions, src.users, src.items) if r is not None]
        return [f for r in refs for f in sources._files_of(r.path)]
    return []


def prepare_fingerprint(cfg: ExperimentConfig) -> str:
    # without history (or label buckets) the prepared data is what it was before the option existed:
    # caches stay valid
    hc = cfg.prepare.history
    unset = set() if hc is None else ({"label_buckets"} if hc.label_buckets is None else set()) | (
        {"raters", "user_feature"} if not hc.raters else set())
    prep = cfg.prepare.model_dump(mode="json", exclude={"history"} if hc is None else {"history": unset} if unset
                                  else None)
    if not cfg.prepare.label.soft:  # an option added later: data prepared without it keeps its fingerprint
        del prep["label"]["soft"]
    return fingerprint({"v": PREPARE_VERSION, "data": cfg.data.model_dump(mode="json"), "prepare": prep},
                       files=input_files(cfg))


def stale_prepare(cfg: ExperimentConfig, prepare_dir: Path) -> str | None:
    """None when prepare_dir was made from this config's data and prepare sections (and unchanged input
    files), else a warning saying so: `train` and the other stages use the folder as it is, and a
    changed prepare.* key (a rating range, a threshold, a history length) would silently not apply."""
    got = Marker(Path(prepare_dir) / "fingerprint.json").read()
    if got is None or got.get("fingerprint") == prepare_fingerprint(cfg):
        return None
    return (f"{prepare_dir} was prepared from other data, another prepare config or changed input files than this "
            "config's: it is used as it is, so changed data.* / prepare.* keys do not apply; run `mcl-ray prepare` "
            "with this config to rebuild it (`mcl-ray run` does it)")


# ----------------------------------------------------------------------------- pieces


def scenario_index(cfg: PrepareConfig, users: pd.DataFrame | None, items: pd.DataFrame | None,
                   interactions: ray.data.Dataset) -> tuple[list[str], dict[str, int]]:
    rule = cfg.scenario
    if rule.groups is not None:
        names = list(rule.groups)
        return names, {value_key(v): i for i, vals in enumerate(rule.groups.values()) for v in vals}
    if rule.names is not None:
        names = list(rule.names)
    else:
        col = rule.column
        if users is not None and col in users.columns:
            vals = users[col]
        elif items is not None and col in items.columns:
            vals = items[col]
        elif col in interactions.columns():
            vals = pd.Series(interactions.unique(col))
        else:
            raise fuse.FusionError(f"prepare.scenario.column {col!r} is in no table")
        names = scenario_order({k for k in keys_of(vals) if k is not None})
    return names, {n: i for i, n in enumerate(names)}


def scenario_order(keys) -> list[str]:
    """Scenario names in order: numerically when all are numbers (1, 2, ..., 10), else as text."""
    try:
        return sorted(keys, key=lambda k: (float(k), k))
    except ValueError:
        return sorted(keys)


def _bad_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["_reason"]))


def _good_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["_reason"])).drop_columns(["_reason", "_raw", "_source"])


def assign_temporal(ds: ray.data.Dataset, cfg: PrepareConfig) -> ray.data.Dataset:
    if cfg.split.temporal_mode == "leave_last_out":
        def last_out(g: pd.DataFrame) -> pd.DataFrame:
            g = g.sort_values(["timestamp", "item_id"], kind="stable").reset_index(drop=True)
            split = np.full(len(g), "train", dtype=object)
            if len(g) >= 2:
                split[-1] = "test"
            if len(g) >= 3:
                split[-2] = "valid"
            g["split"] = split
            return g

        return ds.groupby("user_id").map_groups(last_out, batch_format="pandas")
    ts = np.concatenate([b["timestamp"] for b in ds.select_columns(["timestamp"]).iter_batches(
        batch_format="numpy", batch_size=None)])
    r = cfg.split.ratios
    t1, t2 = np.quantile(ts, [r[0], r[0] + r[1]])

    def cut(batch: pd.DataFrame) -> pd.DataFrame:
        t = batch["timestamp"].to_numpy()
        batch["split"] = np.where(t < t1, "train", np.where(t < t2, "valid", "test")).astype(object)
        return batch

    return ds.map_batches(cut, batch_format="pandas")


PROFILE_SCHEMA = pa.schema([
    ("kind", pa.string()),  # reason | split | categorical | numeric
    ("reason", pa.string()),  # kind reason: "problem:column" of rejected rows
    ("split", pa.string()), ("scenario", pa.string()),  # kind split: rows and positives per (split, scenario)
    ("feature", pa.string()), ("value", pa.string()),  # kind categorical: train count of a value; numeric: moments
    ("count", pa.int64()), ("sum", pa.float64()), ("sumsq", pa.float64()),
])


def profile_batch(batch: pa.Table, categorical: list[str], numeric: list[str]) -> pa.Table:
    """Partial aggregates of one batch (PROFILE_SCHEMA): rejection reasons, rows per split x
    scenario, train-split value counts and numeric moments. Small; the driver adds them up."""
    parts = []

    def part(kind: str, count, sum_=None, sumsq=None, **cols) -> None:
        n = len(count)
        null = pa.nulls(n, pa.string())
        parts.append(pa.table({
            "kind": pa.array([kind] * n, pa.string()),
            **{c: pc.cast(cols[c], pa.string()) if c in cols else null for c in ("reason", "split", "scenario",
                                                                               "feature", "value")},
            "count": pc.cast(count, pa.int64()),
            "sum": pc.cast(sum_, pa.float64()) if sum_ is not None else pa.array(np.zeros(n)),
            "sumsq": pc.cast(sumsq, pa.float64()) if sumsq is not None else pa.array(np.zeros(n))},
            schema=PROFILE_SCHEMA))

    if "_reason" in batch.column_names:
        bad = pc.is_valid(batch["_reason"])
        if pc.any(bad).as_py():
            vc = pc.value_counts(pc.drop_null(batch["_reason"]))
            part("reason", vc.field("counts"), reason=vc.field("values"))
            batch = batch.filter(pc.invert(bad))
    g = batch.group_by(["split", "scenario"]).aggregate([("label", "count"), ("label", "sum")])
    part("split", g["label_count"], g["label_sum"], split=g["split"], scenario=g["scenario"])
    train = batch.filter(pc.equal(batch["split"], "train"))
    for f in categorical:
        vc = pc.value_counts(pc.drop_null(key_array(train[f])))
        part("categorical", vc.field("counts"), feature=pa.array([f] * len(vc), pa.string()), value=vc.field("values"))
    for f in numeric:
        x = pc.drop_null(pc.cast(train[f], pa.float64()))
        x = pc.filter(x, pc.invert(pc.is_nan(x)))  # a missing value may arrive as NaN rather than null
        part("numeric", pa.array([len(x)]), pa.array([pc.sum(x).as_py() or 0.0]),
             pa.array([pc.sum(pc.multiply(x, x)).as_py() or 0.0]), feature=pa.array([f]))
    return pa.concat_tables(parts)


PROFILE_KEYS = ["kind", "reason", "split", "scenario", "feature", "value"]


def combine_profiles(ds, compact_rows: int = 2_000_000) -> pd.DataFrame:
    """Add up the per-batch partial profiles as they stream in: the driver holds one row per
    distinct (kind, ..., value), not one per batch and value (20M rows of 2M users made 16M
    partial user_id counts; summed, they are 2M)."""
    def compact(parts: list[pa.Table]) -> pa.Table:
        t = pa.concat_tables(parts).group_by(PROFILE_KEYS, use_threads=False).aggregate(
            [("count", "sum"), ("sum", "sum"), ("sumsq", "sum")])
        return t.rename_columns({"count_sum": "count", "sum_sum": "sum", "sumsq_sum": "sumsq"}).select(
            PROFILE_SCHEMA.names)

    acc, pending, held = PROFILE_SCHEMA.empty_table(), [], 0
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        pending.append(b.cast(PROFILE_SCHEMA))
        held += b.num_rows
        if held > max(compact_rows, 2 * acc.num_rows):  # amortised: each compaction at least halves what is held
            acc, pending, held = compact([acc, *pending]), [], 0
    return compact([acc, *pending]).to_pandas()


def fit_vocabs(profile: pd.DataFrame, cfg_cat: dict[str, int]) -> dict[str, list[str]]:
    """Vocabulary per feature: train values with count >= min_count, by count desc then value.

    Id 0 is reserved for out-of-vocabulary, unseen and null values, so list position i -> id i+1."""
    cat = profile[profile["kind"] == "categorical"].groupby(["feature", "value"], as_index=False)["count"].sum()
    vocabs = {}
    for f, min_count in cfg_cat.items():
        sub = cat[(cat["feature"] == f) & (cat["count"] >= min_count)]
        sub = sub.sort_values(["count", "value"], ascending=[False, True])
        vocabs[f] = sub["value"].tolist()
    return vocabs


def fit_numeric(profile: pd.DataFrame, numeric: list[str]) -> dict[str, tuple[float, float]]:
    """Train-split mean and std per numeric feature from the summed partial moments (std 0 -> 1)."""
    out = {}
    for f in numeric:
        row = profile[(profile["kind"] == "numeric") & (profile["feature"] == f)][["count", "sum", "sumsq"]].sum()
        n = max(float(row["count"]), 1.0)
        mean = float(row["sum"]) / n
        out[f] = (mean, float(np.sqrt(max(float(row["sumsq"]) / n - mean * mean, 0.0))) or 1.0)
    return out


def encode_batch(batch: pa.Table, vocabs: dict[str, pa.Array], numeric: dict[str, tuple[float, float]],
                 hashed: dict[str, int] | None = None) -> pa.Table:
    """Categorical values -> ids (vocab position + 1; 0 = OOV), numeric -> z-scores, plus the
    bookkeeping columns the feature spec names (keys, timestamp, scenario, label, weight, provenance)."""
    col = FeatureSpec.column
    if "_reason" in batch.column_names:
        batch = batch.filter(pc.is_null(batch["_reason"]))
    n = batch.num_rows
    cols = {
        col("user_key"): key_array(batch["user_id"]),
        col("item_key"): key_array(batch["item_id"]),
        col("timestamp_column"): pc.cast(batch["timestamp"], pa.int64()),
    }
    for f, vocab in vocabs.items():
        cols[f] = ids_of(batch[f], vocab)
    for f, buckets in (hashed or {}).items():
        cols[f] = hashed_ids(batch[f], buckets)
    for f, (mean, std) in numeric.items():
        cols[f] = zscores(batch[f], mean, std)  # missing: the train mean
    cols[col("scenario_column")] = pc.cast(batch["scenario"], pa.int64())
    cols[col("label_column")] = pc.cast(batch["label"], pa.float32())
    if history.BUCKET in batch.column_names:  # prepare.history.label_buckets: the label source's bucket
        cols[history.BUCKET] = pc.cast(batch[history.BUCKET], pa.int8())
    if history.SOFT in batch.column_names:  # prepare.label.soft
        cols[history.SOFT] = pc.cast(batch[history.SOFT], pa.float32())
    cols[col("weight_column")] = pa.array(np.ones(n, np.float32))
    cols[col("provenance_column")] = pa.array(np.zeros(n, np.int8))
    cols["split"] = batch["split"]
    return pa.table(cols)


def _examples_text(rows: list[dict], limit: int) -> str:
    lines = []
    for r in rows[:limit]:
        where = f" [{r['_source']}]" if r.get("_source") else ""
        lines.append(f"      {r['_raw']}{where}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stage


class PrepareStage(Stage[PrepareResult]):
    """validate users/items -> fuse + validate interactions (Ray Data) -> profile -> fit vocabularies
    and numeric moments (train split only) -> write encoded shards, quarantine, tables, spec, stats."""

    name = "prepare"

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None, force: bool = False,
                 quiet: bool = False):
        super().__init__(cfg, force, quiet)
        self.out = Path(out_dir) if out_dir else Path(cfg.resolved_run_dir()) / "prepare"
        self.pc = cfg.prepare

    @property
    def marker(self) -> Marker:
        return Marker(self.out / "fingerprint.json")

    def marker_extra(self) -> dict:
        return {"version": PREPARE_VERSION}

    def fingerprint(self) -> str:
        return prepare_fingerprint(self.cfg)

    def data_fingerprint(self) -> str:  # what this stage writes is the data fingerprint
        return prepare_fingerprint(self.cfg)

    def load_cached(self) -> PrepareResult:
        spec = FeatureSpec.load(self.out)
        if spec.soft_label_column and spec.soft_label_range is None:  # prepared before the spec recorded it:
            # the fingerprint matched, and it covers rating_range, so this config's range is the one used
            spec.soft_label_range = tuple(self.pc.validation.rating_range)
            spec.save(self.out / "feature_spec.json")
        return PrepareResult(self.out, spec, json.loads((self.out / "stats.json").read_text()), cached=True)

    def compute(self, fp: str) -> PrepareResult:
        tune_data_context()
        self.step("reading source", self.cfg.data.source)
        raw = sources.load_source(self.cfg.data)
        self.step("validating users and items")
        users, items, quarantine, rows_in = self._validate_entities(raw)
        plan, names = self._plan(raw, users, items)

        self.step("validating and fusing interactions", "(Ray Data map_batches)")
        checked = raw.interactions.map_batches(fuse.fuse_batch, fn_kwargs={"plan": plan}, batch_format="pyarrow",
                                               batch_size=65_536).materialize()
        rows_in["interactions"] = checked.count()
        if rows_in["interactions"] == 0:
            raise DataValidationError(f"interactions are empty ({raw.origins.get('interactions')})")
        self.step("profiling: rejection reasons, split sizes, train-split vocabularies")
        rows, prof = self._profile(checked)

        reason_counts: dict[str, dict[str, int]] = {w: q["_reason"].value_counts().to_dict()
                                                    for w, q in quarantine.items()}
        reason_counts["interactions"] = {str(k): int(v) for k, v in
                                         prof[prof["kind"] == "reason"].groupby("reason")["count"].sum().items()}
        bad_ds = checked.map_batches(_bad_rows, batch_format="pyarrow").materialize() \
            if reason_counts["interactions"] else None
        if sum(sum(v.values()) for v in reason_counts.values()) and self.pc.validation.policy == "fail":
            raise DataValidationError(_failure_message(reason_counts, quarantine, bad_ds, raw.origins,
                                                       self.pc.validation.max_examples))

        categorical = self._categorical()
        vocabs = fit_vocabs(prof, {f: m for f, m in categorical.items() if f not in self._hashed()})
        numeric_stats = fit_numeric(prof, list(self.pc.numeric))
        per_split = split_summary(prof, names)
        if not sum(d["rows"] for d in per_split.values()):
            raise DataValidationError("no interaction passed validation; see the quarantine counts")
        if not per_split["train"]["rows"]:
            raise DataValidationError("the train split is empty; check prepare.split")

        self.step("encoding and writing parquet shards")
        if self.out.exists():
            shutil.rmtree(self.out)
        (self.out / "quarantine").mkdir(parents=True)
        encoded = rows.map_batches(encode_batch, batch_format="pyarrow",
                                   fn_kwargs={"vocabs": {f: pa.array(vs, pa.string()) for f, vs in vocabs.items()},
                                              "numeric": numeric_stats, "hashed": self._hashed()})
        hc = self.pc.history
        if hc is not None:
            self.step("behaviour history", f"last {hc.length} train interactions per row (Ray Data groupby user)")
            # as many partitions as blocks came in (Ray's default of 200 writes 200 tiny files per split)
            encoded = encoded.groupby(FeatureSpec.column("user_key"), num_partitions=max(1, rows.num_blocks())).map_groups(
                history.add_history, batch_format="pyarrow",
                fn_kwargs={"length": hc.length, "item_feature": hc.item_feature,
                           "bucketed": hc.label_buckets is not None})
            if hc.raters:
                self.step("item-side behaviour", f"last {hc.raters} train raters of each row's item (Ray Data groupby "
                          "item)")
                encoded = encoded.groupby(hc.item_feature, num_partitions=max(1, rows.num_blocks())).map_groups(
                    history.add_raters, batch_format="pyarrow",
                    fn_kwargs={"length": hc.raters, "user_feature": hc.user_feature,
                               "bucketed": hc.label_buckets is not None})
        encoded.write_parquet(str((self.out / "data").resolve()), partition_cols=["split"])
        n_quarantined = self._write_quarantine(bad_ds, quarantine, reason_counts)
        text_fields = self._write_entity_tables(users, items, plan)

        kept = {"interactions": sum(d["rows"] for d in per_split.values()),
                "users": len(users) if users is not None else 0, "items": len(items) if items is not None else 0}
        stats = {
            "fingerprint": fp, "source": raw.origins, "rows": row_invariant(rows_in, kept, n_quarantined),
            "quarantine_reasons": reason_counts, "splits": per_split, "scenarios": names,
            "vocab_sizes": {f: len(vocabs[f]) + 1 if f in vocabs else self._hashed()[f] + 1 for f in categorical},
            "seconds": round(time.perf_counter() - self.t0, 2),
        }
        hashed = self._hashed()
        features = [Feature(name=f, kind="categorical", source=_source_of(f, plan), min_count=categorical[f],
                            vocab_size=hashed[f] + 1 if f in hashed else len(vocabs[f]) + 1,
                            hash_buckets=hashed.get(f)) for f in categorical]
        features += [Feature(name=f, kind="numeric", source=_source_of(f, plan), mean=mean, std=std)
                     for f, (mean, std) in numeric_stats.items()]
        if hc is not None:
            item = next(f for f in features if f.name == hc.item_feature)
            features += history.sequence_features(item, hc.length, len(names), hc.label_buckets)
            if hc.raters:
                user = next(f for f in features if f.name == hc.user_feature)
                features += history.rater_features(user, hc.raters, hc.label_buckets)
        spec = FeatureSpec(
            features=features, scenario_names=names, text=text_fields,
            splits={s: f"data/split={s}" for s in SPLITS if per_split[s]["rows"]},
            num_rows={s: per_split[s]["rows"] for s in SPLITS},
            users_table="users.parquet" if users is not None else None,
            items_table="items.parquet" if items is not None else None,
            data_fingerprint=fp, soft_label_column=history.SOFT if self.pc.label.soft else None,
            soft_label_range=tuple(self.pc.validation.rating_range) if self.pc.label.soft else None,
        )
        spec.save(self.out / "feature_spec.json")
        (self.out / "vocabs.json").write_text(json.dumps(vocabs, ensure_ascii=False))
        (self.out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
        self.say(f"[bold green]prepare done[/] in {time.perf_counter() - self.t0:.1f}s")
        return PrepareResult(self.out, spec, stats, cached=False)

    # ---- the jobs of compute, in order

    def _validate_entities(self, raw):
        """Users and items: keyed, de-duplicated, decodable. -> users, items, quarantine, rows_in."""
        quarantine: dict[str, pd.DataFrame] = {}
        rows_in: dict[str, int] = {}
        kept: dict[str, pd.DataFrame | None] = {"users": None, "items": None}
        for what, table, key in (("users", raw.users, "user_id"), ("items", raw.items, "item_id")):
            if table is None:
                continue
            if table.num_rows == 0:
                raise DataValidationError(f"{what} table is empty ({raw.origins.get(what)})")
            kept[what], quarantine[what] = fuse.validate_keyed_table(table, key, what, numeric=list(self.pc.numeric))
            rows_in[what] = table.num_rows
        return kept["users"], kept["items"], quarantine, rows_in

    def _hashed(self) -> dict[str, int]:
        return {f.name: f.hash_buckets for f in self.pc.categorical if f.hash_buckets}

    def _categorical(self) -> dict[str, int]:
        categorical = {f.name: f.min_count for f in self.pc.categorical}
        categorical.update({c: 1 for c in self.pc.context})
        return categorical

    def _plan(self, raw, users, items) -> tuple[fuse.FusionPlan, list[str]]:
        """Which table gives each column, the scenario names; bad text templates fail here, early."""
        inter_columns = raw.interaction_columns()
        if not inter_columns:  # a header-only CSV or an empty folder has no schema at all
            raise DataValidationError(f"interactions are empty ({raw.origins.get('interactions')})")
        names, scen_index = scenario_index(self.pc, users, items, raw.interactions)
        reader_columns = {csv_tables.PATH, csv_tables.MALFORMED, csv_tables.LINE}
        plan = fuse.plan_fusion(self.pc, [c for c in inter_columns if c not in reader_columns], users, items,
                                scen_index)
        text = self.pc.text
        if text is not None:
            for frame, template, what in ((items, text.item, "item"), (users, text.user, "user")):
                if frame is not None and template is not None:
                    fuse.render_text(frame.head(1), template, what)
        return plan, names

    def _profile(self, checked):
        """-> (rows to write, profile frame). A temporal split is assigned here, before the profile of
        the kept rows (vocabularies come from its train split)."""
        # hashed features need no counts: 10M distinct ids never reach the driver
        kwargs = {"categorical": [f for f in self._categorical() if f not in self._hashed()],
                  "numeric": list(self.pc.numeric)}
        prof = combine_profiles(checked.map_batches(profile_batch, batch_format="pyarrow", fn_kwargs=kwargs))
        if self.pc.split.kind != "temporal":
            return checked, prof
        self.step("temporal split", self.pc.split.temporal_mode)
        rows = assign_temporal(checked.map_batches(_good_rows, batch_format="pyarrow"), self.pc).materialize()
        prof = pd.concat([prof[prof["kind"] == "reason"],
                          combine_profiles(rows.map_batches(profile_batch, batch_format="pyarrow", fn_kwargs=kwargs))])
        return rows, prof

    def _write_quarantine(self, bad_ds, quarantine, reason_counts) -> dict[str, int]:
        n = {"interactions": int(sum(reason_counts["interactions"].values()))}
        if bad_ds is not None:
            bad_ds.select_columns(["_reason", "_raw", "_source", "user_id", "item_id"]).write_parquet(
                str((self.out / "quarantine" / "interactions").resolve()))
        for what, q in quarantine.items():
            n[what] = len(q)
            if len(q):
                q.to_parquet(self.out / "quarantine" / f"{what}.parquet", index=False)
        return n

    def _write_entity_tables(self, users, items, plan) -> dict[str, TextField]:
        """users.parquet / items.parquet with their text field; -> the spec's text fields."""
        text_fields = {}
        for what, frame, key in (("users", users, "user_id"), ("items", items, "item_id")):
            if frame is None:
                continue
            frame = frame.reset_index(drop=True)
            if what == "items":  # derived item features (first_genre), so serving/ranking can encode items
                frame = fuse.with_derived(frame, plan.derived)
            template = None if self.pc.text is None else getattr(self.pc.text, what[:-1])
            if template is not None:
                frame["text"] = fuse.render_text(frame, template, what[:-1])
                text_fields[what[:-1]] = TextField(key=key, table=f"{what}.parquet", template=template)
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), self.out / f"{what}.parquet")
        return text_fields


def prepare(cfg: ExperimentConfig, out_dir: str | Path | None = None, force: bool = False,
            quiet: bool = False) -> PrepareResult:
    return PrepareStage(cfg, out_dir, force, quiet).run()


def split_summary(prof: pd.DataFrame, names: list[str]) -> dict[str, dict]:
    """Rows, positives and positive rate per split, and per scenario inside each split."""
    counts = prof[prof["kind"] == "split"].groupby(["split", "scenario"], as_index=False)[["count", "sum"]].sum()
    per = {s: {"rows": 0, "positives": 0, "by_scenario": {}} for s in SPLITS}
    for _, r in counts.iterrows():
        d = per.setdefault(r["split"], {"rows": 0, "positives": 0, "by_scenario": {}})
        d["by_scenario"][names[int(r["scenario"])]] = {
            "rows": int(r["count"]), "positives": int(r["sum"]),
            "positive_rate": round(float(r["sum"]) / max(int(r["count"]), 1), 4)}
        d["rows"] += int(r["count"])
        d["positives"] += int(r["sum"])
    for d in per.values():
        d["positive_rate"] = round(d["positives"] / max(d["rows"], 1), 4)
    return per


def row_invariant(rows_in: dict[str, int], kept: dict[str, int], quarantined: dict[str, int]) -> dict:
    """rows in = kept + quarantined, per table; a violation is a bug, never silently passed."""
    out = {}
    for what in rows_in:
        ok = rows_in[what] == kept[what] + quarantined[what]
        out[what] = {"rows_in": rows_in[what], "rows_kept": kept[what], "rows_quarantined": quarantined[what],
                     "holds": ok}
        if not ok:
            raise RuntimeError(f"internal error: {what}: rows_in {rows_in[what]} != kept {kept[what]} + "
                               f"quarantined {quarantined[what]}")
    return out


def _source_of(f: str, plan: fuse.FusionPlan) -> str:
    if f in plan.context:
        return "context"
    if f in plan.user_cols or f == "user_id":
        return "user"
    if f in plan.item_cols or f in plan.derived or f == "item_id":
        return "item"
    return "interaction"


def _failure_message(reason_counts, quarantine, bad_ds, origins, limit) -> str:
    lines = ["input validation failed (prepare.validation.policy = fail):"]
    for what, counts in reason_counts.items():
        for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            problem, _, column = reason.partition(":")
            lines.append(f"  {what} ({origins.get(what, '?')}): {n} rows with {problem} in column {column!r}; e.g.")
            if what == "interactions":
                ex = bad_ds.filter(lambda r, reason=reason: r["_reason"] == reason).take(limit)
            else:
                q = quarantine[what]
                ex = q[q["_reason"] == reason].head(limit).to_dict("records")
            lines.append(_examples_text(ex, limit))
    lines.append("Fix the input, or set prepare.validation.policy=quarantine to set these rows aside "
                 "(they are then written to <run>/prepare/quarantine/ with the reason per row).")
    return "\n".join(lines)
