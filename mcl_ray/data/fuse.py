"""Row-level validation and feature fusion, as pure functions over one batch.

The Ray Data path calls :func:`fuse_batch` inside ``map_batches``; the single-process reference
(bench/) calls the very same function on the whole table, so both compute the same thing.

A batch comes in as an Arrow table of canonical interaction columns and leaves as a pandas frame
with the fused columns plus ``_reason`` (null for a good row, ``problem:column`` otherwise) and,
for bad rows only, ``_raw`` (the original row as JSON) for the quarantine output.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mcl_ray.core.errors import ConfigError
from mcl_ray.core.config import LabelRule, PrepareConfig, ScenarioRule
from mcl_ray.core.keys import keys_of
from mcl_ray.data.csv_tables import LINE, MALFORMED
from mcl_ray.data.history import BUCKET, SOFT
from mcl_ray.data.synthetic import uniform

CONTEXT = ("hour", "weekday", "month")
DERIVED_ITEM = {"first_genre": "genres"}  # derived column -> item column it needs
REQUIRED = ("user_id", "item_id")  # plus the label column, and a timestamp when something needs time


class FusionError(ConfigError):
    """The config asks for a column that no table provides, or similar set-up problems."""


def undecodable(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Boolean mask of string values that are not valid UTF-8 (CSV read with check_utf8=False)."""
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return np.zeros(len(arr), dtype=bool)
    try:
        arr.validate(full=True)
        return np.zeros(len(arr), dtype=bool)
    except pa.ArrowInvalid:
        out = np.zeros(len(arr), dtype=bool)
        for i, b in enumerate(pc.cast(arr, pa.binary()).to_pylist()):
            if b is not None:
                try:
                    b.decode("utf-8")
                except UnicodeDecodeError:
                    out[i] = True
        return out


def sanitize_text(table: pa.Table) -> tuple[pa.Table, dict[str, np.ndarray], pa.Table]:
    """Replace undecodable strings by null.

    Returns (clean table, per-column masks for the reasons, the original with those columns as
    binary so that the quarantine can still show the raw bytes)."""
    masks: dict[str, np.ndarray] = {}
    raw = table
    for name in table.column_names:
        m = undecodable(table.column(name))
        if m.any():
            masks[name] = m
            i = table.column_names.index(name)
            col = pc.cast(table.column(name), pa.binary())
            raw = raw.set_column(i, name, col)
            fixed = pc.if_else(pa.array(m), pa.scalar(None, pa.binary()), col)
            table = table.set_column(i, name, pc.cast(fixed, pa.string()))
    return table, masks, raw


def _raw_json(table: pa.Table, rows: np.ndarray) -> list[str]:
    sub = table.take(pa.array(rows)) if len(rows) else table.slice(0, 0)
    out = []
    for rec in sub.to_pylist():
        out.append(json.dumps({k: (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v)
                               for k, v in rec.items()}, default=str, ensure_ascii=False))
    return out


def template_fields(template: str) -> list[str]:
    """Plain {name} fields of a text template; attribute/index access and conversions are refused."""
    names = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        # Column names as users have them ({Book-Author}, {release date}); only what str.format would
        # read as attribute/index access, a conversion or a format spec is refused.
        if not name.strip() or name.isdigit() or any(c in name for c in ".[]") or conv or spec:
            raise FusionError(f"text template field {{{name}}} must be a plain column name "
                              "(no '.', '[', ']', '!' conversion or ':' format spec)")
        names.append(name)
    return names


def render_text(frame: pd.DataFrame, template: str, what: str) -> list[str]:
    fields = template_fields(template)
    missing = [f for f in fields if f not in frame.columns]
    if missing:
        raise FusionError(f"prepare.text.{what}: fields {missing} are not {what} columns "
                          f"(available: {sorted(frame.columns)})")
    cols = {f: frame[f].tolist() for f in fields}
    cols = {f: [("" if v is None or (isinstance(v, float) and np.isnan(v)) else
                 (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))) for v in vals]
            for f, vals in cols.items()}
    if "genres" in cols:
        cols["genres"] = [g.replace("|", ", ") for g in cols["genres"]]
    return [template.format_map({f: cols[f][i] for f in fields}) for i in range(len(frame))]


