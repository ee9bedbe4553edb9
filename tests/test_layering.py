"""Layers import downward only (DESIGN: protos and aggregation at the ground floor, simulations at
the top), also inside functions: the coordinator and the client meet only through messages."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must never import, at module level or lazily
FORBIDDEN = {
    "protos": {"aggregation", "finetune", "emulator", "client", "coordinator", "simulations", "fedsite"},
    "aggregation": {"finetune", "emulator", "client", "coordinator", "simulations", "fedsite"},
    "finetune": {"emulator", "client", "coordinator", "simulations", "fedsite"},
    "emulator": {"client", "coordinator", "simulations", "fedsite"},
    "client": {"coordinator", "simulations", "fedsite"},
    "coordinator": {"client", "simulations", "fedsite"},
    "simulations": {"fedsite"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(package):
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {f: bad for f, bad in wrong.items() if bad}


def test_the_scan_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from simulations.population import Population\n    import client.edge\n")
    assert imported_packages(module) == {"simulations", "client"}
