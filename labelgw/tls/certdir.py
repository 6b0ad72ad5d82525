"""User certificates from ``--cert-dir DIR``, picked up while running.

File convention (one certificate per *stem*; the names served come from the certificate, not the file name):
    <stem>.pem                          certificate, its chain, and the private key, in any order
    <stem>.pem or <stem>.crt  +  <stem>.key or <stem>-key.pem
                                        certificate (and chain) in one file, key in the other (the second
                                        form is what mkcert writes)
    default.pem (or default.crt + default.key)
                                        also the default certificate: served for unknown names and to
                                        clients that send no SNI

Host names are the certificate's subjectAltName DNS and IP entries (the subject CN only when there is no
SAN). A wildcard ``*.example.test`` covers exactly one label: ``a.example.test``, not ``example.test`` nor
``a.b.example.test``; an exact name wins over a wildcard. When two files claim a name the certificate that
expires last serves it. Hidden files (``.*``) are ignored, so editors' and Kubernetes' temporary files are
too; symlinks are followed.

The directory is polled (every 2 s by default). Listing, stat, reading and parsing run in a thread; the new
immutable L{CertIndex} is swapped in on the reactor thread, so handshakes only ever read memory. A file is
re-read when its (mtime, size, inode) changes, and files modified in the last few seconds are also compared
by content (file system mtimes are coarse: a same-size rewrite within one tick keeps the signature). A file
that cannot be used (unparseable, key not matching, expired, ...) is one log line naming it and the reason,
and whatever that file served before keeps serving.
Expired certificates are dropped (the names fall back to minted or default certificates).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from labelgw.tls.material import CertificateMaterial
from labelgw.tls.policy import (
    INTERMEDIATE,
    SERVER_KEY_TYPES,
    TLSPolicy,
    build_server_context,
    ip_literal,
    normalize_server_name,
    wildcard_parent,
)

RunInThread: TypeAlias = Callable[..., "Deferred[Any]"]

DEFAULT_STEM = "default"
SCAN_INTERVAL = 2.0
# Files modified this recently (wall clock seconds) are compared by content, not only by signature.
RACY_SECONDS = 5.0
MAX_FILE_SIZE = 1024 * 1024
_CERT_SUFFIXES = (".pem", ".crt")
_KEY_SUFFIXES = ("-key.pem", ".key")

# (file name, mtime_ns, size, inode) of every file a certificate was read from.
Signature: TypeAlias = tuple[tuple[str, int, int, int], ...]


def thread_runner(reactor: IReactorThreads) -> RunInThread:
    """Run blocking work in C{reactor}'s thread pool; results come back on the reactor thread."""
    from twisted.internet.threads import deferToThreadPool  # noqa: PLC0415

    def run(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)  # type: ignore[misc]

    return run


@dataclass(frozen=True, slots=True)
class UserCertificate:
    """One usable certificate from the directory, with its ready-made server context."""

    source: str
    names: tuple[str, ...]
    not_after: datetime
    fingerprint: str
    is_default: bool
    context: SSL.Context = field(compare=False, repr=False)
    # The same certificate for any TLS engine (labelgw.tls.material); None only in tests that build one by hand.
    material: CertificateMaterial | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class CertIndex:
    """Immutable name -> certificate map, replaced as a whole on every change."""

    exact: Mapping[str, UserCertificate] = field(default_factory=lambda: MappingProxyType({}))
    # Keyed by the parent domain: "*.example.test" is stored under "example.test".
    wildcard: Mapping[str, UserCertificate] = field(default_factory=lambda: MappingProxyType({}))
    default: UserCertificate | None = None

    def lookup(self, name: str) -> UserCertificate | None:
        """The certificate for a canonical name: exact match first, then a one-label wildcard."""
        found = self.exact.get(name)
        if found is not None:
            return found
        parent = wildcard_parent(name)
        return self.wildcard.get(parent) if parent is not None else None

    @classmethod
    def build(cls, certificates: Iterable[UserCertificate]) -> tuple[CertIndex, list[str]]:
        """The index, and one message per name claimed by more than one file (the loser is named)."""
        exact: dict[str, UserCertificate] = {}
        wildcard: dict[str, UserCertificate] = {}
        default: UserCertificate | None = None
        conflicts: list[str] = []
        # Sorted by (expiry, source) descending: the first claim of a name is the one that stays.
        for cert in sorted(certificates, key=lambda c: (c.not_after, c.source), reverse=True):
            if cert.is_default and default is None:
                default = cert
            for name in cert.names:
                table, key = (wildcard, name[2:]) if name.startswith("*.") else (exact, name)
                winner = table.get(key)
                if winner is None:
                    table[key] = cert
                elif winner is not cert:
                    conflicts.append(f"{name}: served from {winner.source} (expires last), not from {cert.source}")
        return cls(MappingProxyType(exact), MappingProxyType(wildcard), default), conflicts

    def count(self) -> int:
        """How many distinct certificates serve something."""
        served = {id(c) for c in (*self.exact.values(), *self.wildcard.values())}
        if self.default is not None:
            served.add(id(self.default))
        return len(served)


