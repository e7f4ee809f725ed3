"""Behaviour-history sequence features: for every row, its user's last L train-split interactions
strictly earlier in time (item id, label or label-source bucket, scenario), most recent first.

One pure function (`windows`) computes them; prepare runs it per user on Ray Data
(`groupby(user).map_groups(add_history)`), and serving and ranking evaluation run it on the
artifact's / train split's rows of one user (`UserHistory`), so training and serving agree.

Columns (fixed-size lists of L): hist_<item feature> (the item feature's ids; 0 past the end),
hist_label (0 padding, 1 negative, 2 positive; with prepare.history.label_buckets the bucket id 1..B of
the label's source value, e.g. the rating, which prepare stores per row in the `label_bucket` column),
hist_scenario (scenario index; 0 past the end, masked by hist_label). Only train rows are ever read,
so no valid/test label reaches a history; "strictly earlier" keeps a row, and rows of the same
second, out of its own history.

Item-side behaviour (prepare.history.raters: K): for every row, its target item's last K train-split
raters strictly earlier in time (the rater's user id, and the label they gave), most recent first, under
the same rules, so the model can compare the user with the people who recently rated the item (DUMN-style
user matching). Prepare runs `add_raters` per item (`groupby(item).map_groups`); serving and ranking
evaluation read them with `ItemRaters`. Columns raters_<user feature> (user ids) and raters_label.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mcl_ray.core.feature_spec import Feature, FeatureSpec
from mcl_ray.core.keys import key_array

LABEL = "hist_label"
SCENARIO = "hist_scenario"
BUCKET = "label_bucket"  # per row: the bucket id of the label's source value (prepare.history.label_buckets)
SOFT = "label_soft"  # per row: the label's source value scaled to [0, 1] (prepare.label.soft, train.soft_label)


RATER_LABEL = "raters_label"


def item_column(item_feature: str) -> str:
    return f"hist_{item_feature}"


def rater_column(user_feature: str) -> str:
    return f"raters_{user_feature}"


def label_ids(label: np.ndarray, bucket: np.ndarray | None) -> np.ndarray:
    """The history's label ids of some rows: their bucket ids when bucketed, else 1 negative / 2 positive."""
    return bucket.astype(np.int8) if bucket is not None else (label > 0).astype(np.int8) + 1


def label_source(spec: FeatureSpec) -> str | None:
    """The column holding the history's label bucket ids (None: the history holds the binary label)."""
    return next((f.ids_of for f in spec.sequence if f.name == LABEL), None)


def source_columns(spec: FeatureSpec) -> list[str]:
    """The train-row columns a UserHistory is built from (user, time, item id, label, scenario, and
    the label buckets when bucketed)."""
    return [spec.user_key, spec.timestamp_column, spec.sequence[0].ids_of, spec.label_column, spec.scenario_column,
            *filter(None, [label_source(spec)])]


