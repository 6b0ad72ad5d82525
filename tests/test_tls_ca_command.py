"""``python -m labelgw ca``: output, and install/uninstall against private trust store trees.

Nothing here touches the machine's trust store: the stores are directories under tmp_path, and the one test
that runs the real ``update-ca-certificates`` points every one of its paths into tmp_path.
"""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from support.gateway import twistd_environment
from test_tls_support import InlineThreads, handshake, real_time_clock

from labelgw.cli.ca_command import System, TrustStore, main
from labelgw.tls.ca import LocalCA
from labelgw.tls.sni import SNIContextSelector



class FakeRun:
    def __init__(self, returncode: int = 0, output: str = "1 added, 0 removed; done.") -> None:
        self.commands: list[tuple[str, ...]] = []
        self.returncode, self.output = returncode, output

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.commands.append(tuple(argv))
        return subprocess.CompletedProcess(list(argv), self.returncode, self.output, "")


def run_command(*argv: str, system: System) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out, system=system)
    return status, out.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    anchors = tmp_path / "anchors"
    anchors.mkdir()
    return TrustStore("Test", anchors, "labelgw-local-ca.crt", ("refresh-store",), ("refresh-store", "--fresh"))


def linux(store: TrustStore, *, root: bool, run: FakeRun | None = None, **kwargs: object) -> System:
    return System(
        platform="linux",
        environ=kwargs.pop("environ", {}),  # type: ignore[arg-type]
        stores=(store,),
        is_root=lambda: root,
        which=lambda name: f"/usr/sbin/{name}",
        run=run or FakeRun(),
        **kwargs,  # type: ignore[arg-type]
    )


def test_show_prints_the_ca_path_first(tmp_path: Path, store: TrustStore) -> None:
    # Issue 13: showing no longer creates the CA; --create does (see test_show_creates_nothing...).
    status, output = run_command("--create", "--state-dir", str(tmp_path / "state"), system=linux(store, root=False))
    assert status == 0 and "creating it" in output
    status, output = run_command("--state-dir", str(tmp_path / "state"), system=linux(store, root=False))
    assert status == 0
    lines = output.splitlines()
    assert lines[0] == str(tmp_path / "state" / "ca.pem")
    assert (tmp_path / "state" / "ca.pem").is_file()
    assert "SHA-256:" in output
    for expected in (
        "update-ca-certificates",
        "security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain",
        "certutil -addstore -f Root",
        "Firefox",
        "security.enterprise_roots.enabled",
    ):
        assert expected in output
    assert "BEGIN" not in output


def test_default_state_dir_is_xdg(tmp_path: Path, store: TrustStore) -> None:
    system = linux(store, root=False, environ={"XDG_DATA_HOME": str(tmp_path / "xdg")})
    LocalCA.load_or_create(tmp_path / "xdg" / "labelgw")
    status, output = run_command(system=system)
    assert status == 0
    assert output.splitlines()[0] == str(tmp_path / "xdg" / "labelgw" / "ca.pem")


def test_install_needs_root_and_says_how(tmp_path: Path, store: TrustStore) -> None:
    run = FakeRun()
    status, output = run_command(
        "--install", "--state-dir", str(tmp_path / "state"), system=linux(store, root=False, run=run)
    )
    assert status == 1
    assert "needs root" in output
    assert f"sudo {sys.executable} -m labelgw ca --install --state-dir {tmp_path / 'state'}" in output
    assert not store.anchor_path.exists() and run.commands == []


def test_install_and_uninstall_as_root(tmp_path: Path, store: TrustStore) -> None:
    run = FakeRun()
    system = linux(store, root=True, run=run)
    state = str(tmp_path / "state")
    status, output = run_command("--install", "--state-dir", state, system=system)
    assert status == 0, output
    ca = LocalCA.load_or_create(Path(state))
    assert store.anchor_path.read_bytes() == ca.cert_pem
    assert stat.S_IMODE(store.anchor_path.stat().st_mode) == 0o644
    assert run.commands == [("refresh-store",)]
    assert "Firefox" in output and "1 added, 0 removed; done." in output

    status, output = run_command("--install", "--state-dir", state, system=system)
    assert status == 0 and "Already installed" in output

    status, output = run_command("--uninstall", "--state-dir", state, system=system)
    assert status == 0 and "Removed" in output
    assert not store.anchor_path.exists()
    assert run.commands[-1] == ("refresh-store", "--fresh")

    status, output = run_command("--uninstall", "--state-dir", state, system=system)
    assert status == 0 and "Not installed" in output


def test_install_replaces_another_labelgw_ca(tmp_path: Path, store: TrustStore) -> None:
    other = LocalCA.load_or_create(tmp_path / "other")
    store.anchor_path.write_bytes(other.cert_pem)
    status, output = run_command("--install", "--state-dir", str(tmp_path / "state"), system=linux(store, root=True))
    assert status == 0
    assert "Replacing the labelgw CA installed before" in output
    assert store.anchor_path.read_bytes() == LocalCA.load_or_create(tmp_path / "state").cert_pem


