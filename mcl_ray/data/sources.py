"""Data sources -> canonical tables.

Canonical tables (all ids are strings):
  interactions: user_id, item_id, timestamp (int64 seconds), rating (float64) and/or label, extras
  users:        user_id + attributes          (small: held in the driver, broadcast to workers)
  items:        item_id + attributes and text (small: held in the driver, broadcast to workers)
Interactions are a Ray Dataset, so a large source is never read whole into the driver.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import ray

from mcl_ray.core.config import MovieLensSource, SyntheticSource, TableRef, TablesSource
from mcl_ray.core.errors import DataError
from mcl_ray.data import csv_tables, package_data
from mcl_ray.data.raw import RawTables, add_profile_text_columns
from mcl_ray.data.synthetic import synthetic_tables

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]


class SourceError(DataError):
    """A source that cannot be read: missing file, missing column, unreadable format."""


def load_source(src, num_blocks: int = 8) -> RawTables:
    if isinstance(src, MovieLensSource):
        return load_movielens(src, num_blocks)
    if isinstance(src, TablesSource):
        return load_tables(src)
    if isinstance(src, SyntheticSource):
        return synthetic_tables(src)
    raise TypeError(f"unknown source {src!r}")


# ----------------------------------------------------------------------------- helpers


def _to_dataset(table: pa.Table, num_blocks: int) -> ray.data.Dataset:
    n = table.num_rows
    step = max(1, -(-n // num_blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(n, 1), step)])


def _read_delimited(data: bytes, names: list[str], delimiter: str, types: dict[str, pa.DataType],
                    header: bool) -> pa.Table:
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if header else 0),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
    )


def _require(path: Path) -> bytes:
    if not path.is_file():
        raise SourceError(f"missing file {path}")
    return path.read_bytes()


def _atomic(path: Path) -> pa.Table:
    """A RecBole atomic file: tab-separated, header 'name:type' (token/float/token_seq)."""
    data = _require(path)
    header = data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r").split("\t")
    names = [h.split(":")[0] for h in header]
    types = {n: (pa.float64() if h.endswith(":float") else pa.string()) for n, h in zip(names, header)}
    return _read_delimited(data, names, "\t", types, header=True)


def _grouplens(path: Path, names: list[str], types: dict[str, pa.DataType], encoding: str = "latin-1",
               sep: bytes = b"::") -> pa.Table:
    data = _require(path)
    if encoding != "utf-8":
        data = data.decode(encoding).encode("utf-8")
    if sep != b"\t":
        data = data.replace(sep, b"\t")
    return _read_delimited(data, names, "\t", types, header=False)


_YEAR = re.compile(r"^(.*) \((\d{4})\)\s*$")


def split_title_year(full: str) -> tuple[str, int | None]:
    m = _YEAR.match(full)
    return (m.group(1), int(m.group(2))) if m else (full.strip(), None)


def _interactions_table(user, item, rating, ts) -> pa.Table:
    return pa.table({
        "user_id": pc.cast(user, pa.string()),
        "item_id": pc.cast(item, pa.string()),
        "rating": pc.cast(rating, pa.float64()),
        "timestamp": pc.cast(ts, pa.int64()),
    })


# ----------------------------------------------------------------------------- MovieLens


def load_movielens(src: MovieLensSource, num_blocks: int = 8) -> RawTables:
    if src.source == "movielens-1m":
        folder = Path(src.path) if src.path else package_data.locate(package_data.MOVIELENS_1M)
        inter, users, items, files = (_ml1m_grouplens(folder) if src.path else _ml1m_package(folder))
        users = add_profile_text_columns(users, ml1m_codes=True)
    else:
        folder = Path(src.path) if src.path else package_data.locate(package_data.MOVIELENS_100K)
        inter, users, items, files = (_ml100k_grouplens(folder) if src.path else _ml100k_package(folder))
        users = add_profile_text_columns(users, ml1m_codes=False)
    if src.max_interactions is not None:
        inter = inter.slice(0, src.max_interactions)
    origin = f"{src.source} ({'GroupLens folder ' + str(folder) if src.path else 'package data ' + str(folder)})"
    return RawTables(_to_dataset(inter, num_blocks), users, items,
                     origins={"interactions": origin, "users": origin, "items": origin}, files=files)


def _items_from_titles(item_ids: list[str], titles_years: list[tuple[str, int | None]], genres: list[str]) -> pa.Table:
    return pa.table({
        "item_id": pa.array(item_ids, pa.string()),
        "title": pa.array([t for t, _ in titles_years], pa.string()),
        "year": pa.array([y for _, y in titles_years], pa.int64()),
        "genres": pa.array(genres, pa.string()),
    })


def _ml1m_package(folder: Path):
    inter = _atomic(folder / "ml-1m.inter")
    user = _atomic(folder / "ml-1m.user")
    item = _atomic(folder / "ml-1m.item")
    strip = lambda col: pc.replace_substring_regex(col, "^1m_", "")  # noqa: E731
    interactions = _interactions_table(strip(inter["user_id"]), inter["item_id"], inter["rating"], inter["timestamp"])
    users = pa.table({
        "user_id": strip(user["user_id"]),
        "gender": user["gender"],
        "age": pc.cast(user["age"], pa.int64()),
        "occupation": pc.cast(user["occupation"], pa.int64()),
        "zip": user["zip_code"],
    })
    # The package keys items by their full GroupLens title ("Toy Story (1995)"): that title is
    # the canonical ML-1M item_id, so both formats give the same key.
    years = [int(y) if y is not None else None for y in item["release_year"].to_pylist()]
    items = _items_from_titles(
        item["item_id"].to_pylist(),
        list(zip(item["movie_title"].to_pylist(), years)),
        [g.replace(" ", "|") for g in item["genre"].to_pylist()],
    )
    files = [str(folder / f) for f in ("ml-1m.inter", "ml-1m.user", "ml-1m.item")]
    return interactions, users, items, files


def _ml1m_grouplens(folder: Path):
    movies = _grouplens(folder / "movies.dat", ["movie_id", "title", "genres"],
                        {"movie_id": pa.string(), "title": pa.string(), "genres": pa.string()})
    id_to_title = dict(zip(movies["movie_id"].to_pylist(), movies["title"].to_pylist()))
    ratings = _grouplens(folder / "ratings.dat", ["user_id", "movie_id", "rating", "timestamp"],
                         {"user_id": pa.string(), "movie_id": pa.string(), "rating": pa.float64(),
                          "timestamp": pa.int64()})
    titles = [id_to_title.get(m) for m in ratings["movie_id"].to_pylist()]
    missing = sum(t is None for t in titles)
    if missing:
        raise SourceError(f"{folder / 'ratings.dat'}: {missing} ratings reference movie ids absent from movies.dat")
    interactions = _interactions_table(ratings["user_id"], pa.array(titles, pa.string()), ratings["rating"],
                                       ratings["timestamp"])
    users_raw = _grouplens(folder / "users.dat", ["user_id", "gender", "age", "occupation", "zip"],
                           {"user_id": pa.string(), "gender": pa.string(), "age": pa.int64(),
                            "occupation": pa.int64(), "zip": pa.string()})
    items = _items_from_titles(movies["title"].to_pylist(), [split_title_year(t) for t in movies["title"].to_pylist()],
                               movies["genres"].to_pylist())
    files = [str(folder / f) for f in ("ratings.dat", "users.dat", "movies.dat")]
    return interactions, users_raw, items, files


def _ml100k_package(folder: Path):
    inter = _atomic(folder / "ml-100k.inter")
    user = _atomic(folder / "ml-100k.user")
    item = _atomic(folder / "ml-100k.item")
    interactions = _interactions_table(inter["user_id"], inter["item_id"], inter["rating"], inter["timestamp"])
    users = pa.table({
        "user_id": user["user_id"],
        "gender": user["gender"],
        "age": pc.cast(user["age"], pa.int64()),
        "occupation": user["occupation"],
        "zip": user["zip_code"],
    })
    years = [int(y) if y and y.isdigit() else None for y in item["release_year"].to_pylist()]
    items = _items_from_titles(
        item["item_id"].to_pylist(),
        list(zip(item["movie_title"].to_pylist(), years)),
        ["|".join(g.split(" ")) if g else "unknown" for g in item["class"].to_pylist()],
    )
    files = [str(folder / f) for f in ("ml-100k.inter", "ml-100k.user", "ml-100k.item")]
    return interactions, users, items, files


def _ml100k_grouplens(folder: Path):
    data = _grouplens(folder / "u.data", ["user_id", "item_id", "rating", "timestamp"],
                      {"user_id": pa.string(), "item_id": pa.string(), "rating": pa.float64(),
                       "timestamp": pa.int64()}, encoding="utf-8", sep=b"\t")
    interactions = _interactions_table(data["user_id"], data["item_id"], data["rating"], data["timestamp"])
    users = _grouplens(folder / "u.user", ["user_id", "age", "gender", "occupation", "zip"],
                       {"user_id": pa.string(), "age": pa.int64(), "gender": pa.string(), "occupation": pa.string(),
                        "zip": pa.string()}, sep=b"|")
    users = users.select(["user_id", "gender", "age", "occupation", "zip"])
    names = ["item_id", "title", "release", "video", "url"] + [f"g{i}" for i in range(19)]
    raw = _grouplens(folder / "u.item", names, {n: pa.string() for n in names}, sep=b"|")
    titles, genres = [], []
    for i in range(raw.num_rows):
        title, year = split_title_year(raw["title"][i].as_py())
        release = raw["release"][i].as_py()
        if release and release[-4:].isdigit():
            year = int(release[-4:])
        titles.append((title, year))
        flags = [raw[f"g{k}"][i].as_py() == "1" for k in range(19)]
        genres.append("|".join(g for g, f in zip(ML100K_GENRES, flags) if f) or "unknown")
    items = _items_from_titles(raw["item_id"].to_pylist(), titles, genres)
    files = [str(folder / f) for f in ("u.data", "u.user", "u.item")]
    return interactions, users, items, files


# ----------------------------------------------------------------------------- user tables


def _files_of(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_")))
    if any(ch in path for ch in "*?["):
        return sorted(str(f) for f in Path().glob(path) if f.is_file())
    return [path]


def _rename(table: pa.Table, ref: TableRef, origin: str) -> pa.Table:
    mapping = {file_col: canon for canon, file_col in ref.columns.items()}
    missing = [c for c in mapping if c not in table.column_names]
    if missing:
        raise SourceError(f"{origin}: columns {missing} named in the column mapping are not in the file "
                          f"(it has: {table.column_names})")
    return table.rename_columns([mapping.get(c, c) for c in table.column_names])


def _read_small(ref: TableRef, origin: str) -> pa.Table:
    files = _files_of(ref.path)
    if not files or not all(Path(f).exists() for f in files):
        raise SourceError(f"{origin}: no file at {ref.path}")
    tables = []
    for f in files:
        if ref.format == "parquet":
            import pyarrow.parquet as pq

            tables.append(pq.read_table(f))
        else:
            tables.append(csv_tables.read_table([f], ref).drop_columns([csv_tables.PATH]))
    return _rename(pa.concat_tables(tables, promote_options="permissive"), ref, origin)


def load_tables(src: TablesSource) -> RawTables:
    ref = src.interactions
    files = _files_of(ref.path)
    if not files or not all(Path(f).exists() for f in files):
        raise SourceError(f"data.interactions.path: no file at {ref.path}")
    if ref.format == "parquet":
        ds = ray.data.read_parquet(files, include_paths=True)
    else:
        # One task per file, each streaming its file block by block as text (csv_tables).
        ds = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)).map_batches(
            csv_tables.read_files_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"ref": ref.model_dump()})
    mapping = {file_col: canon for canon, file_col in ref.columns.items()}
    columns = None
    if ref.format == "csv":  # known from the header, without running the read
        columns = csv_tables.column_names(files[0], ref) + [csv_tables.PATH, csv_tables.MALFORMED, csv_tables.LINE]
        missing = [c for c in mapping if c not in columns]
        if missing:
            raise SourceError(f"data.interactions ({files[0]}): columns {missing} named in the column mapping are "
                              f"not in the file (it has: {columns[:-3]})")
        columns = [mapping.get(c, c) for c in columns]
    if mapping:
        ds = ds.rename_columns(mapping)
    users = _read_small(src.users, f"data.users ({src.users.path})") if src.users else None
    items = _read_small(src.items, f"data.items ({src.items.path})") if src.items else None
    all_files = files + (_files_of(src.users.path) if src.users else []) + (_files_of(src.items.path) if src.items else [])
    return RawTables(ds, users, items, origins={
        "interactions": ref.path, "users": src.users.path if src.users else "-",
        "items": src.items.path if src.items else "-"}, files=all_files, columns=columns)

