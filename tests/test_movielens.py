"""MovieLens sources: SWR scenario sizes, GroupLens vs package equality, split proportions."""

import numpy as np
import pyarrow as pa
import pytest

from mcl_ray.data import sources

ML1M_SWR_SCENARIOS = [210_747, 395_556, 393_906]
ML1M_POSITIVES = 575_281  # rating > 3


@pytest.fixture(scope="module")
def ml1m_package(ml1m_folder):
    return sources._ml1m_package(ml1m_folder)


def write_grouplens(folder, inter: pa.Table, users: pa.Table, items: pa.Table):
    """A GroupLens ml-1m folder ('::'-separated, latin-1 movies.dat) built from canonical tables."""
    folder.mkdir(parents=True, exist_ok=True)
    movie_id = {t: str(i + 1) for i, t in enumerate(items["item_id"].to_pylist())}
    with open(folder / "movies.dat", "w", encoding="latin-1") as f:
        for t, g in zip(items["item_id"].to_pylist(), items["genres"].to_pylist()):
            f.write(f"{movie_id[t]}::{t}::{g}\n")
    with open(folder / "users.dat", "w") as f:
        for r in users.to_pylist():
            f.write(f"{r['user_id']}::{r['gender']}::{r['age']}::{r['occupation']}::{r['zip']}\n")
    with open(folder / "ratings.dat", "w") as f:
        for u, i, r, t in zip(*(inter[c].to_pylist() for c in ("user_id", "item_id", "rating", "timestamp"))):
            f.write(f"{u}::{movie_id[i]}::{int(r)}::{t}\n")


def test_package_tables_shape(ml1m_package):
    inter, users, items, _ = ml1m_package
    assert (inter.num_rows, users.num_rows, items.num_rows) == (1_000_209, 6_040, 3_883)
    assert inter["user_id"][0].as_py() == "1"  # '1m_' prefix removed
    toy = items.filter(pa.compute.equal(items["item_id"], "Toy Story (1995)")).to_pylist()[0]
    assert toy == {"item_id": "Toy Story (1995)", "title": "Toy Story", "year": 1995,
                   "genres": "Animation|Children's|Comedy"}


def test_grouplens_and_package_give_identical_tables(tmp_path, ml1m_package):
    inter, users, items, _ = ml1m_package
    write_grouplens(tmp_path / "ml-1m", inter, users, items)
    g_inter, g_users, g_items, _ = sources._ml1m_grouplens(tmp_path / "ml-1m")
    assert g_inter.equals(inter)
    assert g_users.equals(users)
    assert g_items.equals(items)
    # accented titles survive the latin-1 round trip
    assert "Misérables, Les (1995)" in g_items["item_id"].to_pylist()


def test_grouplens_unknown_movie_is_an_error(tmp_path, ml1m_package):
    inter, users, items, _ = ml1m_package
    write_grouplens(tmp_path / "g", inter.slice(0, 10), users, items)
    with open(tmp_path / "g" / "ratings.dat", "a") as f:
        f.write("1::999999::5::978300760\n")
    with pytest.raises(sources.SourceError, match="absent from movies.dat"):
        sources._ml1m_grouplens(tmp_path / "g")


@pytest.mark.ray
@pytest.mark.slow
def test_ml1m_swr_protocol(tmp_path, ray_cluster):
    from mcl_ray.core.config import validate_config
    from mcl_ray.data.prepare import prepare

    cfg = validate_config({"name": "ml1m", "run_dir": str(tmp_path / "run"), "data": {"source": "movielens-1m"}})
    res = prepare(cfg)
    splits = res.stats["splits"]
    per_scen = [sum(splits[s]["by_scenario"][n]["rows"] for s in splits) for n in res.spec.scenario_names]
    assert per_scen == ML1M_SWR_SCENARIOS
    assert sum(splits[s]["positives"] for s in splits) == ML1M_POSITIVES
    total = sum(per_scen)
    for s, frac in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        assert abs(splits[s]["rows"] / total - frac) < 0.003
    assert res.spec.num_rows["train"] == splits["train"]["rows"]
    assert {f.name: f.vocab_size for f in res.spec.features}["gender"] == 3  # F, M + OOV


