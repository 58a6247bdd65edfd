"""The layering check (tools/check_layers.py) passes on the package and catches a violation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "check_layers.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=60)


def test_package_respects_the_layers():
    res = _run()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "layering OK" in res.stdout


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "sirf_ddip"
    for rel, text in {"__init__.py": "", **files}.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


def test_lower_layer_importing_higher_one_fails_and_is_listed(tmp_path):
    pkg = _fake_package(tmp_path, {
        "physics/__init__.py": "",
        "physics/model.py": "import torch\n\ndef f():\n    from ..recon.em import em_update  # lazy still counts\n",
        "geometry/__init__.py": "from sirf_ddip.cli import main\n",
        "recon/__init__.py": "",
        "recon/em.py": "from ..physics import model\nfrom sirf_ddip.geometry import x\n",  # downward: fine
        "backends/__init__.py": "from ..prior import weights\n",  # same-rank siblings
        "cli/__init__.py": "",
        "prior/__init__.py": "",
    })
    res = _run(str(pkg))
    assert res.returncode == 1
    lines = sorted(res.stdout.strip().splitlines())
    assert len(lines) == 3, res.stdout
    assert lines[0].startswith("sirf_ddip/backends/__init__.py:1: backends") and "prior" in lines[0]
    assert lines[1].startswith("sirf_ddip/geometry/__init__.py:1: geometry") and "cli" in lines[1]
    assert lines[2].startswith("sirf_ddip/physics/model.py:4: physics") and "recon.em" in lines[2]


def test_not_a_package_folder_is_refused(tmp_path):
    res = _run(str(tmp_path))
    assert res.returncode == 2
    assert "not the sirf_ddip package folder" in res.stderr
