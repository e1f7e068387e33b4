"""The GPU-host install the README gives (`pip install .` from a clone, or a wheel built from it)
produces a package that pins vLLM's toolchain and registers the plugin and the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from test_plugin_entrypoint import PROBE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from a copy of the tracked files, as a clone has them
    (setuptools writes build/ in the source tree)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        cwd=tmp_path,
    )
    (built,) = tmp_path.glob("pmod_serve-*.whl")
    return built


def test_wheel_pins_the_toolchain_and_registers_the_plugin(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    requires = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    assert "vllm==0.26.0" in requires and "transformers==5.16.0" in requires
    assert "pmod = pmod_serve.plugin:register" in entry_points
    assert "pmod-serve = pmod_serve.entrypoints.server:main" in entry_points
    # What `vllm serve <checkpoint>` and the demo need at run time ships in the wheel.
    assert "pmod_serve/model_executor/models/pmod_llava.py" in names and "pmod_serve/plugin.py" in names
    assert "pmod_serve/pmod/schedule.py" in names and "pmod_serve/entrypoints/server.py" in names
    # Every subpackage of the tree ships.
    shipped = {n.rsplit("/", 1)[0] for n in names if n.startswith("pmod_serve/") and n.endswith(".py")}
    assert shipped == {str(p.parent.relative_to(REPO)) for p in (REPO / "pmod_serve").rglob("*.py")}
    # The plain-PyTorch reference (the tests' oracle) is not part of the runtime wheel.
    assert not any(n.startswith(("pmod_reference/", "benchmarks/", "tests/")) for n in names)
    assert any(n.startswith("pmod_serve/transformers_utils/chat_templates/") and n.endswith(".jinja") for n in names)
    assert any(n.startswith("pmod_train/checkpoints/") for n in names)


def test_installed_wheel_serves_from_outside_the_clone(wheel, tmp_path):
    """`pip install <wheel>` into a fresh venv, then the plugin and the CLI from a directory with
    no checkout in it. The venv sees this environment's (pinned) dependencies through a path
    entry, whose own .pth files (the editable install of this clone) are not processed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "pinned_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              "--disable-pip-version-check", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = PROBE + "import pmod_serve; print(pmod_serve.__file__)\n"
    result = subprocess.run([str(python), "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1].startswith(str(site)), result.stdout  # the installed copy, not the clone
    cli = subprocess.run([str(venv / "bin" / "pmod-serve"), "--help"], cwd=elsewhere, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0 and "--demo" in cli.stdout, cli.stderr[-3000:]