def windows(train_ts: np.ndarray, item: np.ndarray, label: np.ndarray, scenario: np.ndarray,
            query_ts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One user's train rows (sorted by time; `label`: their label ids, label_ids) and query times [n]
    -> (items, labels, scenarios), each [n, L]: the train rows with timestamp < query time, the most
    recent first."""
    n = len(query_ts)
    if len(train_ts) == 0:
        z = np.zeros((n, length), np.int32)
        return z, z.astype(np.int8), z.astype(np.int16)
    before = np.searchsorted(train_ts, query_ts, side="left")  # [n] train rows strictly earlier
    items, labels, scens = gather_windows(before, np.zeros_like(before), length, (item, label, scenario))
    return items.astype(np.int32), labels.astype(np.int8), scens.astype(np.int16)


def gather_windows(before: np.ndarray, first: np.ndarray, length: int, cols) -> list[np.ndarray]:
    """For each query i, rows first[i] <= r < before[i] of every column, the most recent (highest r)
    first: [n, L] per column, 0 past the start."""
    idx = before[:, None] - 1 - np.arange(length)[None, :]  # [n, L]
    valid = idx >= first[:, None]
    idx = np.clip(idx, 0, None)
    return [np.where(valid, c[idx], 0) for c in cols]


def fixed_lists(x: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """[n, L] -> a fixed-size list array of n lists of L."""
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), dtype), x.shape[1])


def add_history(group: pa.Table, length: int, item_feature: str, split_column: str = "split",
                bucketed: bool = False) -> pa.Table:
    """map_groups over one user's encoded rows (every split): adds the three history columns
    (bucketed: the labels are the rows' `label_bucket` ids)."""
    ts = group["timestamp"].to_numpy()
    train = np.asarray(group[split_column].to_pylist()) == "train"
    order = np.lexsort((group[item_feature].to_numpy()[train], ts[train]))  # by time, ties by item id: deterministic
    t_ts = ts[train][order]
    col = lambda c: group[c].to_numpy()[train][order]  # noqa: E731
    labels = label_ids(col("label"), col(BUCKET) if bucketed else None)
    items, labels, scens = windows(t_ts, col(item_feature), labels, col("scenario"), ts, length)
    return (group.append_column(item_column(item_feature), fixed_lists(items, pa.int32()))
            .append_column(LABEL, fixed_lists(labels, pa.int8()))
            .append_column(SCENARIO, fixed_lists(scens, pa.int16())))


def add_raters(group: pa.Table, length: int, user_feature: str, split_column: str = "split",
               bucketed: bool = False) -> pa.Table:
    """map_groups over one item's encoded rows (every split): adds its raters columns, the item's last K
    train raters strictly earlier than each row (user ids, label ids), most recent first."""
    ts = group["timestamp"].to_numpy()
    train = np.asarray(group[split_column].to_pylist()) == "train"
    # by time, ties by user id then label: the order ItemRaters sorts in
    order = np.lexsort((group["label"].to_numpy()[train], group[user_feature].to_numpy()[train], ts[train]))
    col = lambda c: group[c].to_numpy()[train][order]  # noqa: E731
    labels = label_ids(col("label"), col(BUCKET) if bucketed else None)
    users, labels, _ = windows(ts[train][order], col(user_feature), labels, np.zeros(len(labels), np.int16),
                               ts, length)
    return (group.append_column(rater_column(user_feature), fixed_lists(users, pa.int32()))
            .append_column(RATER_LABEL, fixed_lists(labels, pa.int8())))


def sequence_features(item: Feature, length: int, num_scenarios: int,
                      label_buckets: list[float] | None = None) -> list[Feature]:
    """The spec's entries for the three history columns (bucketed labels: ids_of names the column)."""
    return [Feature(name=item_column(item.name), kind="sequence", source="interaction", vocab_size=item.vocab_size,
                    length=length, ids_of=item.name),
            Feature(name=LABEL, kind="sequence", source="interaction", length=length,
                    vocab_size=len(label_buckets) + 2 if label_buckets else 3,
                    ids_of=BUCKET if label_buckets else None),
            Feature(name=SCENARIO, kind="sequence", source="interaction", vocab_size=num_scenarios, length=length)]


def rater_features(user: Feature, length: int, label_buckets: list[float] | None = None) -> list[Feature]:
    """The spec's entries for the two raters columns (user ids, then their labels)."""
    return [Feature(name=rater_column(user.name), kind="item_sequence", source="interaction",
                    vocab_size=user.vocab_size, length=length, ids_of=user.name),
            Feature(name=RATER_LABEL, kind="item_sequence", source="interaction", length=length,
                    vocab_size=len(label_buckets) + 2 if label_buckets else 3,
                    ids_of=BUCKET if label_buckets else None)]


def sequence_arrays(table: pa.Table, spec: FeatureSpec, raters: bool = False) -> list[np.ndarray]:
    """The history columns of a table as [n, L] arrays, in spec order (item, label, scenario); with
    raters, the raters columns as [n, K] arrays (user, label)."""
    out = []
    for f in (spec.raters if raters else spec.sequence):
        col = table.column(f.name).combine_chunks()
        out.append(col.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, f.length))
    return out


class UserHistory:
    """The train rows of some users, sorted by (user, time): a row's history at any time, as prepare
    computed it. Built from the artifact's history.parquet (serving) or the train split (evaluation)."""

    def __init__(self, table: pa.Table, spec: FeatureSpec):
        item_f = spec.sequence[0]
        self.length = item_f.length
        t = table.sort_by([(spec.user_key, "ascending"), (spec.timestamp_column, "ascending"),
                           (item_f.ids_of, "ascending")])  # the order prepare uses
        users = np.asarray(t[spec.user_key].to_pylist(), dtype=object)
        self.ts = t[spec.timestamp_column].to_numpy()
        self.item = t[item_f.ids_of].to_numpy()
        bucket = label_source(spec)
        self.label = label_ids(t[spec.label_column].to_numpy(), t[bucket].to_numpy() if bucket else None)
        self.scenario = t[spec.scenario_column].to_numpy()
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, int)
        ends = np.r_[starts[1:], len(users)]
        self.span = {users[a]: (a, b) for a, b in zip(starts, ends)}

    def of(self, user: str, as_of: int | None = None) -> np.ndarray:
        """[3, L] int64: the user's history at time as_of (None: after every train row)."""
        a, b = self.span.get(user, (0, 0))
        q = np.array([np.iinfo(np.int64).max if as_of is None else as_of], np.int64)
        parts = windows(self.ts[a:b], self.item[a:b], self.label[a:b], self.scenario[a:b], q, self.length)
        return np.stack([p[0].astype(np.int64) for p in parts])