@dataclass
class FusionPlan:
    """What one batch needs: broadcast attribute tables and the rules. Plain data, cheap to ship."""

    user_cols: list[str]  # user attributes joined onto interactions
    item_cols: list[str]  # item attributes joined onto interactions
    derived: list[str]  # derived item columns (first_genre)
    context: list[str]
    scenario: ScenarioRule
    scenario_index: dict[str, int]  # value key -> scenario index
    label: LabelRule
    rating_range: tuple[float, float] | None
    split_kind: str
    split_ratios: tuple[float, float, float]
    split_seed: int
    users: pd.DataFrame | None = None  # indexed by user_id
    items: pd.DataFrame | None = None  # indexed by item_id
    interaction_extra: list[str] = field(default_factory=list)  # interaction columns kept as features
    has_timestamp: bool = True  # without one, timestamp is 0 (nothing time-based was asked for)
    numeric: list[str] = field(default_factory=list)  # numeric features (text in a CSV: parsed here)
    label_buckets: list[float] | None = None  # prepare.history.label_buckets: the label source's bucket column
    soft_range: tuple[float, float] | None = None  # prepare.label.soft: the label source scaled to [0, 1] by it

    @property
    def output_columns(self) -> list[str]:
        base = ["user_id", "item_id", "timestamp"]
        label_src = [self.label.column] if self.label.column not in base else []
        cols = base + label_src + self.interaction_extra + self.user_cols + self.item_cols + self.derived
        cols += self.context + ["scenario", "label", "split"] + ([BUCKET] if self.label_buckets else [])
        cols += [SOFT] if self.soft_range else []
        return list(dict.fromkeys(cols))


def plan_fusion(cfg: PrepareConfig, interaction_columns: list[str], users: pd.DataFrame | None,
                items: pd.DataFrame | None, scenario_index: dict[str, int]) -> FusionPlan:
    """Resolve every needed column to the table that provides it, or fail naming what exists."""
    # Many logs have no usable time: only a temporal split and the context features need one.
    needs_time = (["prepare.split.kind: temporal"] if cfg.split.kind == "temporal" else []) + (
        [f"prepare.context {list(cfg.context)}"] if cfg.context else []) + (
        ["prepare.history (\"strictly earlier in time\")"] if cfg.history is not None else [])
    has_timestamp = "timestamp" in interaction_columns
    if needs_time and not has_timestamp:
        raise FusionError(f"interactions have no 'timestamp' column, which {' and '.join(needs_time)} need; map "
                          f"yours with data.interactions.columns (timestamp: <column>), or use prepare.split.kind: "
                          f"random without context features or history (interactions have: {interaction_columns})")
    missing_req = [c for c in REQUIRED + (cfg.label.column,) if c not in interaction_columns]
    if missing_req:
        raise FusionError(f"interactions lack required columns {missing_req} (they have: {interaction_columns}); "
                          f"map them with data.interactions.columns")
    user_avail = [c for c in (users.columns if users is not None else []) if c != "user_id"]
    item_avail = [c for c in (items.columns if items is not None else []) if c != "item_id"]
    needed = [f.name for f in cfg.categorical] + list(cfg.numeric) + [cfg.scenario.column]
    user_cols, item_cols, derived, extra = [], [], [], []
    for col in dict.fromkeys(needed):
        if col in CONTEXT and col in cfg.context:
            continue
        if col in ("user_id", "item_id", "timestamp"):
            continue
        if col in interaction_columns:
            extra.append(col)
        elif col in user_avail:
            user_cols.append(col)
        elif col in item_avail:
            item_cols.append(col)
        elif col in DERIVED_ITEM and DERIVED_ITEM[col] in item_avail:
            derived.append(col)
        elif col in CONTEXT:
            raise FusionError(f"feature {col!r} is a context feature: list it under prepare.context")
        else:
            raise FusionError(
                f"column {col!r} (a feature or prepare.scenario.column) is in no table; interactions have "
                f"{interaction_columns}, users have {user_avail}, items have {item_avail}, derived: "
                f"{list(DERIVED_ITEM)}, context: {list(CONTEXT)}")
    return FusionPlan(
        user_cols=user_cols, item_cols=item_cols, derived=derived, context=list(cfg.context),
        scenario=cfg.scenario, scenario_index=scenario_index, label=cfg.label,
        rating_range=cfg.validation.rating_range if cfg.label.op != "binary" else None,
        split_kind=cfg.split.kind, split_ratios=tuple(cfg.split.ratios), split_seed=cfg.split.seed,
        users=users[user_cols] if users is not None else None,
        items=with_derived(items, derived)[item_cols + derived] if items is not None else None,
        interaction_extra=extra, has_timestamp=has_timestamp, numeric=list(cfg.numeric),
        label_buckets=cfg.history.label_buckets if cfg.history is not None else None,
        soft_range=tuple(cfg.validation.rating_range) if cfg.label.soft else None,
    )


def with_derived(items: pd.DataFrame, derived: list[str]) -> pd.DataFrame:
    """Derived item columns, computed once on the (small) item table rather than per interaction."""
    items = items.copy()
    if "first_genre" in derived:
        items["first_genre"] = [g.split("|", 1)[0] if isinstance(g, str) and g else None for g in items["genres"]]
    return items


