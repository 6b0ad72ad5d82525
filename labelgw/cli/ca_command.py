"""``python -m labelgw ca``: show the local CA, and install it into (or remove it from) the trust stores.

    python -m labelgw ca [--state-dir DIR]            show the CA (path, fingerprint, name constraints) and how
                                                      to trust it on Linux, macOS, Windows and in Firefox;
                                                      creates nothing: without a CA it says so and how one
                                                      gets created
    python -m labelgw ca --create [--state-dir DIR]   create the CA now (the gateway does at its first start
                                                      with --https), then show it
    python -m labelgw ca --renew [--state-dir DIR]    replace the CA by a new one limited to local names; the
                                                      old files are moved aside, cached leaves removed
    sudo "$(command -v python)" -m labelgw ca --install [--state-dir DIR] [--dry-run]
                                                      add it to the system store (Debian/Ubuntu:
                                                      /usr/local/share/ca-certificates and
                                                      update-ca-certificates; Fedora/RHEL: anchors and
                                                      update-ca-trust); it prints what it will change first,
                                                      and with --dry-run only that
    sudo "$(command -v python)" -m labelgw ca --uninstall [--state-dir DIR]

The full path of the interpreter matters under sudo: sudo resets PATH, so a bare ``python`` would be the
system's, without labelgw (a virtualenv's interpreter is found by ``command -v python``).

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
from cryptography.x509.oid import NameOID

from labelgw.tls.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    LOCAL_DNS_ZONES,
    PERMITTED_NETWORKS,
    CAError,
    LocalCA,
    default_state_dir,
)

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
    action.add_argument("--create", action="store_true", help="create the CA now if there is none, then show it")
    action.add_argument(
        "--renew",
        action="store_true",
        help="replace the CA by a new one limited to local names (the old one is moved aside); re-install after",
    )
    action.add_argument("--install", action="store_true", help="add the CA to the system trust store (root)")
    action.add_argument("--uninstall", action="store_true", help="remove it from the system trust store (root)")
    parser.add_argument(
        "--dry-run", action="store_true", help="with --install: print what would change, change nothing"
    )
    return parser


def main(argv: Sequence[str], out: TextIO = sys.stdout, system: System | None = None) -> int:
    system = system or System()
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.dry_run and not args.install:
        parser.error("--dry-run goes with --install")
    sudo_user = system.environ.get("SUDO_USER") if system.is_root() else None
    if args.state_dir is not None:
        state_dir = args.state_dir.expanduser().absolute()
    elif sudo_user and (home := system.home_of(sudo_user)) is not None:
        state_dir = home / ".local" / "share" / "labelgw"
    else:
        state_dir = default_state_dir(dict(system.environ))
    exists = LocalCA.exists_in(state_dir)
    try:
        if sudo_user and args.renew:
            print(
                f"Run --renew as {sudo_user}, without sudo: files root creates in {state_dir} would be "
                "unreadable for the gateway. Then install the new CA with sudo.",
                file=out,
            )
            return 1
        if args.renew:
            return _renew(state_dir, out, system)
        if args.uninstall:
            return _uninstall(LocalCA.load_or_create(state_dir) if exists else None, state_dir, out, system)
        if sudo_user and not exists:
            print(
                f"No labelgw CA in {state_dir}. Create it as {sudo_user} first (run `python -m labelgw ca "
                "--create` without sudo), or name the state directory with --state-dir.",
                file=out,
            )
            return 1
        if not exists and (args.dry_run or not (args.create or args.install)):
            _describe_missing(state_dir, out)
            if args.dry_run:
                print(
                    "--install would create it first, then copy it into the system store. Dry run: nothing changed.",
                    file=out,
                )
            return 0
        if not exists:
            print(f"No labelgw CA in {state_dir} yet: creating it.", file=out)
        ca = LocalCA.load_or_create(state_dir)
    except (CAError, OSError) as e:
        print(f"labelgw ca: {e}", file=out)
        return 1
    if args.install:
        return _install(ca, state_dir, out, system, dry_run=args.dry_run)
    _describe(ca, out)
    print(file=out)
    print(instructions(ca.cert_path, state_dir, constrained=ca.constrained), file=out)
    return 0


def _python() -> str:
    """The interpreter to name in commands: the full path, so that sudo finds a virtualenv's labelgw."""
    return sys.executable or "python3"


def _command(*args: str) -> str:
    return shlex.join([_python(), "-m", "labelgw", "ca", *args])


def _describe_missing(state_dir: Path, out: TextIO) -> None:
    print(f"No labelgw CA in {state_dir} yet (nothing was created).", file=out)
    print(
        "The gateway creates it the first time it starts with HTTPS (on by default: twistd -n labelgw) and this "
        "state directory; or create it now:\n"
        f"  {_command('--create', '--state-dir', str(state_dir))}\n"
        "Then run this command again for the steps to trust it.",
        file=out,
    )


def _describe(ca: LocalCA, out: TextIO) -> None:
    print(ca.cert_path, file=out)
    print(f"  subject:  {ca.subject_cn}", file=out)
    print(f"  SHA-256:  {_fingerprint(ca.certificate)}", file=out)
    print(f"  expires:  {ca.certificate.not_valid_after_utc:%Y-%m-%d}", file=out)
    if ca.constrained:
        zones = ", ".join(LOCAL_DNS_ZONES)
        print(f"  signs:    local names only: {zones} and names under them;", file=out)
        print(f"            addresses in {', '.join(str(n) for n in PERMITTED_NETWORKS)}", file=out)
    else:
        print("  signs:    ANY name (no name constraints: this CA dates from before labelgw added them).", file=out)
        print(
            "            Replace it by one limited to local names: "
            f"{_command('--renew', '--state-dir', str(ca.state_dir))}",
            file=out,
        )


