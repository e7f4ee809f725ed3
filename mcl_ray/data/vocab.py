"""Vocabularies (vocabs.json): feature -> train values; id = position + 1, id 0 = OOV/unknown/null.

The one place values become ids, for the prepare stage's batches, evaluation, serving and the
text tables of the models."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mcl_ray.core.feature_spec import FeatureSpec
from mcl_ray.core.keys import key_array, value_key


def hashed_ids(values: pa.Array | pa.ChunkedArray, buckets: int) -> pa.Array:
    """Canonical keys of `values` -> 1 + hash mod buckets (int64; null -> 0). The hash is pandas'
    SipHash with its fixed key: the same id in every process, on every machine, in serving."""
    import pandas as pd

    keys = key_array(values)
    arr = keys.to_numpy(zero_copy_only=False)
    valid = ~pd.isna(arr)
    ids = np.zeros(len(arr), np.int64)
    if valid.any():
        h = pd.util.hash_array(arr[valid].astype(object), categorize=False)
        ids[valid] = (h % np.uint64(buckets)).astype(np.int64) + 1
    return pa.array(ids, pa.int64())


def ids_of(values: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> pa.Array:
    """Canonical keys of `values` -> ids (int64, 0 for values not in `vocab`)."""
    idx = pc.index_in(key_array(values), value_set=vocab)
    return pc.cast(pc.add(pc.fill_null(idx, -1), 1), pa.int64())


class Vocabularies:
    def __init__(self, values: dict[str, list[str]], hashed: dict[str, int] | None = None):
        self.values = values
        self.hashed = hashed or {}  # feature -> hash_buckets: ids without a vocabulary

    @classmethod
    def load(cls, folder: str | Path, spec: FeatureSpec) -> "Vocabularies":
        return cls(json.loads((Path(folder) / spec.vocabularies).read_text()),
                   {f.name: f.hash_buckets for f in spec.categorical if f.hash_buckets})

    @cached_property
    def _arrays(self) -> dict[str, pa.Array]:
        return {f: pa.array(v, pa.string()) for f, v in self.values.items()}

    @cached_property
    def _lookup(self) -> dict[str, dict[str, int]]:
        return {f: {v: i + 1 for i, v in enumerate(vs)} for f, vs in self.values.items()}

    def ids(self, feature: str, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vectorised: a column of raw values -> ids [N] int64."""
        if feature in self.hashed:
            return hashed_ids(values, self.hashed[feature]).to_numpy()
        return ids_of(values, self._arrays[feature]).to_numpy()

    def id(self, feature: str, value) -> int:
        """One value (a request field) -> its id; an unseen value is the OOV id 0, as in training."""
        if feature in self.hashed:
            return int(hashed_ids(pa.array([value_key(value)], pa.string()), self.hashed[feature])[0].as_py())
        return self._lookup[feature].get(value_key(value), 0)

    def keys(self, feature: str) -> list[str | None]:
        """Key of every id of `feature` (id 0, OOV: None)."""
        return [None] + list(self.values[feature])


def encode_entities(table: pa.Table, key: str, spec: FeatureSpec, vocabs: Vocabularies,
                    source: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """The features that come from a user (or item) table, one row per entity: (keys, {feature:
    ids [N] int64 for categorical, z-scores [N] float32 for numeric (a missing value: 0, the train
    mean, as in prepare)})."""
    cols: dict[str, np.ndarray] = {f.name: vocabs.ids(f.name, table[key if f.name == key else f.name])
                                   for f in spec.categorical if f.source == source}
    for f in spec.numeric:
        if f.source == source and f.name in table.column_names:
            cols[f.name] = zscore(f, table[f.name].to_pandas())
    return key_array(table[key]).to_pylist(), cols


def zscores(values: pa.Array | pa.ChunkedArray, mean: float, std: float) -> pa.Array:
    """Numeric values -> the model's input: (x - train mean) / train std as float32; null or NaN
    -> 0, the train mean. The one definition prepare (training data) and serving/evaluation
    (entity and request values, through `zscore`) share."""
    z = pc.fill_null(pc.divide(pc.subtract(pc.cast(values, pa.float64()), mean), std or 1.0), 0.0)
    return pc.cast(pc.if_else(pc.is_nan(z), 0.0, z), pa.float32())


def zscore(feature, values) -> np.ndarray:
    """Raw values of any type (a table column, request values) -> zscores; not a number -> 0."""
    import pandas as pd

    x = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(np.float64, na_value=np.nan)
    z = zscores(pa.array(x, pa.float64()), feature.mean, feature.std)
    return z.to_numpy(zero_copy_only=False)


def entity_table(table: pa.Table | None, key: str, vocabs: Vocabularies, seen_keys=None) -> pa.Table:
    """A user or item table; without one (interactions only), every key the model has an id for:
    its vocabulary, or for a hashed key the keys of the known interactions (`seen_keys`)."""
    if table is not None:
        return table
    if key in vocabs.hashed:
        return pa.table({key: pc.unique(key_array(seen_keys)) if seen_keys is not None else pa.array([], pa.string())})
    return pa.table({key: pa.array(vocabs.values.get(key, []), pa.string())})
