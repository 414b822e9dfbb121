"""The console ships in the package: a built wheel carries its static files (nothing fetched at run time)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_a_built_wheel_carries_the_console_static_files(tmp_path: Path) -> None:
    # Built from a copy, so the build's own folders (build/, *.egg-info) never land in the work tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "proxy", src / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    # No build isolation: the project's own setup installed setuptools, and no index is needed.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = out.glob("seekgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "proxy/frontend/console/static").iterdir()}
    assert shipped == {"proxy/frontend/console/static/console.js", "proxy/frontend/console/static/console.css"}
    assert shipped <= names
    assert {"proxy/frontend/console/door.py", "proxy/frontend/console/pages.py", "proxy/py.typed"} <= names
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("proxy/frontend/console/static/console.js") == \
            (ROOT / "proxy/frontend/console/static/console.js").read_bytes()