def _fingerprint(certificate: x509.Certificate) -> str:
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _renew(state_dir: Path, out: TextIO, system: System) -> int:
    old = _read_certificate(state_dir / CA_CERT_FILE)
    ca, moved = LocalCA.renew(state_dir)
    if moved:
        print(f"Replaced the local CA in {state_dir}:", file=out)
        for path in moved:
            print(f"  moved aside: {path}", file=out)
        print("  removed the cached leaf certificates (the gateway mints new ones)", file=out)
    else:
        print(f"There was no CA in {state_dir}; created one:", file=out)
    print(file=out)
    _describe(ca, out)
    print(file=out)
    print("A running gateway still serves leaves of the old CA: restart it.", file=out)
    if old is None:
        print(file=out)
        print(instructions(ca.cert_path, state_dir, constrained=ca.constrained), file=out)
        return 0
    old_cn = _common_name(old)
    store = _store_for(system)
    installed = store is not None and _read_certificate(store.anchor_path) == old
    print(
        f"\nRe-install: every trust store that has the old CA ({old_cn!r}, SHA-256 {_fingerprint(old)}) needs the "
        "new one instead; the old one stays trusted until it is removed.",
        file=out,
    )
    if installed and store is not None:
        print(f"  The system store has it ({store.anchor_path}); replace it with:", file=out)
    else:
        print("  System store (Debian/Ubuntu, Fedora/RHEL), replacing the old labelgw CA:", file=out)
    print(f"    sudo {_command('--install', '--state-dir', str(state_dir))}", file=out)
    quoted = shlex.quote(str(ca.cert_path))
    print(
        f"""\
  Firefox / Chrome on Linux (NSS): delete the old one, then import the new one:
    certutil -D -d sql:$HOME/.pki/nssdb -n '{CA_NICKNAME}'
    certutil -A -d sql:$HOME/.pki/nssdb -t C,, -n '{CA_NICKNAME}' -i {quoted}
    (Firefox: the same per profile, or Settings > Certificates > Authorities: delete {old_cn!r}, import)
  macOS:
    sudo security delete-certificate -c {shlex.quote(old_cn)} /Library/Keychains/System.keychain
    sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {quoted}
  Windows (administrator prompt):
    certutil -delstore Root "{old_cn}"
    certutil -addstore -f Root "{ca.cert_path}\"""",
        file=out,
    )
    return 0


def _store_for(system: System) -> TrustStore | None:
    if not system.platform.startswith("linux"):
        return None
    for store in system.stores:
        if store.anchor_dir.is_dir() and system.which(store.refresh[0]):
            return store
    return None


def _root_needed(action: str, state_dir: Path, out: TextIO) -> int:
    print(
        f"Changing the system trust store needs root. Run:\n  sudo {_command(action, '--state-dir', str(state_dir))}",
        file=out,
    )
    return 1


def _install(ca: LocalCA, state_dir: Path, out: TextIO, system: System, *, dry_run: bool = False) -> int:
    store = _store_for(system)
    if store is None:
        print("labelgw cannot install into this system's trust store itself; do it by hand:\n", file=out)
        print(instructions(ca.cert_path, state_dir, constrained=ca.constrained), file=out)
        return 1
    target = store.anchor_path
    previous = _read_certificate(target)
    already = previous is not None and previous == ca.certificate
    # The plan first, whatever happens next: the user sees what changes before it changes.
    print(f"{'Would' if dry_run else 'Will'} change the {store.name} system trust store:", file=out)
    if already:
        print(f"  {target} already holds this CA ({ca.subject_cn}); nothing to copy", file=out)
    else:
        print(f"  copy {ca.cert_path} to {target} (mode 0644)", file=out)
        print(f"    CA {ca.subject_cn}, SHA-256 {_fingerprint(ca.certificate)}", file=out)
        if previous is not None:
            print(f"    replacing the labelgw CA there now: {_cn(previous)}", file=out)
    print(f"  run {shlex.join(store.refresh)}", file=out)
    if not ca.constrained:
        print(
            "  Note: this CA has no name constraints (it can vouch for any site). Consider "
            f"{_command('--renew', '--state-dir', str(state_dir))} first.",
            file=out,
        )
    if dry_run:
        print("Dry run: nothing changed.", file=out)
        return 0
    if not system.is_root():
        return _root_needed("--install", state_dir, out)
    print(file=out)
    if already:
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


def _uninstall(ca: LocalCA | None, state_dir: Path, out: TextIO, system: System) -> int:
    store = _store_for(system)
    if store is None:
        name = repr(ca.subject_cn) if ca is not None else "'labelgw local CA ...'"
        print(
            "labelgw cannot change this system's trust store itself. Remove the certificate named "
            f"{name} by hand (Keychain Access on macOS, certmgr.msc on Windows).",
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


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


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


def instructions(cert_path: Path, state_dir: Path, *, constrained: bool = True) -> str:
    """Exact steps per platform to trust the CA at C{cert_path}."""
    path = shlex.quote(str(cert_path))
    install = _command("--install", "--state-dir", str(state_dir))
    key = state_dir / CA_KEY_FILE
    if constrained:
        risk = (
            f"Keep {key} private: whoever has it can impersonate local names (*.localhost, *.test, ...) to this "
            "machine; the CA's name constraints keep public sites out of its reach."
        )
    else:
        risk = f"Keep {key} private: whoever has it can impersonate any site to this machine."
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
{risk}"""
