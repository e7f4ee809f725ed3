from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for the whole session; only this cluster is stopped at the end."""
    from mcl_ray.core.ray_env import apply_env_defaults, local_cluster_kwargs, quiet_ray_data, size_footer_readers

    apply_env_defaults()
    import ray

    if ray.is_initialized():
        yield ray
        return
    # 4 logical CPUs on a 2-core machine: Ray Data read tasks never starve behind other stages.
    # Dashboard on (state API for Ray Train's placement-group cleanup; `serve deploy`).
    ray.init(num_cpus=4, log_to_driver=False, **local_cluster_kwargs(ROOT / "runs"))
    quiet_ray_data()
    size_footer_readers()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ml1m_folder():
    from mcl_ray.data import package_data

    return package_data.locate(package_data.MOVIELENS_1M)


@pytest.fixture(scope="session")
def shop_history(tmp_path_factory, ray_cluster):
    """The README's shop tables (several scenarios per user), prepared once with a behaviour history of 4
    and 3 item raters: the leakage checks of test_history.py and test_raters.py read it."""
    from mcl_ray.core.config import load_config
    from mcl_ray.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("hist_shop")
    return prepare(load_config(ROOT / "experiments/shop_tables.yaml",
                               [f"run_dir={tmp}", "prepare.history={length: 4, raters: 3}"]))