def test_failing_refresh_is_an_error(tmp_path: Path, store: TrustStore) -> None:
    run = FakeRun(returncode=3, output="boom")
    status, output = run_command(
        "--install", "--state-dir", str(tmp_path / "state"), system=linux(store, root=True, run=run)
    )
    assert status == 1
    assert "boom" in output and "refresh-store failed with exit status 3" in output


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_other_platforms_get_instructions(tmp_path: Path, store: TrustStore, platform: str) -> None:
    system = System(platform=platform, environ={}, stores=(store,), is_root=lambda: True, run=FakeRun())
    status, output = run_command("--install", "--state-dir", str(tmp_path / "state"), system=system)
    assert status == 1
    assert "by hand" in output and "security add-trusted-cert" in output and "certutil -addstore" in output
    assert not store.anchor_path.exists()


def test_linux_without_a_known_store(tmp_path: Path) -> None:
    missing = TrustStore("None", tmp_path / "nope", "x.crt", ("refresh-store",))
    status, output = run_command(
        "--install", "--state-dir", str(tmp_path / "state"), system=linux(missing, root=True)
    )
    assert status == 1 and "by hand" in output


def test_under_sudo_uses_the_invoking_users_ca_and_never_creates_one(tmp_path: Path, store: TrustStore) -> None:
    home = tmp_path / "home" / "alice"
    system = linux(store, root=True, environ={"SUDO_USER": "alice"}, home_of=lambda user: home)
    status, output = run_command("--install", system=system)
    assert status == 1
    assert "Create it as alice first" in output
    assert not (home / ".local").exists()

    ca = LocalCA.load_or_create(home / ".local" / "share" / "labelgw")
    status, output = run_command("--install", system=system)
    assert status == 0, output
    assert store.anchor_path.read_bytes() == ca.cert_pem


def test_unusable_ca_files_are_reported(tmp_path: Path, store: TrustStore) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "ca.pem").write_text("broken")
    status, output = run_command("--state-dir", str(state), system=linux(store, root=False))
    assert status == 1 and output.startswith("labelgw ca: cannot load the local CA")


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    # The labelgw this interpreter imports: installed by scripts/test, else the working tree on PYTHONPATH.
    env = twistd_environment({"HOME": str(tmp_path)})
    LocalCA.load_or_create(tmp_path / "s")  # showing creates nothing (issue 13)
    shown = subprocess.run(
        [sys.executable, "-m", "labelgw", "ca", "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == str(tmp_path / "s" / "ca.pem")
    unknown = subprocess.run(
        [sys.executable, "-m", "labelgw", "nope"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False,
    )
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr


@pytest.mark.skipif(shutil.which("update-ca-certificates") is None, reason="needs Debian's update-ca-certificates")
def test_real_update_ca_certificates_in_a_private_tree(tmp_path: Path) -> None:
    """The installed file is what Debian's tool expects: its bundle then verifies minted leaves."""
    tree = tmp_path / "tree"
    certs_dir, local_dir, etc_dir, hooks = (tree / d for d in ("share", "local", "etc", "hooks"))
    for d in (certs_dir, local_dir, etc_dir, hooks):
        d.mkdir(parents=True)
    # Another CA is always present on a real system; the tool rebuilds the bundle only when one is.
    unrelated = LocalCA.load_or_create(tmp_path / "unrelated")
    (certs_dir / "unrelated.crt").write_bytes(unrelated.cert_pem)
    (tree / "ca-certificates.conf").write_text("unrelated.crt\n")
    base = (
        "update-ca-certificates",
        "--certsconf", str(tree / "ca-certificates.conf"),
        "--certsdir", str(certs_dir),
        "--localcertsdir", str(local_dir),
        "--etccertsdir", str(etc_dir),
        "--hooksdir", str(hooks),
    )
    store = TrustStore("Debian (private tree)", local_dir, "labelgw-local-ca.crt", base, (*base, "--fresh"))
    system = System(platform="linux", environ={}, stores=(store,), is_root=lambda: True)
    state = tmp_path / "state"
    bundle = etc_dir / "ca-certificates.crt"

    status, output = run_command("--install", "--state-dir", str(state), system=system)
    assert status == 0, output
    ca = LocalCA.load_or_create(state)
    assert ca.cert_pem in bundle.read_bytes()
    assert (etc_dir / "labelgw-local-ca.pem").resolve() == store.anchor_path

    selector = SNIContextSelector(
        clock=real_time_clock(), run_in_thread=InlineThreads(), is_routed=lambda name: False, local_ca=ca
    )
    assert handshake(selector, "api.localhost", cadata=bundle.read_bytes()).ok

    status, output = run_command("--uninstall", "--state-dir", str(state), system=system)
    assert status == 0, output
    assert ca.cert_pem not in bundle.read_bytes()
    assert not (etc_dir / "labelgw-local-ca.pem").exists()
    assert not handshake(selector, "api.localhost", cadata=bundle.read_bytes()).ok