EMPTY_INDEX = CertIndex()


# --- the thread side: list, stat, read, parse ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """What a scan last saw of one certificate's files."""

    signature: Signature
    digest: bytes


@dataclass(frozen=True, slots=True)
class _Parsed:
    stem: str
    source: str
    seen: Seen
    certificate: UserCertificate | None
    error: str | None
    # Same bytes under a new signature (touched, or rewritten identically): nothing to reload or log.
    unchanged: bool = False


@dataclass(frozen=True, slots=True)
class _ScanResult:
    stems: frozenset[str]
    changed: tuple[_Parsed, ...]
    error: str | None = None


def scan_directory(
    directory: Path,
    known: Mapping[str, Seen],
    now: datetime,
    policy: TLSPolicy = INTERMEDIATE,
    default_stem: str = DEFAULT_STEM,
    wall_clock: Callable[[], float] = time.time,
) -> _ScanResult:
    """List C{directory} and parse every certificate whose files changed since C{known}. Blocking."""
    try:
        with os.scandir(directory) as entries:
            files = {e.name: e.stat() for e in entries if not e.name.startswith(".") and e.is_file()}
    except OSError as e:
        return _ScanResult(frozenset(known), (), f"{e.strerror or e}")
    groups = _group_files(files)
    changed: list[_Parsed] = []
    for stem, (cert_files, key_files) in sorted(groups.items()):
        involved = sorted((*cert_files, *key_files))
        signature = tuple((n, files[n].st_mtime_ns, files[n].st_size, files[n].st_ino) for n in involved)
        previous = known.get(stem)
        # File systems stamp mtimes with a coarse clock: a same-size rewrite within one tick of the last scan
        # keeps the signature. Recently modified files are therefore compared by content too.
        recent = any(wall_clock() - files[n].st_mtime < RACY_SECONDS for n in involved)
        if previous is not None and previous.signature == signature and not recent:
            continue
        source = "+".join(involved)
        try:
            contents = {n: _read(directory / n) for n in involved}
        except _Unusable as e:
            changed.append(_Parsed(stem, source, Seen(signature, b""), None, str(e)))
            continue
        seen = Seen(signature, hashlib.sha256(b"\0".join(contents[n] for n in involved)).digest())
        if previous is not None and previous.digest == seen.digest:
            if previous.signature != signature:
                changed.append(_Parsed(stem, source, seen, None, None, unchanged=True))
            continue
        try:
            certificate = _load(contents, cert_files, key_files, source, now, policy, stem == default_stem)
        except _Unusable as e:
            changed.append(_Parsed(stem, source, seen, None, str(e)))
        except Exception as e:  # noqa: BLE001 - whatever a hostile file does, it is that file's problem
            changed.append(_Parsed(stem, source, seen, None, f"{type(e).__name__}: {e}"))
        else:
            changed.append(_Parsed(stem, source, seen, certificate, None))
    return _ScanResult(frozenset(groups), tuple(changed))


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as e:
        raise _Unusable(f"cannot read {path.name}: {e.strerror or e}") from e
    if len(data) > MAX_FILE_SIZE:
        raise _Unusable(f"{path.name} is larger than {MAX_FILE_SIZE // 1024} KiB; not a certificate file")
    return data


def _group_files(files: Mapping[str, os.stat_result]) -> dict[str, tuple[list[str], list[str]]]:
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for name in files:
        for suffix in _KEY_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                groups.setdefault(name[: -len(suffix)], ([], []))[1].append(name)
                break
        else:
            for suffix in _CERT_SUFFIXES:
                if name.endswith(suffix) and len(name) > len(suffix):
                    groups.setdefault(name[: -len(suffix)], ([], []))[0].append(name)
    return groups


