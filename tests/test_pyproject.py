"""The Flower app section of pyproject.toml stays in step with the config dataclass."""

import tomllib
from pathlib import Path

from finetune.config import FedsiteConfig, from_mapping

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_app_config_lists_every_field_and_parses():
    app_config = PYPROJECT["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == set(FedsiteConfig().to_flat())  # flwr --run-config overrides only listed keys
    assert from_mapping(app_config).model == "smollm2"


def test_app_components_point_at_the_apps():
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "simulations.server_app:app", "clientapp": "client.client_app:app"}
    from client.client_app import app as client_app
    from simulations.server_app import app as server_app

    assert type(client_app).__name__ == "ClientApp" and type(server_app).__name__ == "ServerApp"