def test_random_split_is_deterministic_and_layout_free(ml1m_package):
    from mcl_ray.data.fuse import assign_random_split, split_uniform

    inter = ml1m_package[0].slice(0, 200_000)
    u, i, t = (inter[c].to_numpy(zero_copy_only=False) for c in ("user_id", "item_id", "timestamp"))
    whole = assign_random_split(split_uniform(u, i, t, 2024), (0.8, 0.1, 0.1))
    # computed in arbitrary chunks (as Ray Data blocks would be): the same assignment
    parts = np.concatenate([assign_random_split(split_uniform(u[a:b], i[a:b], t[a:b], 2024), (0.8, 0.1, 0.1))
                            for a, b in ((0, 777), (777, 150_000), (150_000, 200_000))])
    assert (whole == parts).all()
    other = assign_random_split(split_uniform(u, i, t, 7), (0.8, 0.1, 0.1))
    assert (whole != other).mean() > 0.2  # a different seed gives a different split
    fr = {s: (whole == s).mean() for s in ("train", "valid", "test")}
    assert abs(fr["train"] - 0.8) < 0.005 and abs(fr["valid"] - 0.1) < 0.005


def test_ml100k_package_and_grouplens(tmp_path):
    from mcl_ray.data import package_data

    folder = package_data.locate(package_data.MOVIELENS_100K)
    inter, users, items, _ = sources._ml100k_package(folder)
    assert (inter.num_rows, users.num_rows, items.num_rows) == (100_000, 943, 1_682)
    # GroupLens ml-100k format written from the package tables reads back to the same tables
    g = tmp_path / "ml-100k"
    g.mkdir()
    with open(g / "u.data", "w") as f:
        for r in inter.to_pylist():
            f.write(f"{r['user_id']}\t{r['item_id']}\t{int(r['rating'])}\t{r['timestamp']}\n")
    with open(g / "u.user", "w") as f:
        for r in users.to_pylist():
            f.write(f"{r['user_id']}|{r['age']}|{r['gender']}|{r['occupation']}|{r['zip']}\n")
    with open(g / "u.item", "w", encoding="latin-1") as f:
        for r in items.to_pylist():
            flags = ["1" if gname in r["genres"].split("|") else "0" for gname in sources.ML100K_GENRES]
            rel = f"01-Jan-{r['year']}" if r["year"] else ""
            f.write(f"{r['item_id']}|{r['title']} ({r['year']})|{rel}||http://x|" + "|".join(flags) + "\n")
    g_inter, g_users, g_items, _ = sources._ml100k_grouplens(g)
    assert g_inter.equals(inter) and g_users.equals(users)
    assert g_items["genres"].to_pylist() == items["genres"].to_pylist()
    assert g_items["year"].to_pylist() == items["year"].to_pylist()


@pytest.mark.ray
def test_ml100k_experiment_temporal_and_context(tmp_path, ray_cluster):
    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare

    res = prepare(load_config("experiments/ml100k_gender.yaml", [f"run_dir={tmp_path}"]))
    splits = res.stats["splits"]
    # leave-last-out: every user (943, all with >= 20 ratings) has exactly one test and one valid row
    assert splits["test"]["rows"] == 943 and splits["valid"]["rows"] == 943
    assert splits["train"]["rows"] == 100_000 - 2 * 943
    assert res.spec.scenario_names == ["female", "male"]
    kinds = {f.name: (f.kind, f.source) for f in res.spec.features}
    assert kinds["hour"] == ("categorical", "context") and kinds["year"] == ("numeric", "item")
    assert {f.name: f.vocab_size for f in res.spec.features}["weekday"] == 8