def _numeric(values: pd.Series, name: str, reasons: np.ndarray, null_ok: bool = False) -> np.ndarray:
    num = pd.to_numeric(values, errors="coerce")
    isnull = values.isna().to_numpy()
    if not null_ok:  # a missing numeric feature is the train mean (0 after normalisation), not an error
        _flag(reasons, isnull, f"null:{name}")
    _flag(reasons, num.isna().to_numpy() & ~isnull, f"bad_type:{name}")
    return num.to_numpy(dtype=np.float64, na_value=np.nan)


def _seconds(values: pd.Series, reasons: np.ndarray) -> np.ndarray:
    """Timestamps as epoch seconds: numbers as they are, text as a number or a date/time (UTC)."""
    num = pd.to_numeric(values, errors="coerce")
    todo = num.isna() & values.notna()
    if todo.any():
        when = pd.to_datetime(values[todo], errors="coerce", utc=True, format="mixed")
        num[todo] = (when - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    isnull = values.isna().to_numpy()
    _flag(reasons, isnull, "null:timestamp")
    _flag(reasons, num.isna().to_numpy() & ~isnull, "bad_type:timestamp")
    return num.to_numpy(dtype=np.float64, na_value=np.nan)


def _flag(reasons: np.ndarray, mask: np.ndarray, reason: str) -> None:
    """Set a reason where none is set yet: the first problem found is the one reported."""
    sel = mask & pd.isna(reasons)
    reasons[sel] = reason


def split_uniform(user: np.ndarray, item: np.ndarray, ts: np.ndarray, seed: int) -> np.ndarray:
    """U[0,1) per row from its content and the seed: the split never depends on block layout."""
    frame = pd.DataFrame({"u": user, "i": item, "t": ts})
    h = pd.util.hash_pandas_object(frame, index=False, hash_key="mcl-ray-split-01").to_numpy(np.uint64)
    return uniform(seed, h, 7)


def assign_random_split(u: np.ndarray, ratios: tuple[float, float, float]) -> np.ndarray:
    return np.where(u < ratios[0], "train", np.where(u < ratios[0] + ratios[1], "valid", "test")).astype(object)


def fuse_batch(batch: pa.Table, plan: FusionPlan) -> pd.DataFrame:
    n = batch.num_rows
    reasons = np.full(n, None, dtype=object)
    batch, bad_text, raw_batch = sanitize_text(batch)
    for col, mask in bad_text.items():
        _flag(reasons, mask, f"undecodable_text:{col}")
    source = batch.column("path").to_pylist() if "path" in batch.column_names else None
    if MALFORMED in batch.column_names:  # a CSV line that is no row at all (csv_tables)
        _flag(reasons, batch.column(MALFORMED).is_valid().to_numpy(zero_copy_only=False), "malformed_line")
    df = batch.to_pandas()
    out = pd.DataFrame(index=pd.RangeIndex(n))
    for key in ("user_id", "item_id"):
        s = df[key]
        _flag(reasons, s.isna().to_numpy(), f"null:{key}")
        out[key] = keys_of(s)
    ts_col = batch.column("timestamp") if plan.has_timestamp else None
    if ts_col is None:
        ts = np.zeros(n)
    elif pa.types.is_timestamp(ts_col.type) or pa.types.is_date(ts_col.type):
        ts = pc.cast(pc.cast(ts_col, pa.timestamp("s")), pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
        _flag(reasons, pd.isna(df["timestamp"]).to_numpy(), "null:timestamp")
    else:
        ts = _seconds(df["timestamp"], reasons)
    out["timestamp"] = np.nan_to_num(ts).astype(np.int64)
    lab = plan.label
    label_src = _numeric(df[lab.column], lab.column, reasons)
    if plan.rating_range is not None:
        lo, hi = plan.rating_range
        _flag(reasons, ~np.isnan(label_src) & ((label_src < lo) | (label_src > hi)), f"out_of_range:{lab.column}")
    if lab.op == "binary":
        _flag(reasons, ~np.isnan(label_src) & ~np.isin(label_src, [0.0, 1.0]), f"out_of_range:{lab.column}")
        label = label_src
    elif lab.op == "gt":
        label = (label_src > lab.threshold).astype(np.float64)
    elif lab.op == "ge":
        label = (label_src >= lab.threshold).astype(np.float64)
    else:
        label = (label_src == lab.threshold).astype(np.float64)
    if lab.column not in out.columns:
        out[lab.column] = label_src
    for col in plan.interaction_extra:
        out[col] = _numeric(df[col], col, reasons, null_ok=True) if col in plan.numeric else df[col].to_numpy()

    for key, table, cols, what in (("user_id", plan.users, plan.user_cols, "unknown_user"),
                                   ("item_id", plan.items, plan.item_cols + plan.derived, "unknown_item")):
        if table is None:
            continue
        # Broadcast hash join: position of each key in the attribute table, -1 when absent. Rows
        # with an unknown key are rejected, so the attribute value they pick up is never used.
        pos = table.index.get_indexer(out[key])
        _flag(reasons, pos < 0, f"{what}:{key}")
        pos = np.maximum(pos, 0)
        for c in cols:
            out[c] = table[c].to_numpy()[pos] if len(table) else np.full(n, None, dtype=object)
    if plan.context:
        when = pd.to_datetime(out["timestamp"], unit="s", utc=True)
        for c in plan.context:
            out[c] = getattr(when.dt, c).to_numpy(np.int64)
    scen_col = plan.scenario.column
    scen_keys = keys_of(out[scen_col]) if scen_col in out.columns else keys_of(df[scen_col])
    scen = np.array([plan.scenario_index.get(k, -1) if k is not None else -1 for k in scen_keys], dtype=np.int64)
    _flag(reasons, scen < 0, f"unknown_scenario:{scen_col}")
    out["scenario"] = scen
    out["label"] = np.nan_to_num(label).astype(np.float32)
    if plan.label_buckets:  # ids 1..len+1 (0 is the history's padding); a null source is quarantined above
        out[BUCKET] = 1 + np.searchsorted(plan.label_buckets, np.nan_to_num(label_src), side="right").astype(np.int8)
    if plan.soft_range:  # out-of-range values are quarantined above (rating_range)
        lo, hi = plan.soft_range
        out[SOFT] = np.clip((np.nan_to_num(label_src) - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)

    if plan.split_kind == "random":
        out["split"] = assign_random_split(
            split_uniform(out["user_id"].to_numpy(), out["item_id"].to_numpy(), out["timestamp"].to_numpy(),
                          plan.split_seed), plan.split_ratios)
    else:
        out["split"] = np.full(n, "", dtype=object)  # assigned by the temporal pass

    out = out[plan.output_columns]
    bad = np.flatnonzero(~pd.isna(reasons))
    out["_reason"] = reasons
    raw = np.full(n, None, dtype=object)
    if len(bad):
        raw[bad] = _raw_json(raw_batch.drop_columns(["path"]) if source else raw_batch, bad)
    out["_raw"] = raw
    out["_source"] = source if source is not None else None
    # Keep the object columns' types stable across batches (all-null blocks would become null-typed).
    for c in ("_reason", "_raw", "_source"):
        out[c] = out[c].astype("string")
    return out


def validate_keyed_table(table: pa.Table, key: str, what: str,
                         numeric: list[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Users/items: malformed CSV lines, null keys, duplicate keys (first kept), undecodable text,
    numeric features that are not numbers. -> (kept, quarantined)."""
    if key not in table.column_names:
        raise FusionError(f"{what} table has no {key!r} column (it has: {table.column_names}); "
                          f"map it with data.{what}.columns")
    table, bad_text, raw_table = sanitize_text(table)
    df = table.to_pandas()
    n = len(df)
    reasons = np.full(n, None, dtype=object)
    if MALFORMED in df.columns:
        _flag(reasons, df[MALFORMED].notna().to_numpy(), "malformed_line")
        df = df.drop(columns=[c for c in (MALFORMED, LINE) if c in df.columns])
    for col, mask in bad_text.items():
        _flag(reasons, mask, f"undecodable_text:{col}")
    _flag(reasons, df[key].isna().to_numpy(), f"null:{key}")
    for col in df.columns:  # CSV columns arrive as text: numbers where the whole column is numbers
        if col != key and (pd.api.types.is_string_dtype(df[col]) or df[col].dtype == object):
            num = pd.to_numeric(df[col], errors="coerce")
            bad = (num.isna() & df[col].notna()).to_numpy()
            if col in numeric:
                _flag(reasons, bad, f"bad_type:{col}")
                df[col] = num
            elif df[col].notna().any() and not bad.any():
                integral = num.dropna().eq(num.dropna().round()).all() and not num.isna().any()
                df[col] = num.astype(np.int64) if integral else num
    keys = pd.Series(keys_of(df[key]))
    _flag(reasons, keys.duplicated(keep="first").to_numpy() & keys.notna().to_numpy(), f"duplicate_key:{key}")
    df[key] = keys.to_numpy()
    bad = ~pd.isna(reasons)
    quarantined = pd.DataFrame({
        "_reason": reasons[bad],
        "_raw": _raw_json(raw_table, np.flatnonzero(bad)),
    })
    kept = df[~bad].set_index(key, drop=False)
    kept.index.name = None
    return kept, quarantined