class _Unusable(Exception):
    """The reason a certificate file cannot be served, worded for the log line."""


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


def _load(
    contents: Mapping[str, bytes],
    cert_files: list[str],
    key_files: list[str],
    source: str,
    now: datetime,
    policy: TLSPolicy,
    is_default: bool,
) -> UserCertificate:
    if not cert_files:
        raise _Unusable(f"a key without a certificate (expected {key_files[0]} next to a .pem or .crt file)")
    if len(cert_files) > 1 or len(key_files) > 1:
        raise _Unusable("more than one certificate or key file with the same name; keep one")
    certificates: list[x509.Certificate] = []
    keys: list[PrivateKeyTypes] = []
    for file_name in (*cert_files, *key_files):
        for block in _PEM_BLOCK.finditer(contents[file_name]):
            label = block.group(1)
            try:
                if label in (b"CERTIFICATE", b"X509 CERTIFICATE"):
                    certificates.append(x509.load_pem_x509_certificate(block.group(0)))
                elif label == b"ENCRYPTED PRIVATE KEY":
                    raise _Unusable(f"{file_name}: the private key is encrypted; labelgw needs it unencrypted")
                elif label.endswith(b"PRIVATE KEY"):
                    keys.append(serialization.load_pem_private_key(block.group(0), password=None))
            except ValueError as e:
                raise _Unusable(f"{file_name}: unreadable {label.decode()} block ({e})") from e
    if not certificates:
        raise _Unusable("no PEM certificate found")
    if not keys:
        raise _Unusable("no private key found (put it in the same .pem or in a .key file)")
    if len(keys) > 1:
        raise _Unusable("more than one private key")
    key = keys[0]
    key_der = _public_der(key.public_key())
    leaf = next((c for c in certificates if _public_der(c.public_key()) == key_der), None)
    if leaf is None:
        raise _Unusable("the private key does not match any certificate in it")
    if leaf.not_valid_after_utc <= now:
        raise _Unusable(f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    names = certificate_names(leaf)
    if not names and not is_default:
        raise _Unusable("the certificate names no host (no subjectAltName DNS or IP entry, no usable CN)")
    chain = [c for c in certificates if c is not leaf]
    try:
        context = _build_context(policy, leaf, key, chain)
    except SSL.Error as e:
        raise _Unusable(f"OpenSSL refused it: {_openssl_reason(e)}") from e
    fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
    assert isinstance(key, SERVER_KEY_TYPES)  # _build_context refused the others
    material = CertificateMaterial(leaf, key, tuple(chain))
    return UserCertificate(source, names, leaf.not_valid_after_utc, fingerprint, is_default, context, material)


def _build_context(
    policy: TLSPolicy, leaf: x509.Certificate, key: PrivateKeyTypes, chain: list[x509.Certificate]
) -> SSL.Context:
    if not isinstance(key, SERVER_KEY_TYPES):
        raise _Unusable(f"a {type(key).__name__.removesuffix('PrivateKey')} key cannot serve TLS")
    return build_server_context(policy, leaf, key, chain)


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """Canonical host names a certificate serves: SAN DNS and IP entries, or the CN without a SAN.

    Wildcards are kept as "*.parent" only in the one-label form; partial wildcards ("f*.example.test") and
    names that are not host names are left out.
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        raw = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        raw += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        raw = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    names: list[str] = []
    for entry in raw:
        name: str | None
        if entry.startswith("*."):
            parent = normalize_server_name(entry[2:])
            name = f"*.{parent}" if parent is not None and ip_literal(parent) is None else None
        else:
            name = normalize_server_name(entry)
        if name is not None and name not in names:
            names.append(name)
    return tuple(names)


def _public_der(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _openssl_reason(error: SSL.Error) -> str:
    try:
        return "; ".join(str(reason[2]) for reason in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


# --- the reactor side: poll, apply, swap -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SourceState:
    seen: Seen
    source: str
    certificate: UserCertificate | None


class CertDirectory(Service):
    """Polls a certificate directory and keeps L{index} current. Read L{index} on the reactor thread only."""

    _log = Logger()

    def __init__(
        self,
        directory: Path,
        *,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        policy: TLSPolicy = INTERMEDIATE,
        interval: float = SCAN_INTERVAL,
        default_stem: str = DEFAULT_STEM,
    ) -> None:
        self.directory = Path(directory)
        self.index: CertIndex = EMPTY_INDEX
        self._clock = clock
        self._run_in_thread = run_in_thread
        self.policy = policy
        self._interval = interval
        self._default_stem = default_stem
        self._sources: dict[str, _SourceState] = {}
        self._directory_error: str | None = None
        self._loop: LoopingCall | None = None
        self._in_flight: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.scan_now)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self._log.failure("certificate directory poller stopped", failure=f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        # Return only once the thread doing a scan is done with the directory.
        return self._when_idle()

    def _when_idle(self) -> Deferred[None]:
        if self._in_flight is None:
            return defer.succeed(None)
        done: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            done.callback(None)
            return result

        self._in_flight.addBoth(fire)
        return done

    def scan_now(self) -> Deferred[None]:
        """Scan once (if a scan is already running, wait for that one). Never fails."""
        if self._in_flight is not None:
            return self._when_idle()
        now = datetime.fromtimestamp(self._clock.seconds(), UTC)
        known = {stem: state.seen for stem, state in self._sources.items()}
        scan: Deferred[Any] = self._run_in_thread(
            scan_directory, self.directory, known, now, self.policy, self._default_stem
        )
        scan.addCallback(self._apply, now)
        scan.addErrback(self._scan_failed)
        scan.addBoth(self._scan_done)
        if scan.called:
            return defer.succeed(None)
        self._in_flight = scan
        return self._when_idle()

    def _scan_done(self, result: object) -> None:
        self._in_flight = None

    def _scan_failed(self, failure: Failure) -> None:
        self._log.failure("scanning certificate directory {directory}", failure=failure, directory=str(self.directory))

    def _apply(self, result: _ScanResult, now: datetime) -> None:
        changed = False
        if result.error is not None:
            if self._directory_error != result.error:
                self._log.warn(
                    "cert dir {directory}: {error}; still serving the {count} certificates loaded before",
                    directory=str(self.directory),
                    error=result.error,
                    count=self.index.count(),
                )
            self._directory_error = result.error
            return
        if self._directory_error is not None:
            self._log.info("cert dir {directory} is readable again", directory=str(self.directory))
            self._directory_error = None
        for stem in sorted(set(self._sources) - result.stems):
            gone = self._sources.pop(stem)
            if gone.certificate is not None:
                self._log.info("cert dir: {source} removed, no longer serving {names}",
                               source=gone.source, names=", ".join(gone.certificate.names) or "(default only)")
                changed = True
        for parsed in result.changed:
            previous = self._sources.get(parsed.stem)
            if parsed.unchanged and previous is not None:
                self._sources[parsed.stem] = replace(previous, seen=parsed.seen)
            elif parsed.certificate is not None:
                cert = parsed.certificate
                self._log.info(
                    "cert dir: loaded {source} for {names}{default}, valid until {not_after} UTC",
                    source=parsed.source,
                    names=", ".join(cert.names) or "no names",
                    default=" (default certificate)" if cert.is_default else "",
                    not_after=f"{cert.not_after:%Y-%m-%d %H:%M}",
                )
                self._sources[parsed.stem] = _SourceState(parsed.seen, parsed.source, cert)
                changed = True
            else:
                kept = previous.certificate if previous is not None else None
                self._log.warn(
                    "cert dir: cannot use {source}: {reason}; {outcome}",
                    source=parsed.source,
                    reason=parsed.error,
                    outcome="still serving its previous version" if kept is not None else "not served",
                )
                # Remember the bad signature so the file is not re-read (and re-logged) every poll.
                self._sources[parsed.stem] = _SourceState(parsed.seen, parsed.source, kept)
        for stem, state in list(self._sources.items()):
            if state.certificate is not None and state.certificate.not_after <= now:
                self._log.warn("cert dir: {source} expired on {not_after} UTC; no longer served",
                               source=state.source, not_after=f"{state.certificate.not_after:%Y-%m-%d %H:%M}")
                self._sources[stem] = replace(state, certificate=None)
                changed = True
        if changed:
            index, conflicts = CertIndex.build(s.certificate for s in self._sources.values() if s.certificate)
            for conflict in conflicts:
                self._log.warn("cert dir: {conflict}", conflict=conflict)
            self.index = index
