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
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
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


# --- issue 13: show creates nothing, --create, --install's plan, --dry-run, --renew ----------------------------


def test_show_creates_nothing_when_there_is_no_ca_and_says_how_it_gets_created(
    tmp_path: Path, store: TrustStore
) -> None:
    state = tmp_path / "state"
    status, output = run_command("--state-dir", str(state), system=linux(store, root=False))
    assert status == 0
    assert output.startswith(f"No labelgw CA in {state} yet (nothing was created).")
    assert "starts with HTTPS" in output
    assert f"{sys.executable} -m labelgw ca --create --state-dir {state}" in output
    assert not state.exists() and not tmp_path.joinpath("xdg").exists()
    # The default (XDG) state directory is not created either.
    system = linux(store, root=False, environ={"XDG_DATA_HOME": str(tmp_path / "xdg")})
    status, output = run_command(system=system)
    assert status == 0 and "nothing was created" in output
    assert not (tmp_path / "xdg").exists()


def test_create_creates_a_constrained_ca_and_shows_it(tmp_path: Path, store: TrustStore) -> None:
    state = tmp_path / "state"
    status, output = run_command("--create", "--state-dir", str(state), system=linux(store, root=False))
    assert status == 0
    assert LocalCA.load_or_create(state).constrained
    assert "local names only: localhost, test, internal, home.arpa, local, lan" in output
    assert "127.0.0.0/8" in output and "fe80::/10" in output
    assert "public sites out of its reach" in output
    # Creating again keeps the CA.
    before = (state / "ca.pem").read_bytes()
    status, output = run_command("--create", "--state-dir", str(state), system=linux(store, root=False))
    assert status == 0 and "creating it" not in output and (state / "ca.pem").read_bytes() == before


def test_install_prints_its_plan_before_changing_anything(tmp_path: Path, store: TrustStore) -> None:
    other = LocalCA.load_or_create(tmp_path / "other")
    store.anchor_path.write_bytes(other.cert_pem)
    state = tmp_path / "state"
    ca = LocalCA.load_or_create(state)
    run = FakeRun()
    status, output = run_command("--install", "--state-dir", str(state), system=linux(store, root=True, run=run))
    assert status == 0, output
    plan = output.index("Will change the Test system trust store:")
    copy = output.index(f"  copy {ca.cert_path} to {store.anchor_path} (mode 0644)")
    replacing = output.index(f"replacing the labelgw CA there now: CN={other.subject_cn}")
    refresh = output.index("  run refresh-store")
    done = output.index(f"Copied {ca.cert_path} to {store.anchor_path}")
    assert plan < copy < replacing < refresh < done
    assert ca.subject_cn in output[plan:done]


def test_install_dry_run_changes_nothing_even_as_root(tmp_path: Path, store: TrustStore) -> None:
    state = tmp_path / "state"
    run = FakeRun()
    system = linux(store, root=True, run=run)
    # No CA yet: nothing is created either.
    status, output = run_command("--install", "--dry-run", "--state-dir", str(state), system=system)
    assert status == 0 and "Dry run: nothing changed." in output and "would create it first" in output
    assert not state.exists()
    ca = LocalCA.load_or_create(state)
    status, output = run_command("--install", "--dry-run", "--state-dir", str(state), system=system)
    assert status == 0
    assert "Would change the Test system trust store:" in output
    assert f"copy {ca.cert_path} to {store.anchor_path}" in output
    assert output.rstrip().endswith("Dry run: nothing changed.")
    assert not store.anchor_path.exists() and run.commands == []


def test_dry_run_needs_install(tmp_path: Path, store: TrustStore, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_command("--dry-run", "--state-dir", str(tmp_path / "s"), system=linux(store, root=False))
    assert exit_info.value.code == 2
    assert "--dry-run goes with --install" in capsys.readouterr().err


def test_install_as_a_user_shows_the_plan_then_the_sudo_command_with_the_full_python_path(
    tmp_path: Path, store: TrustStore
) -> None:
    state = tmp_path / "state"
    LocalCA.load_or_create(state)
    status, output = run_command("--install", "--state-dir", str(state), system=linux(store, root=False))
    assert status == 1
    assert output.index("Will change") < output.index("needs root")
    # The venv's interpreter by its full path: under sudo a bare "python" would not have labelgw.
    assert Path(sys.executable).is_absolute()
    assert f"sudo {sys.executable} -m labelgw ca --install --state-dir {state}" in output
    assert not store.anchor_path.exists()


def test_uninstall_without_a_ca_creates_none(tmp_path: Path, store: TrustStore) -> None:
    status, output = run_command("--uninstall", "--state-dir", str(tmp_path / "s"), system=linux(store, root=True))
    assert status == 0 and "Not installed" in output
    assert not (tmp_path / "s").exists()


def _unconstrained_ca(state: Path) -> x509.Certificate:
    from test_tls_ca_constraints import write_unconstrained_ca  # noqa: PLC0415 - one helper, one place

    return write_unconstrained_ca(state)


def test_show_of_an_unconstrained_ca_says_how_to_renew(tmp_path: Path, store: TrustStore) -> None:
    state = tmp_path / "state"
    _unconstrained_ca(state)
    status, output = run_command("--state-dir", str(state), system=linux(store, root=False))
    assert status == 0
    assert "ANY name" in output and f"{sys.executable} -m labelgw ca --renew --state-dir {state}" in output
    assert "impersonate any site" in output


def test_renew_replaces_the_ca_and_says_what_to_reinstall(tmp_path: Path, store: TrustStore) -> None:
    state = tmp_path / "state"
    old = _unconstrained_ca(state)
    store.anchor_path.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    old_ca = LocalCA.load_or_create(state)
    old_ca.store_leaf(old_ca.issue_leaf(["api.example.com"], datetime.now(UTC)))
    run = FakeRun()
    status, output = run_command("--renew", "--state-dir", str(state), system=linux(store, root=False, run=run))
    assert status == 0, output
    new = LocalCA.load_or_create(state)
    assert new.constrained and new.certificate != old
    aside = sorted(p.name for p in state.glob("*-replaced-*.pem"))
    assert len(aside) == 2 and aside[0].startswith("ca-key-replaced-") and aside[1].startswith("ca-replaced-")
    for name in aside:
        assert f"moved aside: {state / name}" in output
    assert not (state / "leaves").exists() and "removed the cached leaf certificates" in output
    assert "restart it" in output
    assert f"The system store has it ({store.anchor_path})" in output
    assert f"sudo {sys.executable} -m labelgw ca --install --state-dir {state}" in output
    assert "labelgw local CA old 000000" in output  # the old CA by name, to find it in other stores
    assert "certutil -D" in output and "security delete-certificate" in output and "certutil -delstore" in output
    # Nothing was installed by --renew itself.
    assert store.anchor_path.read_bytes() == old.public_bytes(serialization.Encoding.PEM) and run.commands == []
    # The following --install replaces the old CA in the store.
    status, output = run_command("--install", "--state-dir", str(state), system=linux(store, root=True))
    assert status == 0 and store.anchor_path.read_bytes() == new.cert_pem


def test_renew_under_sudo_is_refused(tmp_path: Path, store: TrustStore) -> None:
    home = tmp_path / "home" / "alice"
    state = home / ".local" / "share" / "labelgw"
    before = LocalCA.load_or_create(state).cert_pem
    system = linux(store, root=True, environ={"SUDO_USER": "alice"}, home_of=lambda user: home)
    status, output = run_command("--renew", system=system)
    assert status == 1 and "Run --renew as alice, without sudo" in output
    assert (state / "ca.pem").read_bytes() == before
