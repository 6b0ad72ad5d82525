"""``python -m labelgw ca``: show the local CA, and install it into (or remove it from) the trust stores.

    python -m labelgw ca [--state-dir DIR]                 create the CA if needed, print its path and how to
                                                           trust it on Linux, macOS, Windows and in Firefox
    sudo python -m labelgw ca --install [--state-dir DIR]  add it to the system store (Debian/Ubuntu:
                                                           /usr/local/share/ca-certificates and
                                                           update-ca-certificates; Fedora/RHEL: anchors and
                                                           update-ca-trust)
    sudo python -m labelgw ca --uninstall [--state-dir DIR]

Under sudo the state directory defaults to the invoking user's, and is only read: a CA created by root in
the user's directory would be unreadable for the gateway running as that user.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from labelgw.tls.ca import CA_CERT_FILE, CAError, LocalCA, default_state_dir

CA_NICKNAME = "labelgw local CA"


@dataclass(frozen=True, slots=True)
class TrustStore:
    """A Linux system trust store fed by dropping a PEM file into a directory and running a command."""

    name: str
    anchor_dir: Path
    file_name: str
    refresh: tuple[str, ...]
    # Debian needs --fresh after a removal, or /etc/ssl/certs keeps a dangling link to the removed file.
    refresh_after_removal: tuple[str, ...] = ()

    @property
    def anchor_path(self) -> Path:
        return self.anchor_dir / self.file_name


DEBIAN = TrustStore(
    "Debian/Ubuntu",
    Path("/usr/local/share/ca-certificates"),
    "labelgw-local-ca.crt",
    ("update-ca-certificates",),
    ("update-ca-certificates", "--fresh"),
)
FEDORA = TrustStore(
    "Fedora/RHEL", Path("/etc/pki/ca-trust/source/anchors"), "labelgw-local-ca.pem", ("update-ca-trust", "extract")
)
LINUX_STORES: tuple[TrustStore, ...] = (DEBIAN, FEDORA)


@dataclass(frozen=True, slots=True)
class System:
    """What the command needs from the machine; tests pass their own."""

    platform: str = sys.platform
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    stores: tuple[TrustStore, ...] = LINUX_STORES
    is_root: Callable[[], bool] = lambda: hasattr(os, "geteuid") and os.geteuid() == 0
    which: Callable[[str], str | None] = shutil.which
    run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]] = lambda argv: subprocess.run(
        list(argv), capture_output=True, text=True, check=False
    )
    home_of: Callable[[str], Path | None] = lambda user: _home_of(user)


def _home_of(user: str) -> Path | None:
    try:
        import pwd  # noqa: PLC0415 - POSIX only
    except ImportError:
        return None
    try:
        return Path(pwd.getpwnam(user).pw_dir)
    except KeyError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m labelgw ca",
        description="Show labelgw's local certificate authority and install it into trust stores.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="labelgw's state directory (default: $XDG_DATA_HOME/labelgw or ~/.local/share/labelgw)",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--install", action="store_true", help="add the CA to the system trust store (root)")
    action.add_argument("--uninstall", action="store_true", help="remove it from the system trust store (root)")
    return parser


def main(argv: Sequence[str], out: TextIO = sys.stdout, system: System | None = None) -> int:
    system = system or System()
    args = build_parser().parse_args(list(argv))
    sudo_user = system.environ.get("SUDO_USER") if system.is_root() else None
    if args.state_dir is not None:
        state_dir = args.state_dir.expanduser().absolute()
    elif sudo_user and (home := system.home_of(sudo_user)) is not None:
        state_dir = home / ".local" / "share" / "labelgw"
    else:
        state_dir = default_state_dir(dict(system.environ))
    try:
        if sudo_user and not (state_dir / CA_CERT_FILE).exists():
            print(
                f"No labelgw CA in {state_dir}. Create it as {sudo_user} first (run `python -m labelgw ca` "
                "without sudo), or name the state directory with --state-dir.",
                file=out,
            )
            return 1
        ca = LocalCA.load_or_create(state_dir)
    except (CAError, OSError) as e:
        print(f"labelgw ca: {e}", file=out)
        return 1
    if args.install:
        return _install(ca, state_dir, out, system)
    if args.uninstall:
        return _uninstall(ca, state_dir, out, system)
    _describe(ca, out)
    print(file=out)
    print(instructions(ca.cert_path, state_dir), file=out)
    return 0


def _describe(ca: LocalCA, out: TextIO) -> None:
    fingerprint = hashlib.sha256(ca.certificate.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    print(ca.cert_path, file=out)
    print(f"  subject:  {ca.subject_cn}", file=out)
    print(f"  SHA-256:  {':'.join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2))}", file=out)
    print(f"  expires:  {ca.certificate.not_valid_after_utc:%Y-%m-%d}", file=out)


def _store_for(system: System) -> TrustStore | None:
    if not system.platform.startswith("linux"):
        return None
    for store in system.stores:
        if store.anchor_dir.is_dir() and system.which(store.refresh[0]):
            return store
    return None


def _root_needed(action: str, state_dir: Path, out: TextIO) -> int:
    command = shlex.join([sys.executable, "-m", "labelgw", "ca", action, "--state-dir", str(state_dir)])
    print(f"Changing the system trust store needs root. Run:\n  sudo {command}", file=out)
    return 1


def _install(ca: LocalCA, state_dir: Path, out: TextIO, system: System) -> int:
    store = _store_for(system)
    if store is None:
        print("labelgw cannot install into this system's trust store itself; do it by hand:\n", file=out)
        print(instructions(ca.cert_path, state_dir), file=out)
        return 1
    if not system.is_root():
        return _root_needed("--install", state_dir, out)
    target = store.anchor_path
    previous = _read_certificate(target)
    if previous is not None and previous == ca.certificate:
        print(f"Already installed: {target}", file=out)
    else:
        if previous is not None:
            print(f"Replacing the labelgw CA installed before ({_cn(previous)}).", file=out)
        target.write_bytes(ca.cert_pem)
        os.chmod(target, 0o644)
        print(f"Copied {ca.cert_path} to {target}", file=out)
    status = _refresh(store, out, system)
    if status == 0:
        print(
            "The system store now trusts it (curl, wget, OpenSSL-based tools). Firefox and Chrome on Linux keep "
            "their own stores:\n",
            file=out,
        )
        print(_firefox_steps(ca.cert_path), file=out)
    return status


def _uninstall(ca: LocalCA, state_dir: Path, out: TextIO, system: System) -> int:
    store = _store_for(system)
    if store is None:
        print(
            "labelgw cannot change this system's trust store itself. Remove the certificate named "
            f"{ca.subject_cn!r} by hand (Keychain Access on macOS, certmgr.msc on Windows).",
            file=out,
        )
        return 1
    if not system.is_root():
        return _root_needed("--uninstall", state_dir, out)
    target = store.anchor_path
    if not target.exists():
        print(f"Not installed ({target} does not exist).", file=out)
        return 0
    target.unlink()
    print(f"Removed {target}", file=out)
    return _refresh(store, out, system, store.refresh_after_removal or store.refresh)


def _refresh(store: TrustStore, out: TextIO, system: System, command: Sequence[str] = ()) -> int:
    command = tuple(command) or store.refresh
    result = system.run(command)
    output = (result.stdout + result.stderr).strip()
    if output:
        print(output, file=out)
    if result.returncode != 0:
        print(f"{shlex.join(command)} failed with exit status {result.returncode}", file=out)
        return 1
    return 0


def _read_certificate(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _cn(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string()


def _firefox_steps(cert_path: Path) -> str:
    path = shlex.quote(str(cert_path))
    return f"""\
