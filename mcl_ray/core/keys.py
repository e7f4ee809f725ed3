"""Canonical keys of categorical values: 25, 25.0 and '25' are one category everywhere (prepare,
vocabularies, texts, evaluation, serving). One implementation for pandas and one for Arrow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def value_key(v) -> str | None:
    """Canonical string of a categorical value: 25, 25.0 and '25' are the same category."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    return str(v)


def keys_of(values: pd.Series) -> np.ndarray:
    """value_key over a column, vectorised for the common dtypes (this runs on every row)."""
    dt = values.dtype
    if pd.api.types.is_bool_dtype(dt):
        return values.astype(np.int64).astype(str).to_numpy(dtype=object)
    if pd.api.types.is_integer_dtype(dt):
        if values.isna().any():  # nullable ints
            return np.where(values.isna(), None, values.astype(str)).astype(object)
        return values.astype(np.int64).astype(str).to_numpy(dtype=object)
    if pd.api.types.is_float_dtype(dt):
        x = values.to_numpy(dtype=np.float64, na_value=np.nan)
        ok = ~np.isnan(x)
        if (x[ok] == np.round(x[ok])).all():
            out = np.full(len(x), None, dtype=object)
            out[ok] = x[ok].astype(np.int64).astype(str)
            return out
    if pd.api.types.is_string_dtype(dt):
        arr = values.to_numpy(dtype=object, na_value=None)
        if all(isinstance(v, str) or v is None for v in arr[:64]):  # cheap probe; object columns may be mixed
            if dt != object or all(isinstance(v, str) or v is None for v in arr):
                return arr
    return np.array([value_key(v) for v in values.tolist()], dtype=object)


def key_array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Arrow twin of keys_of: 25, 25.0 and '25' become the string '25' (vectorised in C++)."""
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
    return pa.array(keys_of(col.to_pandas()), pa.string())
