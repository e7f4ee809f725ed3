from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session; only this cluster is stopped at the end."""
    from mcl_ray.ray_env import apply_env_defaults, quiet_ray_data, ray_tmpdir

    apply_env_defaults()
    import ray

    if ray.is_initialized():
        yield ray
        return
    tmp = ray_tmpdir(ROOT / "runs")
    Path(tmp).mkdir(parents=True, exist_ok=True)
    # 4 logical CPUs on a 2-core machine: Ray Data read tasks never starve behind other stages.
    # The dashboard (state API) lets Ray Train free the workers of trials Tune stops early.
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=tmp, log_to_driver=False)
    quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ml1m_folder():
    from mcl_ray.data import package_data

    return package_data.locate(package_data.MOVIELENS_1M)