class ItemRaters:
    """Train rows as (item, time, rater user id, label): an item's raters at any time, as prepare computed
    them. Built from the artifact's history.parquet (serving) or from each item's last K train rows
    (`latest_rater_rows`, ranking evaluation: enough for as_of None)."""

    def __init__(self, table: pa.Table, spec: FeatureSpec):
        user_f, item = spec.raters[0], spec.sequence[0].ids_of
        self.length = user_f.length
        t = table.sort_by([(item, "ascending"), (spec.timestamp_column, "ascending"), (user_f.ids_of, "ascending"),
                           (spec.label_column, "ascending")])  # add_raters' order
        self.item = t[item].to_numpy().astype(np.int64)
        ts = t[spec.timestamp_column].to_numpy().astype(np.int64)
        self.t0 = int(ts.min()) if len(ts) else 0
        self.key = self.item * 2**32 + (ts - self.t0)  # sorted: (item, time) as one searchable key
        self.user = t[user_f.ids_of].to_numpy()
        bucket = next((f.ids_of for f in spec.raters if f.name == RATER_LABEL), None)
        self.label = label_ids(t[spec.label_column].to_numpy(), t[bucket].to_numpy() if bucket else None)

    def of(self, items: np.ndarray, as_of: int | None = None) -> np.ndarray:
        """[n, 2, K] int64: the raters of items [n] (item ids) at time as_of (None: after every train row)."""
        items = np.asarray(items, np.int64)
        if not len(self.key):  # no train rows: every item unrated
            return np.zeros((len(items), 2, self.length), np.int64)
        off = 2**32 if as_of is None else min(max(as_of - self.t0, 0), 2**32)
        first = np.searchsorted(self.key, items * 2**32, side="left")  # each item's first row
        before = np.searchsorted(self.key, items * 2**32 + off, side="left")  # rows strictly earlier
        return np.stack(gather_windows(before, first, self.length, (self.user, self.label)), 1).astype(np.int64)


def rater_source_columns(spec: FeatureSpec) -> list[str]:
    """The train-row columns ItemRaters is built from (item id, time, user id, label, and the buckets)."""
    item = spec.sequence[0].ids_of
    bucket = next((f.ids_of for f in spec.raters if f.name == RATER_LABEL and f.ids_of), None)
    return [item, spec.timestamp_column, spec.raters[0].ids_of, spec.label_column, *filter(None, [bucket])]


def latest_rater_rows(prepare_dir, spec: FeatureSpec) -> pa.Table:
    """Each item's last K real train rows (ItemRaters' columns), streamed batch by batch: memory follows
    items x K, not the split."""
    import pyarrow.compute as pc

    from mcl_ray.data.splits import iter_split

    cols = rater_source_columns(spec)
    k, item = spec.raters[0].length, cols[0]
    kept = None
    for t in iter_split(prepare_dir, spec, "train", columns=cols + [spec.provenance_column]):
        t = t.filter(pc.equal(t[spec.provenance_column], 0)).select(cols)
        kept = t if kept is None else pa.concat_tables([kept, t], promote_options="permissive")
        kept = kept.sort_by([(item, "descending"), (cols[1], "descending"), (cols[2], "descending")])
        ids = kept[item].to_numpy()
        start = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])  # each item's first (latest) row
        rank = np.arange(len(ids)) - np.repeat(start, np.diff(np.r_[start, len(ids)]))
        kept = kept.filter(pa.array(rank < k))
    if kept is None:
        raise ValueError("the train split has no rows")
    return kept


def read_user_history(prepare_dir, spec: FeatureSpec, users) -> UserHistory:
    """UserHistory of the given users from the train split's real rows, filtered batch by batch
    (memory follows the users asked for, not the split)."""
    import pyarrow.compute as pc

    from mcl_ray.data.splits import iter_split

    item = spec.sequence[0].ids_of
    wanted = key_array(pa.array(list(users)))
    cols = source_columns(spec)
    parts = []
    # only the columns needed (the history lists themselves are 60 values a row)
    for t in iter_split(prepare_dir, spec, "train", columns=cols + [spec.provenance_column]):
        t = t.filter(pc.and_(pc.is_in(key_array(t[spec.user_key]), value_set=wanted),
                             pc.equal(t[spec.provenance_column], 0)))
        if t.num_rows:
            parts.append(pa.table({c: key_array(t[c]) if c == spec.user_key else t[c] for c in cols}))
    empty = pa.table({spec.user_key: pa.array([], pa.string()), spec.timestamp_column: pa.array([], pa.int64()),
                      item: pa.array([], pa.int64()), spec.label_column: pa.array([], pa.float32()),
                      spec.scenario_column: pa.array([], pa.int64()),
                      **({b: pa.array([], pa.int8())} if (b := label_source(spec)) else {})})
    return UserHistory(pa.concat_tables(parts, promote_options="permissive") if parts else empty, spec)
