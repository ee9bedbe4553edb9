"""The project documents itself: README links stay inside the repository, docs/architecture.md
names files that exist and covers every package."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # markdown links and images
PATHS = re.compile(r"`((?:aggregation|benchmarks|client|coordinator|dashboard|emulator|fedsite|finetune|protos|simulations|tests)/[\w./*]*)`")
PACKAGES = ("protos", "aggregation", "finetune", "emulator", "client", "coordinator", "simulations", "dashboard", "fedsite")


def test_readme_links_the_architecture_page_and_nothing_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    links = LINK.findall(text)
    assert "docs/architecture.md" in links
    for target in links:
        assert "://" not in target and not target.startswith(("/", "..")), target
        assert (ROOT / target.split("#")[0]).exists(), target
    assert "shared/DESIGN.md" not in text


def test_the_architecture_page_names_real_files_and_every_package():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(PATHS.findall(text))
    assert len(named) > 60
    for path in named:
        spec = path.split(":")[0]
        matches = list(ROOT.glob(spec)) if "*" in spec else [ROOT / spec]
        assert matches and all(m.exists() for m in matches), path
    for package in PACKAGES:
        assert f"| `{package}/` |" in text, package
    for heading in ("## Layers", "## Data flow of one round", "### Simulated", "### Deployed", "## Deployment", "## Where each feature lives"):
        assert heading in text
    modules = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
               if p.name != "__init__.py" and not p.name.endswith(("_pb2.py", "_pb2_grpc.py")) and p.name != "__main__.py"}
    missing = sorted(m for m in modules if m not in named)
    assert not missing, f"modules the architecture page does not place: {missing}"
