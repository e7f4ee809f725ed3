"""The CLI end to end on the session's local Ray cluster."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mcl_ray.cli import app

import tiny_data

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


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
