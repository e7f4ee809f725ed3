"""The prepare stage: validate -> fuse -> split -> fit vocabularies (train only) -> encode -> write.

Outputs under <run_dir>/prepare/:
  data/split={train,valid,test}/*.parquet   encoded rows (feature ids, label, scenario, weight, keys)
  users.parquet, items.parquet              validated attribute tables with their text field
  quarantine/{interactions,users,items}.parquet   rejected rows with _reason (policy quarantine)
  feature_spec.json, vocabs.json, stats.json, fingerprint.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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

from mcl_ray.config import ExperimentConfig, MovieLensSource, PrepareConfig, TablesSource
from mcl_ray.data import fuse, package_data, sources
from mcl_ray.feature_spec import Feature, FeatureSpec, TextField

log = logging.getLogger(__name__)

# Bump when the prepare logic changes what it writes: cached results are then recomputed.
PREPARE_VERSION = "2"
SPLITS = ("train", "valid", "test")


class DataValidationError(ValueError):
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


def fingerprint(cfg: ExperimentConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": PREPARE_VERSION, "data": cfg.data.model_dump(mode="json"),
                         "prepare": cfg.prepare.model_dump(mode="json")}, sort_keys=True).encode())
    for f in input_files(cfg):
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        except FileNotFoundError:
            h.update(f"{f}|missing".encode())
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------- pieces


def scenario_index(cfg: PrepareConfig, users: pd.DataFrame | None, items: pd.DataFrame | None,
                   interactions: ray.data.Dataset) -> tuple[list[str], dict[str, int]]:
    rule = cfg.scenario
    if rule.groups is not None:
        names = list(rule.groups)
        return names, {fuse.value_key(v): i for i, vals in enumerate(rule.groups.values()) for v in vals}
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
        names = sorted({k for k in fuse.keys_of(vals) if k is not None})
    return names, {n: i for i, n in enumerate(names)}


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


def key_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Arrow twin of fuse.keys_of: 25, 25.0 and '25' become the string '25' (vectorised in C++)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_boolean(t):
        col = pc.cast(col, pa.int64())
    elif pa.types.is_floating(t):
        valid = pc.drop_null(col)
        if len(valid) == 0 or pc.all(pc.equal(valid, pc.round(valid))).as_py():
            col = pc.cast(col, pa.int64())
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_large_string(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return pc.cast(col, pa.string())
    return pa.array(fuse.keys_of(col.to_pandas()), pa.string())


def profile_batch(batch: pa.Table, categorical: list[str], numeric: list[str]) -> pa.Table:
    """Partial aggregates of one batch: rejection reasons, split x scenario counts and train-split
    value counts / moments. Small output; the driver adds the partials up."""
    parts = []

    def part(kind, a, b, count, sum_=None, sumsq=None):
        n = len(count)
        parts.append(pa.table({
            "kind": pa.array([kind] * n, pa.string()), "a": pc.cast(a, pa.string()), "b": pc.cast(b, pa.string()),
            "count": pc.cast(count, pa.int64()),
            "sum": pc.cast(sum_, pa.float64()) if sum_ is not None else pa.array(np.zeros(n)),
            "sumsq": pc.cast(sumsq, pa.float64()) if sumsq is not None else pa.array(np.zeros(n))}))

    if "_reason" in batch.column_names:
        bad = pc.is_valid(batch["_reason"])
        if pc.any(bad).as_py():
            vc = pc.value_counts(pc.drop_null(batch["_reason"]))
            part("reason", vc.field("values"), pa.array([""] * len(vc), pa.string()), vc.field("counts"))
            batch = batch.filter(pc.invert(bad))
    g = batch.group_by(["split", "scenario"]).aggregate([("label", "count"), ("label", "sum")])
    part("stat", g["split"], g["scenario"], g["label_count"], g["label_sum"])
    train = batch.filter(pc.equal(batch["split"], "train"))
    for f in categorical:
        vc = pc.value_counts(pc.drop_null(key_array(train[f])))
        part("cat", pa.array([f] * len(vc), pa.string()), vc.field("values"), vc.field("counts"))
    for f in numeric:
        x = pc.drop_null(pc.cast(train[f], pa.float64()))
        part("num", pa.array([f]), pa.array([""]), pa.array([len(x)]),
             pa.array([pc.sum(x).as_py() or 0.0]), pa.array([pc.sum(pc.multiply(x, x)).as_py() or 0.0]))
    return pa.concat_tables(parts)


def fit_vocabs(profile: pd.DataFrame, cfg_cat: dict[str, int]) -> dict[str, list[str]]:
    """Vocabulary per feature: train values with count >= min_count, by count desc then value.

    Id 0 is reserved for out-of-vocabulary, unseen and null values, so list position i -> id i+1."""
    cat = profile[profile["kind"] == "cat"].groupby(["a", "b"], as_index=False)["count"].sum()
    vocabs = {}
    for f, min_count in cfg_cat.items():
        sub = cat[(cat["a"] == f) & (cat["count"] >= min_count)]
        sub = sub.sort_values(["count", "b"], ascending=[False, True])
        vocabs[f] = sub["b"].tolist()
    return vocabs


def fit_numeric(profile: pd.DataFrame, numeric: list[str]) -> dict[str, tuple[float, float]]:
    """Train-split mean and std per numeric feature from the summed partial moments (std 0 -> 1)."""
    out = {}
    for f in numeric:
        row = profile[(profile["kind"] == "num") & (profile["a"] == f)][["count", "sum", "sumsq"]].sum()
        n = max(float(row["count"]), 1.0)
        mean = float(row["sum"]) / n
        out[f] = (mean, float(np.sqrt(max(float(row["sumsq"]) / n - mean * mean, 0.0))) or 1.0)
    return out


def encode_batch(batch: pa.Table, vocabs: dict[str, pa.Array], numeric: dict[str, tuple[float, float]]) -> pa.Table:
    """Categorical values -> ids (vocab position + 1; 0 = OOV), numeric -> z-scores, plus bookkeeping."""
    if "_reason" in batch.column_names:
        batch = batch.filter(pc.is_null(batch["_reason"]))
    n = batch.num_rows
    cols = {
        "user_key": key_array(batch["user_id"]),
        "item_key": key_array(batch["item_id"]),
        "timestamp": pc.cast(batch["timestamp"], pa.int64()),
    }
    for f, vocab in vocabs.items():
        idx = pc.index_in(key_array(batch[f]), value_set=vocab)
        cols[f] = pc.cast(pc.add(pc.fill_null(idx, -1), 1), pa.int64())
    for f, (mean, std) in numeric.items():
        z = pc.divide(pc.subtract(pc.cast(batch[f], pa.float64()), mean), std)
        cols[f] = pc.cast(pc.fill_null(z, 0.0), pa.float32())
    cols["scenario"] = pc.cast(batch["scenario"], pa.int64())
    cols["label"] = pc.cast(batch["label"], pa.float32())
    cols["weight"] = pa.array(np.ones(n, np.float32))
    cols["is_synthetic"] = pa.array(np.zeros(n, np.int8))
    cols["split"] = batch["split"]
    return pa.table(cols)


def _examples_text(rows: list[dict], limit: int) -> str:
    lines = []
    for r in rows[:limit]:
        where = f" [{r['_source']}]" if r.get("_source") else ""
        lines.append(f"      {r['_raw']}{where}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stage


def prepare(cfg: ExperimentConfig, out_dir: str | Path | None = None, force: bool = False,
            console=None) -> PrepareResult:
    from rich.console import Console

    console = console or Console(stderr=True)
    pc_cfg = cfg.prepare
    out = Path(out_dir) if out_dir else Path(cfg.resolved_run_dir()) / "prepare"
    fp = fingerprint(cfg)
    marker = out / "fingerprint.json"
    if not force and marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp:
        console.print(f"[green]prepare: inputs and config unchanged (fingerprint {fp}); reusing {out}")
        stats = json.loads((out / "stats.json").read_text())
        return PrepareResult(out, FeatureSpec.load(out / "feature_spec.json"), stats, cached=True)

    from mcl_ray.ray_env import tune_data_context

    tune_data_context()
    t0 = time.perf_counter()
    step = _Steps(console)
    step("reading source", cfg.data.source)
    raw = sources.load_source(cfg.data)

    step("validating users and items")
    quarantine: dict[str, pd.DataFrame] = {}
    rows_in: dict[str, int] = {}
    users = items = None
    for what, table, key in (("users", raw.users, "user_id"), ("items", raw.items, "item_id")):
        if table is None:
            continue
        if table.num_rows == 0:
            raise DataValidationError(f"{what} table is empty ({raw.origins.get(what)})")
        kept, bad = fuse.validate_keyed_table(table, key, what)
        rows_in[what] = table.num_rows
        quarantine[what] = bad
        if what == "users":
            users = kept
        else:
            items = kept

    inter_columns = raw.interaction_columns()
    if not inter_columns:  # a header-only CSV or an empty folder has no schema at all
        raise DataValidationError(f"interactions are empty ({raw.origins.get('interactions')})")
    names, scen_index = scenario_index(pc_cfg, users, items, raw.interactions)
    categorical = {f.name: f.min_count for f in pc_cfg.categorical}
    categorical.update({c: 1 for c in pc_cfg.context})
    plan = fuse.plan_fusion(pc_cfg, [c for c in inter_columns if c != "path"], users, items, scen_index)
    if pc_cfg.text is not None:  # fail on a bad template before the long pass
        if items is not None:
            fuse.render_text(items.head(1), pc_cfg.text.item, "item")
        if users is not None:
            fuse.render_text(users.head(1), pc_cfg.text.user, "user")

    step("validating and fusing interactions", "(Ray Data map_batches)")
    checked = raw.interactions.map_batches(fuse.fuse_batch, fn_kwargs={"plan": plan}, batch_format="pyarrow",
                                           batch_size=65_536).materialize()
    rows_in["interactions"] = checked.count()
    if rows_in["interactions"] == 0:
        raise DataValidationError(f"interactions are empty ({raw.origins.get('interactions')})")
    step("profiling: rejection reasons, split sizes, train-split vocabularies")
    kwargs = {"categorical": list(categorical), "numeric": list(pc_cfg.numeric)}
    prof = checked.map_batches(profile_batch, batch_format="pyarrow", fn_kwargs=kwargs).to_pandas()
    rows = checked
    if pc_cfg.split.kind == "temporal":
        step("temporal split", pc_cfg.split.temporal_mode)
        rows = assign_temporal(checked.map_batches(_good_rows, batch_format="pyarrow"), pc_cfg).materialize()
        prof = pd.concat([prof[prof["kind"] == "reason"],
                          rows.map_batches(profile_batch, batch_format="pyarrow", fn_kwargs=kwargs).to_pandas()])
    reason_counts: dict[str, dict[str, int]] = {w: q["_reason"].value_counts().to_dict() for w, q in quarantine.items()}
    reason_counts["interactions"] = {
        str(k): int(v) for k, v in prof[prof["kind"] == "reason"].groupby("a")["count"].sum().items()}
    total_bad = sum(sum(v.values()) for v in reason_counts.values())
    bad_ds = checked.map_batches(_bad_rows, batch_format="pyarrow").materialize() if reason_counts["interactions"] \
        else None
    if total_bad and pc_cfg.validation.policy == "fail":
        raise DataValidationError(_failure_message(reason_counts, quarantine, bad_ds, raw.origins,
                                                   pc_cfg.validation.max_examples))

    vocabs = fit_vocabs(prof, categorical)
    numeric_stats = fit_numeric(prof, list(pc_cfg.numeric))
    split_stats = prof[prof["kind"] == "stat"].groupby(["a", "b"], as_index=False)[["count", "sum"]].sum()
    rows_kept = int(split_stats["count"].sum())
    if rows_kept == 0:
        raise DataValidationError("no interaction passed validation; see the quarantine counts")
    if not (split_stats["a"] == "train").any():
        raise DataValidationError("the train split is empty; check prepare.split")

    step("encoding and writing parquet shards")
    if out.exists():
        shutil.rmtree(out)
    (out / "quarantine").mkdir(parents=True)
    vocab_arrays = {f: pa.array(vs, pa.string()) for f, vs in vocabs.items()}
    rows.map_batches(encode_batch, batch_format="pyarrow",
                     fn_kwargs={"vocabs": vocab_arrays, "numeric": numeric_stats}).write_parquet(
        str((out / "data").resolve()), partition_cols=["split"])
    n_quarantined = {"interactions": int(sum(reason_counts["interactions"].values()))}
    if bad_ds is not None:
        bad_ds.select_columns(["_reason", "_raw", "_source", "user_id", "item_id"]).write_parquet(
            str((out / "quarantine" / "interactions").resolve()))
    for what, q in quarantine.items():
        n_quarantined[what] = len(q)
        if len(q):
            q.to_parquet(out / "quarantine" / f"{what}.parquet", index=False)

    text_fields = {}
    for what, frame, key in (("users", users, "user_id"), ("items", items, "item_id")):
        if frame is None:
            continue
        frame = frame.reset_index(drop=True)
        if what == "items":  # derived item features (first_genre), so serving/ranking can encode items
            frame = fuse.with_derived(frame, plan.derived)
        if pc_cfg.text is not None:
            template = pc_cfg.text.user if what == "users" else pc_cfg.text.item
            frame["text"] = fuse.render_text(frame, template, what[:-1])
            text_fields[what[:-1]] = TextField(key=key, table=f"{what}.parquet", template=template)
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), out / f"{what}.parquet")

    # ---- stats, invariant, spec
    per = {s: {"rows": 0, "positives": 0, "by_scenario": {}} for s in SPLITS}
    for _, r in split_stats.iterrows():
        d = per.setdefault(r["a"], {"rows": 0, "positives": 0, "by_scenario": {}})
        name = names[int(r["b"])]
        d["by_scenario"][name] = {"rows": int(r["count"]), "positives": int(r["sum"]),
                                  "positive_rate": round(float(r["sum"]) / max(int(r["count"]), 1), 4)}
        d["rows"] += int(r["count"])
        d["positives"] += int(r["sum"])
    for d in per.values():
        d["positive_rate"] = round(d["positives"] / max(d["rows"], 1), 4)
    kept = {"interactions": rows_kept, "users": len(users) if users is not None else 0,
            "items": len(items) if items is not None else 0}
    invariant = {}
    for what in rows_in:
        ok = rows_in[what] == kept[what] + n_quarantined[what]
        invariant[what] = {"rows_in": rows_in[what], "rows_kept": kept[what], "rows_quarantined": n_quarantined[what],
                           "holds": ok}
        if not ok:
            raise RuntimeError(f"internal error: {what}: rows_in {rows_in[what]} != kept {kept[what]} + "
                               f"quarantined {n_quarantined[what]}")
    stats = {
        "fingerprint": fp,
        "source": raw.origins,
        "rows": invariant,
        "quarantine_reasons": reason_counts,
        "splits": per,
        "scenarios": names,
        "vocab_sizes": {f: len(v) + 1 for f, v in vocabs.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    features = []
    for f in categorical:
        features.append(Feature(name=f, kind="categorical", source=_source_of(f, plan),
                                vocab_size=len(vocabs[f]) + 1, min_count=categorical[f]))
    for f, (mean, std) in numeric_stats.items():
        features.append(Feature(name=f, kind="numeric", source=_source_of(f, plan), mean=mean, std=std))
    spec = FeatureSpec(
        features=features, scenario_names=names, text=text_fields,
        splits={s: f"data/split={s}" for s in SPLITS if per[s]["rows"]},
        num_rows={s: per[s]["rows"] for s in SPLITS},
        users_table="users.parquet" if users is not None else None,
        items_table="items.parquet" if items is not None else None,
        data_fingerprint=fp,
    )
    spec.save(out / "feature_spec.json")
    (out / "vocabs.json").write_text(json.dumps(vocabs, ensure_ascii=False))
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    (out / "fingerprint.json").write_text(json.dumps({"fingerprint": fp, "version": PREPARE_VERSION}))
    step.done()
    return PrepareResult(out, spec, stats, cached=False)


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


class _Steps:
    """Numbered stage lines with elapsed time, so long runs show where they are."""

    def __init__(self, console):
        self.console, self.n, self.t0 = console, 0, time.perf_counter()

    def __call__(self, what: str, detail: str = "") -> None:
        self.n += 1
        self.console.print(f"[bold cyan]prepare[{self.n}][/] {what} {detail}  "
                           f"[dim](+{time.perf_counter() - self.t0:.1f}s)[/]")

    def done(self) -> None:
        self.console.print(f"[bold green]prepare done[/] in {time.perf_counter() - self.t0:.1f}s")
