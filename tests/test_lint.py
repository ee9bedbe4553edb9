"""pyflakes over the project's own code: no unused imports or variables, no undefined names,
no shadowed definitions. Generated protobuf modules (`*_pb2*.py`) are left as protoc wrote them."""

import io
from pathlib import Path

from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aggregation", "benchmarks", "client", "coordinator", "dashboard", "emulator", "fedsite", "finetune", "protos", "simulations", "tests")


def test_pyflakes_finds_nothing():
    out = io.StringIO()
    reporter = Reporter(out, out)
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py")) if "_pb2" not in p.name]
    assert len(files) > 100
    found = sum(checkPath(str(path), reporter) for path in files)
    assert found == 0, out.getvalue()
