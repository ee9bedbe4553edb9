"""The Flower app section of pyproject.toml stays in step with the config dataclass."""

import tomllib
from pathlib import Path

from finetune.config import FedsiteConfig, from_mapping

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_app_config_lists_every_field_and_parses():
    app_config = PYPROJECT["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(FedsiteConfig().to_flat())  # flwr --run-config overrides only listed keys
    assert from_mapping(app_config).model == "smollm2"


def test_app_config_values_are_the_dataclass_defaults():
    """`flwr run` reads these, `fedsite simulate` the dataclass: one run's defaults, not two
    (the emulator's int8 and 100 distillation steps were once only in the dataclass)."""
    app_config, defaults = PYPROJECT["tool"]["flwr"]["app"]["config"], FedsiteConfig().to_flat()
    differ = {k: (v, defaults[k]) for k, v in app_config.items() if k != "out" and v != defaults[k]}
    assert not differ, differ


def test_app_components_point_at_the_apps():
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "simulations.server_app:app", "clientapp": "client.client_app:app"}
    from client.client_app import app as client_app
    from simulations.server_app import app as server_app

    assert type(client_app).__name__ == "ClientApp" and type(server_app).__name__ == "ServerApp"
