"""Reading the prepared splits (parquet under <prepare_dir>/data/split=NAME/) in the driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mcl_ray.core.errors import SetupError
from mcl_ray.core.keys import key_array
from mcl_ray.core.feature_spec import FeatureSpec


def model_columns(spec: FeatureSpec) -> list[str]:
    """The columns a model batch is made of (features, scenario, label, weight, provenance)."""
    return ([f.name for f in spec.categorical] + [f.name for f in spec.numeric] + [f.name for f in spec.sequence]
            + [f.name for f in spec.raters]
            + [spec.scenario_column, spec.label_column, spec.weight_column, spec.provenance_column]
            + ([spec.soft_label_column] if spec.soft_label_column else []))


def _split_files(prepare_dir: str | Path, spec: FeatureSpec, split: str) -> list[Path]:
    if split not in spec.splits:
        raise SetupError(f"the prepared data has no {split!r} split (it has {sorted(spec.splits)})")
    folder = Path(prepare_dir) / spec.splits[split]
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise SetupError(f"no parquet files in {folder}; run `mcl-ray prepare` first")
    return files


def read_split(prepare_dir: str | Path, spec: FeatureSpec, split: str, extra: list[str] | None = None,
               sample: int | None = None, seed: int = 0, columns: list[str] | None = None) -> pa.Table:
    """One split as an Arrow table: the model columns (or `columns`) plus `extra`; optionally a
    seeded row sample (train.sample_rows)."""
    files = _split_files(prepare_dir, spec, split)
    cols = list(columns) if columns is not None else model_columns(spec)
    cols += [c for c in (extra or []) if c not in cols]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    return sample_rows(table, sample, seed)


def _batches(prepare_dir: str | Path, spec: FeatureSpec, splits, columns: list[str],
             batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The given columns of the given splits (those the data has), batch by batch."""
    for s in [splits] if isinstance(splits, str) else splits:
        if s in spec.splits:
            for f in _split_files(prepare_dir, spec, s):
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)


def iter_split(prepare_dir: str | Path, spec: FeatureSpec, split: str, extra: list[str] | None = None,
               batch_rows: int = 65_536, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """One split as Arrow tables of at most batch_rows rows, file by file: memory is one batch. The
    model columns (or `columns`) plus `extra`."""
    _split_files(prepare_dir, spec, split)  # a missing split is an error here, not an empty iteration
    base = list(columns) if columns is not None else model_columns(spec)
    cols = base + [c for c in (extra or []) if c not in base]
    for rb in _batches(prepare_dir, spec, split, cols, batch_rows):
        yield pa.Table.from_batches([rb])


def read_pairs(prepare_dir: str | Path, spec: FeatureSpec, splits, users=None) -> pa.Table:
    """(user_key, item_key) of every row of the given splits: what a user has already seen.
    With `users`, only those users' rows, filtered batch by batch (memory follows the users asked
    for, not the split)."""
    cols = [spec.user_key, spec.item_key]
    if users is None:
        return pa.concat_tables([read_split(prepare_dir, spec, s, columns=cols) for s in splits if s in spec.splits])
    wanted = key_array(pa.array(list(users)))
    parts = [pa.table({c: pa.array([], pa.string()) for c in cols})]
    for rb in _batches(prepare_dir, spec, splits, cols):
        t = pa.table({c: key_array(rb.column(c)) for c in cols})
        t = t.filter(pc.is_in(t[spec.user_key], value_set=wanted))
        if t.num_rows:
            parts.append(t)
    return pa.concat_tables(parts)


def unique_keys(prepare_dir: str | Path, spec: FeatureSpec, splits, column: str) -> pa.Array:
    """The distinct values of one column over the given splits, streamed batch by batch."""
    seen = [pc.unique(key_array(rb.column(0))) for rb in _batches(prepare_dir, spec, splits, [column])]
    return pc.unique(pa.concat_arrays(seen)) if seen else pa.array([], pa.string())


def value_counts(prepare_dir: str | Path, spec: FeatureSpec, split: str, column: str) -> dict[str, int]:
    """Rows per value of one column of a split, streamed batch by batch."""
    parts = [pa.table({"values": pa.array([], pa.string()), "counts": pa.array([], pa.int64())})]
    for rb in _batches(prepare_dir, spec, split, [column]):
        vc = pc.value_counts(key_array(rb.column(0)))
        parts.append(pa.table({"values": vc.field("values"), "counts": vc.field("counts")}))
    t = pa.concat_tables(parts).group_by("values").aggregate([("counts", "sum")])
    return dict(zip(t["values"].to_pylist(), t["counts_sum"].to_pylist()))


def sample_rows(table: pa.Table, n: int | None, seed: int) -> pa.Table:
    """A seeded random sample of n rows (kept in file order); all rows when n is None or >= the rows."""
    if n is None or n >= table.num_rows:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(pa.array(idx))


def iter_scenarios(prepare_dir: str | Path, spec: FeatureSpec, split: str, scenarios: list[int],
                   batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """The rows of the given scenarios in one split, batch by batch (filtered before any conversion)."""
    wanted = pa.array(scenarios, pa.int64())
    for t in iter_split(prepare_dir, spec, split, batch_rows=batch_rows):
        yield t.filter(pc.is_in(pc.cast(t[spec.scenario_column], pa.int64()), value_set=wanted))


def scenario_rows(prepare_dir: str | Path, spec: FeatureSpec, split: str, scenarios: list[int],
                  n: int | None = None, seed: int = 0, batch_rows: int = 65_536) -> pa.Table:
    """The rows of the given scenarios in one split; with n, a seeded uniform sample of n of them.

    Streamed batch by batch; a sample keeps the n rows with the smallest seeded random keys, so
    memory is n rows plus one batch, whatever the split's size."""
    rng = np.random.default_rng(seed)
    kept: pa.Table | None = None
    for t in iter_scenarios(prepare_dir, spec, split, scenarios, batch_rows):
        if n is not None:
            t = t.append_column("_key", pa.array(rng.random(t.num_rows)))
        kept = t if kept is None else pa.concat_tables([kept, t])
        if n is not None and kept.num_rows > n:
            kept = kept.take(pc.select_k_unstable(kept, n, [("_key", "ascending")]))
    if kept is None:
        return pa.table({c: [] for c in model_columns(spec)})
    return kept.drop_columns(["_key"]) if "_key" in kept.column_names else kept
