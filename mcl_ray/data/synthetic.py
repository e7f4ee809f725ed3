"""Seeded multi-scenario data generated in parallel by Ray Data.

Every value is a pure function of (seed, row index, stream): counter-based hashing, so the data is
identical whatever the block layout or the number of workers, and no table is ever built whole in
the driver except the (broadcast-sized) users and items.

Planted structure, so that multi-scenario models have something to learn:
  * each user belongs to a segment (the scenario; with 3 scenarios the ML-1M age codes agree with
    the Scenario-Wise Rec age groups);
  * each scenario likes its own genres and dislikes those another scenario likes: the same item
    has opposite click rates in two scenarios, which a scenario-blind model cannot fit;
  * a user's favourite genre and an item's quality add shared signal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from mcl_ray.core.config import SyntheticSource
from mcl_ray.data.raw import RawTables, add_profile_text_columns

GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
ADJ = ["Silent", "Crimson", "Last", "Hidden", "Golden", "Broken", "Wild", "Distant", "Frozen", "Electric",
       "Secret", "Burning", "Lonely", "Midnight", "Iron", "Paper"]
NOUN = ["River", "Garden", "Empire", "Signal", "Harbor", "Machine", "Kingdom", "Letter", "Storm", "Mirror",
        "Frontier", "Orchard", "Circus", "Voyage", "Station", "Archive"]
AGE_GROUPS_3 = [[1, 18], [25], [35, 45, 50, 56]]
ALL_AGES = [1, 18, 25, 35, 45, 50, 56]
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed: int, idx: np.ndarray, stream: int) -> np.ndarray:
    """U[0,1) that depends only on (seed, idx, stream)."""
    with np.errstate(over="ignore"):
        key = _splitmix(np.uint64(seed & 0xFFFFFFFF) * np.uint64(1_000_003) + np.uint64(stream))
        z = _splitmix(idx.astype(np.uint64) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _pick(u: np.ndarray, n: int) -> np.ndarray:
    return np.minimum((u * n).astype(np.int64), n - 1)


def scenario_genres(seed: int, num_scenarios: int) -> list[list[int]]:
    """The 3 genres each scenario likes (a seeded permutation, consecutive triples)."""
    perm = np.argsort(uniform(seed, np.arange(len(GENRES)), 99))
    return [[int(perm[(3 * k + j) % len(GENRES)]) for j in range(3)] for k in range(num_scenarios)]


def planted_structure(src: SyntheticSource) -> tuple[np.ndarray, np.ndarray]:
    """(item popularity CDF: Zipf-like, shuffled by seed; [S, genres] 0/1 matrix of liked genres)."""
    pop = 1.0 / np.arange(1, src.num_items + 1) ** 0.8
    pop = pop[np.argsort(uniform(src.seed, np.arange(src.num_items), 31))]
    liked = np.zeros((src.num_scenarios, len(GENRES)), dtype=np.float64)
    for k, gs in enumerate(scenario_genres(src.seed, src.num_scenarios)):
        liked[k, gs] = 1.0
    return np.cumsum(pop) / pop.sum(), liked


def make_users(batch: dict, seed: int, num_scenarios: int) -> pd.DataFrame:
    idx = batch["id"]
    seg = _pick(uniform(seed, idx, 1), num_scenarios)
    if num_scenarios == 3:
        age = np.array([AGE_GROUPS_3[s][i % len(AGE_GROUPS_3[s])] for s, i in zip(seg, _pick(uniform(seed, idx, 2), 4))])
    else:
        age = np.array(ALL_AGES)[_pick(uniform(seed, idx, 2), len(ALL_AGES))]
    return pd.DataFrame({
        "user_id": [f"u{i}" for i in idx],
        "gender": np.where(uniform(seed, idx, 3) < 0.5, "F", "M"),
        "age": age.astype(np.int64),
        "occupation": _pick(uniform(seed, idx, 4), 21),
        "zip": [f"{z:05d}" for z in _pick(uniform(seed, idx, 5), 100_000)],
        "segment": [f"seg{s}" for s in seg],
        "fav_genre": _pick(uniform(seed, idx, 6), len(GENRES)),
    })


def make_items(batch: dict, seed: int) -> pd.DataFrame:
    idx = batch["id"]
    g1 = _pick(uniform(seed, idx, 11), len(GENRES))
    g2 = _pick(uniform(seed, idx, 12), len(GENRES))
    two = uniform(seed, idx, 13) < 0.5
    titles = [f"{ADJ[a]} {NOUN[b]} {i}" for a, b, i in
              zip(_pick(uniform(seed, idx, 14), len(ADJ)), _pick(uniform(seed, idx, 15), len(NOUN)), idx)]
    return pd.DataFrame({
        "item_id": [f"i{i}" for i in idx],
        "title": titles,
        "year": 1950 + _pick(uniform(seed, idx, 16), 71),
        "genres": [GENRES[a] + (f"|{GENRES[b]}" if t and b != a else "") for a, b, t in zip(g1, g2, two)],
        "primary_genre": g1,
        "quality": np.sqrt(-2 * np.log(1 - uniform(seed, idx, 17))) * np.cos(2 * np.pi * uniform(seed, idx, 18)),
    })


def make_interactions(batch: dict, seed: int, user_seg: np.ndarray, user_fav: np.ndarray, item_cdf: np.ndarray,
                      item_genre: np.ndarray, item_quality: np.ndarray, liked: np.ndarray) -> pd.DataFrame:
    idx = batch["id"]
    num_users, num_scen = len(user_seg), liked.shape[0]
    u = _pick(uniform(seed, idx, 21), num_users)
    it = np.minimum(np.searchsorted(item_cdf, uniform(seed, idx, 22), side="right"), len(item_cdf) - 1)
    seg, genre = user_seg[u], item_genre[it]
    likes_own = liked[seg, genre]
    likes_other = liked[(seg + 1) % num_scen, genre] if num_scen > 1 else np.zeros_like(likes_own)
    logit = -0.4 + 1.6 * likes_own - 1.6 * likes_other + 1.0 * (user_fav[u] == genre) + 0.6 * item_quality[it]
    click = uniform(seed, idx, 23) < 1 / (1 + np.exp(-logit))
    r = uniform(seed, idx, 24)
    rating = np.where(click, 4 + (r < 0.4), 1 + _pick(r, 3)).astype(np.float64)
    ts = 978_300_000 + _pick(uniform(seed, idx, 25), 365 * 86_400)
    return pd.DataFrame({"user_id": [f"u{i}" for i in u], "item_id": [f"i{i}" for i in it],
                         "rating": rating, "timestamp": ts.astype(np.int64)})


def synthetic_tables(src: SyntheticSource) -> RawTables:
    # Users and items are broadcast to every fusion task, so they are built here (vectorised, in
    # id order); the interactions, the part that grows, are generated block by block by Ray Data.
    users_t = pa.Table.from_pandas(make_users({"id": np.arange(src.num_users)}, src.seed, src.num_scenarios),
                                   preserve_index=False)
    items_t = pa.Table.from_pandas(make_items({"id": np.arange(src.num_items)}, src.seed), preserve_index=False)
    seg = np.array([int(s[3:]) for s in users_t["segment"].to_pylist()])
    item_cdf, liked = planted_structure(src)
    inter = ray.data.range(src.num_interactions, override_num_blocks=src.num_blocks).map_batches(
        make_interactions, batch_format="numpy",
        fn_kwargs={"seed": src.seed, "user_seg": seg, "user_fav": users_t["fav_genre"].to_numpy(),
                   "item_cdf": item_cdf, "item_genre": items_t["primary_genre"].to_numpy(),
                   "item_quality": items_t["quality"].to_numpy(), "liked": liked})
    users_t = add_profile_text_columns(users_t.drop_columns(["fav_genre"]), ml1m_codes=True)
    items_t = items_t.drop_columns(["primary_genre", "quality"])
    origin = f"synthetic(seed={src.seed})"
    return RawTables(inter, users_t, items_t, origins={"interactions": origin, "users": origin, "items": origin},
                     columns=["user_id", "item_id", "rating", "timestamp"])
