"""The built wheel installs the twistd plugin where Twisted finds it, and only the plugin.

The installed copy is checked in isolation: a fresh ``--target`` directory plus a view of the test
environment's site-packages with every labelgw file left out, so a labelgw already installed in
the test venv cannot make the test pass.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "twisted/plugins/labelgw_plugin.py"
# Copied to a temp dir for the build: no build/ or *.egg-info leftovers in (or from) the work tree.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "dropin.cache", "_trial_temp"
)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n--- stdout ---\n{result.stdout}"
        f"\n--- stderr ---\n{result.stderr}"
    )
    return result.stdout


def _can_build_without_isolation() -> bool:
    """True when this venv already has the build backend (scripts/test installs it): no download."""
    if importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("wheel") is None:
        return False
    major = importlib.metadata.version("setuptools").split(".")[0]
    return major.isdigit() and int(major) >= 68


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("packaging")
    source = work / "src"
    shutil.copytree(REPO_ROOT, source, ignore=_NOT_SOURCES, symlinks=True)
    wheels = work / "wheels"
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), "."]
    if _can_build_without_isolation():
        args.insert(-1, "--no-build-isolation")
    _run(args, cwd=source)
    (built,) = wheels.glob("labelgw-*.whl")
    return built


def test_wheel_ships_the_plugin_file_but_no_twisted_package_init(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PLUGIN in names
    assert "labelgw/__init__.py" in names
    # An __init__.py here would shadow Twisted's own twisted/ or twisted/plugins/ package.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.startswith("twisted/") and n != PLUGIN and not n.endswith("/")]
    assert not [n for n in names if n.startswith("tests/")]


def test_wheel_ships_the_dashboard_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):
        assert f"labelgw/static/{name}" in names


def _site_packages_without_labelgw(view: Path) -> Path:
    """Symlinks to everything in this venv's site-packages except labelgw's own files."""
    site = Path(sysconfig.get_paths()["purelib"])
    view.mkdir()
    for entry in site.iterdir():
        if entry.name == "labelgw" or entry.name.startswith(("labelgw-", "__editable__")):
            continue
        if entry.suffix == ".pth" or entry.suffix == ".egg-link":
            continue  # not read under -S anyway; an editable labelgw would hide behind one
        if entry.name == "twisted":
            (view / "twisted").mkdir()
            for child in entry.iterdir():
                if child.name != "plugins":
                    (view / "twisted" / child.name).symlink_to(child)
            (view / "twisted" / "plugins").mkdir()
            for child in (entry / "plugins").iterdir():
                if child.name not in ("labelgw_plugin.py", "dropin.cache", "__pycache__"):
                    (view / "twisted" / "plugins" / child.name).symlink_to(child)
            continue
        (view / entry.name).symlink_to(entry)
    return view


@pytest.fixture(scope="module")
def isolated(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(target dir with the wheel installed, environment for ``python -S``, a cwd outside the repo)."""
    work = tmp_path_factory.mktemp("installed")
    target = work / "target"
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        cwd=work,
    )
    deps = _site_packages_without_labelgw(work / "deps")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(deps)])
    cwd = work / "cwd"
    cwd.mkdir()
    return target, env, cwd


TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"


def test_installed_wheel_is_listed_by_twistd(isolated: tuple[Path, dict[str, str], Path]) -> None:
    target, env, cwd = isolated
    assert (target / PLUGIN).is_file()
    assert not (target / "twisted" / "__init__.py").exists()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    # -S: no site-packages of the test venv, only the target and the labelgw-free view of it.
    # What the twistd console script does (`python -m twisted.scripts.twistd` runs nothing).
    listing = _run([sys.executable, "-S", "-c", TWISTD, "--help"], cwd=cwd, env=env)
    commands = [line.split()[0] for line in listing.splitlines() if line.startswith("    ") and line.split()]
    assert "labelgw" in commands, listing


PROBE = """
import sys
import twisted.plugins.labelgw_plugin as plugin
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
import twisted.plugins

makers = {p.tapname: p for p in getPlugins(IServiceMaker, twisted.plugins)}
print(plugin.__file__)
print(makers["labelgw"].module)
print(sorted(m for m in sys.modules if m == "labelgw" or m.startswith("labelgw.")))
"""


def test_the_installed_admin_view_serves_its_dashboard(isolated: tuple[Path, dict[str, str], Path]) -> None:
    target, env, cwd = isolated
    probe = "import labelgw.control.admin as a; print(a.__file__); print(sorted(a.static_files()))"
    module, files = _run([sys.executable, "-S", "-c", probe], cwd=cwd, env=env).splitlines()
    assert Path(module).resolve() == (target / "labelgw" / "control" / "admin.py").resolve()
    assert files == "['dashboard.css', 'dashboard.html', 'dashboard.js']"


def test_plugin_module_does_not_import_labelgw(isolated: tuple[Path, dict[str, str], Path]) -> None:
    target, env, cwd = isolated
    plugin_file, module, imported = _run([sys.executable, "-S", "-c", PROBE], cwd=cwd, env=env).splitlines()
    assert Path(plugin_file).resolve() == (target / PLUGIN).resolve()
    assert module == "labelgw.cli.tap"
    assert imported == "[]"
