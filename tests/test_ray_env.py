"""Ray defaults this project sets for the clusters it starts or joins."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mcl_ray.core.ray_env import FOOTER_READERS_ENV, size_footer_readers


@pytest.mark.ray
def test_parquet_footer_readers_follow_the_cluster_and_a_user_setting_wins(ray_cluster, tmp_path, monkeypatch):
    import ray.data

    monkeypatch.delenv(FOOTER_READERS_ENV, raising=False)
    assert size_footer_readers() == 1 and os.environ[FOOTER_READERS_ENV] == "1"  # 4 logical CPUs: one reader
    monkeypatch.setenv(FOOTER_READERS_ENV, "7")
    assert size_footer_readers() == 7  # the user's own setting is kept
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "t.parquet")
    ds = ray.data.read_parquet(str(tmp_path))
    op = ds._logical_plan.dag
    while op.input_dependencies:
        op = op.input_dependencies[0]
    assert op.file_indexer._num_actors == 7  # what Ray's reader takes (Ray 2.60 reads it when a read is built)
    assert ds.count() == 3
