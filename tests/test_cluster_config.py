"""cluster.yaml passes Ray's own cluster-config validation; the KubeRay manifests parse, point at
real entry points, and the RayService's Serve config agrees with serve_apps/recommender.yaml."""

import importlib
import shlex
from pathlib import Path

import yaml

from mcl_ray.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg = prepare_config(raw)  # fills Ray's provider defaults, as `ray up` does
    validate_config(cfg)  # Ray's JSON schema + consistency checks; raises on error
    types = cfg["available_node_types"]
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1  # autoscaling from zero
    assert 0 < cfg["idle_timeout_minutes"] <= 30
    assert any("[gpu]" in c for c in cfg["setup_commands"])
    # and the validation can fail: a misspelled key is rejected
    import jsonschema
    import pytest

    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**raw, "idle_timeout_minute": 5}))


def test_rayjob_runs_a_real_experiment():
    job = yaml.safe_load((ROOT / "k8s/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "mcl_ray", "run"]  # the image's interpreter, no PATH lookup of mcl-ray
    from typer.main import get_command

    from mcl_ray.cli import app

    run = get_command(app).commands["run"]
    run.make_context("run", argv[4:])  # every option exists (a typo would raise)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / argv[4], sets)
    assert cfg.train.use_gpu and cfg.run_dir.startswith("/runs/")
    assert job["spec"]["rayClusterSpec"]["rayVersion"].startswith("2.60")


def test_rayservice_matches_the_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    svc = yaml.safe_load((ROOT / "k8s/rayservice.yaml").read_text())
    assert svc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    local = yaml.safe_load((ROOT / "serve_apps/recommender.yaml").read_text())
    ServeDeploySchema.model_validate(local)
    a, b = serve_cfg["applications"][0], local["applications"][0]
    assert a["import_path"] == b["import_path"]
    module, attr = a["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    strip = lambda d: {k: v for k, v in d.items() if k != "user_config"}  # noqa: E731 (artifact paths differ)
    assert [strip(d) for d in a["deployments"]] == [strip(d) for d in b["deployments"]]
    assert {k: v for k, v in a["args"].items() if k != "artifact"} == {k: v for k, v in b["args"].items() if k != "artifact"}
    model = next(d for d in a["deployments"] if d["name"] == "RecommenderModel")
    assert model["user_config"]["artifact"] == a["args"]["artifact"]


def test_serve_throughput_mode_is_carried_into_the_deploy_files():
    """The measured choice (bench/serve_options_bench.py) reaches every way of deploying."""
    from mcl_ray.core.ray_env import SERVE_HAPROXY_ENV, SERVE_THROUGHPUT_ENV

    wanted = {**SERVE_THROUGHPUT_ENV, **SERVE_HAPROXY_ENV}
    svc = yaml.safe_load((ROOT / "k8s/rayservice.yaml").read_text())
    spec = svc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for pod in pods:  # Serve reads it from the Ray processes' environment on every node
        env = {e["name"]: e["value"] for e in pod["template"]["spec"]["containers"][0].get("env", [])}
        assert {k: env.get(k) for k in wanted} == wanted
    text = (ROOT / "serve_apps/recommender.yaml").read_text()
    assert " ".join(f"{k}={v}" for k, v in wanted.items()) + " ray start --head" in text


def test_mcl_ray_serve_turns_haproxy_on_only_off_loopback(monkeypatch):
    from mcl_ray.core.ray_env import apply_serve_env

    for k in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY"):
        monkeypatch.delenv(k, raising=False)
    assert apply_serve_env("127.0.0.1") == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED")
    assert apply_serve_env("0.0.0.0") == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # the user's own setting wins
    assert apply_serve_env("10.0.0.5")["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
