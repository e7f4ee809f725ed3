"""The independent pandas computation the history and raters leakage checks compare prepare with."""

from collections.abc import Iterator


def rows_with_prior(frames: dict, by: str, order: list[str], n: int) -> Iterator[tuple]:
    """Every row of every split with its `by` group's last n train rows strictly earlier in time, most
    recent first (ties in `order`): (split, row, prior rows)."""
    train = frames["train"].sort_values([by, "timestamp", *order])
    groups = {k: g for k, g in train.groupby(by)}
    for split, df in frames.items():
        for r in df.itertuples():
            g = groups.get(getattr(r, by), train.iloc[:0])
            yield split, r, g[g["timestamp"] < r.timestamp].iloc[::-1].head(n)