Firefox (every platform): Settings > Privacy & Security > Certificates > View Certificates > Authorities >
  Import {cert_path}, and tick "Trust this CA to identify websites". Or, with NSS tools
  (apt install libnss3-tools), for every profile, with Firefox closed:
    for db in ~/.mozilla/firefox/*/cert9.db; do
      certutil -A -d "sql:$(dirname "$db")" -t C,, -n '{CA_NICKNAME}' -i {path}; done
  Or for all users, /etc/firefox/policies/policies.json:
    {{"policies": {{"Certificates": {{"Install": ["{cert_path}"]}}}}}}
  On Windows and macOS Firefox can use the system store instead: about:config,
  security.enterprise_roots.enabled = true.
Chrome/Chromium on Linux:
    certutil -A -d sql:$HOME/.pki/nssdb -t C,, -n '{CA_NICKNAME}' -i {path}"""


def instructions(cert_path: Path, state_dir: Path) -> str:
    """Exact steps per platform to trust the CA at C{cert_path}."""
    path = shlex.quote(str(cert_path))
    install = shlex.join([sys.executable, "-m", "labelgw", "ca", "--install", "--state-dir", str(state_dir)])
    return f"""\
Trust it (once per machine), then https://<service>.localhost works without warnings:

Debian/Ubuntu, Fedora/RHEL:
    sudo {install}
  by hand, Debian/Ubuntu:
    sudo cp {path} /usr/local/share/ca-certificates/labelgw-local-ca.crt && sudo update-ca-certificates
macOS:
    sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {path}
Windows (administrator prompt; or certutil -user -addstore Root for the current user only):
    certutil -addstore -f Root "{cert_path}"
{_firefox_steps(cert_path)}
Tools with their own CA bundle: Node.js NODE_EXTRA_CA_CERTS={path};
  Python requests REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt (after installing on Debian/Ubuntu)
Keep {state_dir / "ca-key.pem"} private: whoever has it can impersonate any site to this machine."""
