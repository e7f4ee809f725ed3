"""The CLI end to end on the session's local Ray cluster."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mcl_ray.cli import app

import tiny_data

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_run_quick_experiment_and_reuse(tmp_path, ray_cluster):
    runner = CliRunner()
    args = ["run", str(ROOT / "experiments/ml1m_swr_quick.yaml"), "--set", f"run_dir={tmp_path / 'run'}",
            "--set", "data.max_interactions=20000"]
    aug = ["--set", "augment.enabled=true", "--set", "augment.backend=transformers", "--set", "augment.num_users=4"]
    r = runner.invoke(app, args + aug)
    assert r.exit_code == 0, r.output
    assert "interactions: in 20,000 = kept 20,000 + quarantined 0" in r.output
    # the run ends by serving its artifact and showing a real answer
    assert (tmp_path / "run/artifact/model.safetensors").exists()
    assert "POST /v1/recommend user" in r.output and "serve it yourself: mcl-ray serve" in r.output
    report = (tmp_path / "run/report.md").read_text()
    for section in ("## Data (prepare)", "## Training", "## Model artifact", "learning_curves.png"):
        assert section in report, section
    meta = json.loads((tmp_path / "run/metadata.json").read_text())["runs"]
    assert [m["stage"] for m in meta] == ["prepare", "encode", "augment", "train", "export"]
    assert meta[0]["config"]["name"] == "ml1m_swr_quick"
    assert "## Text features (encode)" in report and "## Augmentation" in report
    assert "stage 3/6: augment" in r.output and "stage 6/6: serve demo" in r.output
    assert json.loads((tmp_path / "run/prepare/augment/stats.json").read_text())["requested"] == 4
    args += ["--no-serve-demo"]
    out = tmp_path / "run" / "prepare"
    for f in ("feature_spec.json", "stats.json", "vocabs.json", "users.parquet", "items.parquet"):
        assert (out / f).exists(), f
    assert sorted(p.name for p in (out / "data").iterdir()) == ["split=test", "split=train", "split=valid"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows"]["interactions"]["holds"]
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0 and "(cached)" in r2.output
    r3 = runner.invoke(app, args + ["--set", "prepare.split.seed=1"])
    assert r3.exit_code == 0 and "(cached)" not in r3.output


def test_prepare_bad_input_exits_nonzero_with_message(tmp_path, ray_cluster):
    folder = tiny_data.write(tmp_path / "in", interactions=tiny_data.INTERACTIONS + "u1,i2,9,1000003600\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_data.config(folder, tmp_path / "run")))
    r = CliRunner().invoke(app, ["prepare", str(cfg)])
    assert r.exit_code == 1
    assert "out_of_range in column 'rating'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["prepare", str(cfg), "--set", "prepare.validation.policy=quarantine",
                                 "--out", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert "quarantined 1" in r.output
    assert (tmp_path / "q" / "quarantine" / "interactions").is_dir()


def test_help_lists_stages():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("prepare", "run", "config", "data"):
        assert cmd in r.output
    r = CliRunner().invoke(app, ["prepare", "--help"])
    assert "--set" in r.output and "--out" in r.output


def test_console_script_joins_running_cluster(tmp_path, ray_cluster):
    """The installed `mcl-ray` entry point, as a user runs it, on the cluster this session started."""
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("mcl-ray") or str(Path(sys.executable).parent / "mcl-ray")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    p = subprocess.run([exe, "run", str(ROOT / "experiments/ml1m_swr_quick.yaml"), "--set", f"run_dir={tmp_path}",
                        "--set", "data.max_interactions=5000", "--no-serve-demo"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "interactions: in 5,000 = kept 5,000 + quarantined 0" in p.stdout
    # what a person reads: each epoch line once, the stage lines, no Ray-internal chatter
    console = p.stdout + p.stderr
    for epoch in (1, 2, 3):  # the quick experiment's 3 epochs
        assert console.count(f"  epoch {epoch}: loss ") == 1, console[-3000:]
    for noise in ("core_worker.cc", "(raylet)", "(pid=", "(RayTrainWorker", "INFO ", "WARNING", "Progress bars",
                  "available CPUs", "worker processes have been started", "Started a local Ray", "[36m"):
        assert noise not in console, (noise, console[-3000:])
    assert "Ray's logs: " in p.stderr and (tmp_path / "ray.log").exists()
    spec = json.loads((tmp_path / "prepare" / "feature_spec.json").read_text())
    assert spec["num_rows"]["train"] + spec["num_rows"]["valid"] + spec["num_rows"]["test"] == 5000
    p = subprocess.run([exe, "config", "validate", str(ROOT / "experiments/ml1m_swr.yaml"), "--set", "nme=x"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "nme: unknown key" in p.stderr and "Traceback" not in p.stderr


def test_serve_and_export_refuse_what_is_not_there(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["serve", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "artifact folder not found" in r.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    r = runner.invoke(app, ["serve", str(tmp_path / "half")])
    assert r.exit_code == 1 and "is not a model artifact (missing model.safetensors" in r.output
    r = runner.invoke(app, ["export", str(tmp_path)])
    assert r.exit_code == 1 and "no trained model under" in r.output
