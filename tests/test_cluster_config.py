"""cluster.yaml is a Ray cluster launcher config that Ray's own validation accepts."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))


def test_cluster_yaml_valid():
    cfg = yaml.safe_load(CLUSTER.read_text())
    validate(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert any("g" in t["node_config"]["InstanceType"][:2] for t in types.values()), "a GPU worker type"
    assert any("bootstrap.sh" in c for c in cfg["setup_commands"]), "setup installs the project"


def test_validation_has_teeth():
    cfg = yaml.safe_load(CLUSTER.read_text())
    cfg["available_node_types"]["cpu_worker"].pop("node_config")
    with pytest.raises(Exception):
        validate(cfg)
