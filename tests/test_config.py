"""Configuration: precedence, the resolved file, and one-line errors naming the field."""

from __future__ import annotations

import pytest
import yaml

from dopsd_scale.config import ConfigError, load_config

from .conftest import DEBUG_CONFIG, REPO, run_dopsd


def test_precedence_defaults_yaml_overrides(make_config):
    cfg = make_config("optim.lr=2e-5", "objective.steps=random:2")
    assert cfg.optim.lr == 2e-5  # override beats YAML
    assert cfg.data.batch_size == 2  # YAML beats the default (1)
    assert cfg.optim.eps == 1e-8  # default kept
    assert cfg.objective.steps == "random:2"


@pytest.mark.parametrize(
    "override, field",
    [
        ("objective.num_steps=0", "objective.num_steps"),
        ("teacher.ema_decay=1.5", "teacher.ema_decay"),
        ("teacher.ema_decay=-0.1", "teacher.ema_decay"),
        ("objective.space=latent", "objective.space"),
        ("objective.steps=some", "objective.steps"),
        ("objective.sigmas=[1.0,0.5]", "objective.sigmas"),
        ("optim.lr=0", "optim.lr"),
        ("data.batch_size=abc", "data.batch_size"),
        ("optim.colour=3", "optim.colour"),
        ("model.path=/no/such/dir", "model.path"),
        ("model.path=null", "model.path"),
    ],
)
def test_bad_values_name_the_field(make_config, override, field):
    with pytest.raises(ConfigError) as err:
        make_config(override)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))


def test_cli_wrong_config_is_one_line_error(debug_models, features, tmp_path):
    out = run_dopsd(
        "train",
        "--config",
        str(DEBUG_CONFIG),
        f"model.path={debug_models['pipeline']}",
        f"data.path={features}",
        "teacher.ema_decay=2",
        timeout=120,
        check=False,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("dopsd train: error: config field 'teacher.ema_decay'")
    assert len([line for line in lines if "error" in line]) == 1


def test_resolved_config_is_written_and_reloads(make_config, tmp_path):
    from dopsd_scale.config import save_config

    cfg = make_config("optim.lr=7e-6")
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["optim"]["lr"] == 7e-6
    again = load_config(str(tmp_path / "config.yaml"))
    assert again == cfg


def test_shipped_configs_are_valid(debug_models, features):
    for path in sorted((REPO / "launch" / "configs").glob("*.yaml")):
        cfg = load_config(str(path), [f"model.path={debug_models['pipeline']}", f"data.path={features}"])
        assert cfg.run.max_steps > 0, path.name
