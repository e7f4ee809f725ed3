from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mcl_ray.cli import app
from mcl_ray.core.config import ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def base(**prepare):
    return {"name": "t", "data": {"source": "movielens-1m"}, "prepare": prepare}


def test_experiments_exist():
    names = {p.name for p in EXPERIMENTS}
    assert "ml1m_swr.yaml" in names and "ml1m_swr_quick.yaml" in names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_parses(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    # Round trip: what `config show` prints is itself a valid config.
    again = validate_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        validate_config(base(split={"kindd": "random"}))
    msg = str(e.value)
    assert "prepare.split.kindd: unknown key" in msg
    assert "kind" in msg and "ratios" in msg and "temporal_mode" in msg


def test_unknown_key_in_source_variant():
    with pytest.raises(ConfigError) as e:
        validate_config({"name": "t", "data": {"source": "synthetic", "num_user": 5}})
    assert "data.num_user: unknown key" in str(e.value)
    assert "num_users" in str(e.value)


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        validate_config(base(label={"column": "rating", "op": "lt", "threshold": 3}))
    assert "prepare.label.op" in str(e.value) and "'gt'" in str(e.value) and "'binary'" in str(e.value)


def test_unknown_source_lists_sources():
    with pytest.raises(ConfigError) as e:
        validate_config({"name": "t", "data": {"source": "movielens-20m"}})
    assert "movielens-1m" in str(e.value) and "synthetic" in str(e.value)


@pytest.mark.parametrize("prepare, fragment", [
    ({"scenario": {"column": "age", "groups": {"a": [1], "b": [1]}}}, "is in scenario groups"),
    ({"scenario": {"column": "age", "groups": {"a": [1]}, "names": ["a"]}}, "not both"),
    ({"split": {"ratios": [0.8, 0.1, 0.2]}}, "sum to 1"),
    ({"numeric": ["rating"]}, "label leakage"),
    ({"categorical": [{"name": "age"}, {"name": "age"}]}, "listed twice"),
    ({"label": {"column": "rating", "op": "gt", "threshold": None}}, "threshold is required"),
])
def test_contradictions_rejected(prepare, fragment):
    with pytest.raises(ConfigError) as e:
        validate_config(base(**prepare))
    assert fragment in str(e.value)


def test_overrides_apply_and_parse_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base()))
    cfg = load_config(p, ["prepare.split.seed=7", "prepare.split.ratios=[0.7,0.2,0.1]",
                          "prepare.categorical.0.min_count=3", "data.max_interactions=100"])
    assert cfg.prepare.split.seed == 7
    assert cfg.prepare.split.ratios == (0.7, 0.2, 0.1)
    assert cfg.prepare.categorical[0].min_count == 3
    assert cfg.data.max_interactions == 100
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(p, ["prepare.split.seed"])
    with pytest.raises(ConfigError, match="prepare.split.sed: unknown key"):
        load_config(p, ["prepare.split.sed=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "l.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_cli_config_commands(tmp_path):
    r = CliRunner().invoke(app, ["config", "validate", str(ROOT / "experiments/ml1m_swr.yaml")])
    assert r.exit_code == 0 and "ok" in r.output
    r = CliRunner().invoke(app, ["config", "validate", str(ROOT / "experiments/ml1m_swr.yaml"),
                                 "--set", "prepare.split.kind=weekly"])
    assert r.exit_code == 2
    assert "prepare.split.kind" in r.output and "'temporal'" in r.output
    r = CliRunner().invoke(app, ["config", "show", str(ROOT / "experiments/ml1m_swr_quick.yaml")])
    assert r.exit_code == 0
    shown = yaml.safe_load(r.output)
    assert shown["data"]["max_interactions"] == 50000 and shown["prepare"]["split"]["ratios"] == [0.8, 0.1, 0.1]
    r = CliRunner().invoke(app, ["config", "show", "--doc"])
    assert r.exit_code == 0
    # every documented key carries a description
    assert "prepare.validation.policy" in r.output and "data.num_interactions" in r.output
    from mcl_ray.core.config import describe_schema

    for line in describe_schema():  # "path (type; default): meaning" or "section: meaning"
        sep = "): " if "): " in line else ": "
        key, found, meaning = line.partition(sep)
        assert found and key and meaning.strip(), f"undocumented key: {line!r}"


def test_retrieval_section_overrides_train_settings_for_the_retrieval_model():
    from mcl_ray.train.trainer import retrieval_config

    cfg = load_config(ROOT / "experiments/ml1m_swr_best.yaml")
    r = retrieval_config(cfg)
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.003, 0.0001)  # the ranking model's, chosen on validation
    assert cfg.prepare.label.soft and cfg.train.ordinal_cuts == [1, 2, 4]  # ordinal cuts, chosen on validation
    assert cfg.train.ordinal_weight == 0.25
    assert (r.train.lr, r.train.weight_decay, r.train.epochs) == (0.001, 0.00001, 5)
    assert r.train.ordinal_cuts == [] and r.train.soft_label == 0  # in-batch softmax: no rating targets
    plain = retrieval_config(load_config(ROOT / "experiments/ml1m_swr.yaml", ["retrieval.lr=null"]))
    assert (plain.train.lr, plain.train.weight_decay) == (0.001, 0.00001)  # null: train's own
