# -*- test-case-name: tests.test_tls_deadlines,tests.test_stdtls -*-
"""TLS for a listener on the standard library's ssl: C{SSLObject} over two C{MemoryBIO}s, no pyOpenSSL per record.

Twisted's TLS layer (C{TLSMemoryBIOProtocol}) runs pyOpenSSL through cffi with Python around every record and
queues every ciphertext write until the reactor's next turn. Here the standard library's C code does the record
work, and ciphertext goes to the socket at once when the kernel buffer has room (L{labelgw.http.fastwrite}), as
the plain path does. Everything else keeps the shape of L{labelgw.tls.deadlines} (the pyOpenSSL engine, kept as
``--tls-engine openssl``):

- the protocol behind is connected when TCP is (its head deadline runs from the connect), and L{StdTLSFactory}
  gives the handshake a deadline of its own (the head deadline);
- back-pressure: a producer registered on this transport is registered on TCP itself (every ciphertext write
  is handed to TCP when it is made, so TCP's buffer is the only one); pausing this transport stops both the
  socket reads and the delivery of what is already decrypted;
- closing: close_notify, then TCP is closed after the grace whatever the client does, and aborted when it does
  not read what is left; a client's close_notify is answered and the connection closed; a protocol that closes
  during the handshake aborts it.

Certificates: the SNI callback asks the engine-independent selector (L{labelgw.tls.sni.SNIContextSelector.choose})
and switches the connection to that material's C{ssl.SSLContext}, built once per material (L{ServerContexts}).
Session tickets are on (TLS 1.2 and 1.3): OpenSSL encrypts them under keys of the first context of a connection,
which L{ServerContexts} replaces every L{TICKET_KEY_LIFETIME} seconds, so a ticket key never lives long enough to
undo forward secrecy for long.

What the standard library cannot do, done without pyOpenSSL: the key-exchange groups (only one curve through
C{set_ecdh_curve}; L{set_groups} calls OpenSSL's C{SSL_CTX_set1_groups_list} on the context, through ctypes, on the
libssl the ssl module itself uses), and loading a key and certificate from memory (C{load_cert_chain} reads files:
an anonymous memfd, never the disk). TLS 1.3 suites: the ssl module keeps OpenSSL's default list, which is the
policy's (checked at start-up).
"""

from __future__ import annotations

import ctypes
import os
import ssl
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IProtocolFactory, IProtocolNegotiationFactory, IReactorTime, ISSLTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from labelgw.http.fastwrite import write_now
from labelgw.tls.deadlines import DEFAULT_CLOSE_GRACE, FLUSH_TIMEOUT
from labelgw.tls.material import CertificateMaterial, Served
from labelgw.tls.policy import INTERMEDIATE, TLSPolicy

# Seconds a dispatch context (whose keys encrypt session tickets) serves new connections before a fresh one
# replaces it; tickets issued under the old keys then lead to a full handshake.
TICKET_KEY_LIFETIME = 3600.0
# TLS 1.3 tickets per handshake (OpenSSL sends 2 by default): one is what a client resumes with.
TLS13_TICKETS = 1
# Plaintext read per SSLObject.read call (several records; what is decrypted is handed over in one call).
READ_SIZE = 256 * 1024
# OpenSSL's default TLS 1.3 suites, the only ones the ssl module can serve (it has no set_ciphersuites).
_OPENSSL_TLS13 = {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF = 0


ACME_TLS_ALPN = b"acme-tls/1"
# A ClientHello is read whole from its first record (at most 2^14 bytes of handshake data).
_MAX_RECORD = 5 + (1 << 14)


def client_hello_alpn(data: bytes | bytearray) -> tuple[bytes, ...] | None:
    """The ALPN protocols a ClientHello offers, from the bytes a client sent first; None until its first record
    is complete. () for anything that is not a well-formed ClientHello with ALPN (OpenSSL judges the rest)."""
    if len(data) < 5:
        return None
    if data[0] != 0x16:
        return ()
    end = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < end:
        return None
    try:
        if data[5] != 0x01:
            return ()
        at = 5 + 4 + 2 + 32  # handshake header, legacy version, random
        at += 1 + data[at]  # session id
        at += 2 + int.from_bytes(data[at : at + 2], "big")  # cipher suites
        at += 1 + data[at]  # compression methods
        extensions_end = min(end, at + 2 + int.from_bytes(data[at : at + 2], "big"))
        at += 2
        while at + 4 <= extensions_end:
            kind = int.from_bytes(data[at : at + 2], "big")
            size = int.from_bytes(data[at + 2 : at + 4], "big")
            at += 4
            if kind == 16:  # application_layer_protocol_negotiation
                offered: list[bytes] = []
                item, stop = at + 2, min(at + size, extensions_end)
                while item < stop:
                    length = data[item]
                    offered.append(bytes(data[item + 1 : item + 1 + length]))
                    item += 1 + length
                return tuple(offered)
            at += size
    except IndexError:
        return ()
    return ()


class ChallengeSource(TypingProtocol):
    """TLS-ALPN-01 (RFC 8737): the challenge certificate for a name being validated, or None."""

    def __call__(self, server_name: str) -> CertificateMaterial | None: ...


class CertificateChooser(TypingProtocol):
    """The engine-independent certificate choice (L{labelgw.tls.sni.SNIContextSelector} is one)."""

    @property
    def policy(self) -> TLSPolicy: ...

    def choose(self, server_name: str | None) -> Served | None: ...


# --- contexts -------------------------------------------------------------------------------------------------


def _libssl() -> Any:
    # The ssl extension module links libssl: dlsym through its handle finds the very library it uses (the
    # cryptography/pyOpenSSL wheel carries another copy, whose functions must never see these contexts).
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    lib.SSL_is_server.restype = ctypes.c_int
    lib.SSL_is_server.argtypes = [ctypes.c_void_p]
    lib.SSL_new_session_ticket.restype = ctypes.c_int
    lib.SSL_new_session_ticket.argtypes = [ctypes.c_void_p]
    return lib


_LIB: Any = None


def _ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The SSL_CTX pointer of a standard-library context; None when it could not be found safely.

    It is the first field after the object header of the ssl module's context object; it is checked (the options
    OpenSSL reports must be the context's) before it is used.
    """
    global _LIB
    try:
        if _LIB is None:
            _LIB = _libssl()
        pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not pointer or _LIB.SSL_CTX_get_options(pointer) != int(ctx.options):
            return None
        return int(pointer)
    except (OSError, AttributeError, ValueError):
        return None


def _ctx_control(ctx: ssl.SSLContext, command: int, larg: int, parg: Any) -> int | None:
    """OpenSSL's C{SSL_CTX_ctrl} on a standard-library context; None when it could not be done safely."""
    pointer = _ctx_pointer(ctx)
    if pointer is None:
        return None
    try:
        return int(_LIB.SSL_CTX_ctrl(pointer, command, larg, parg))
    except (OSError, AttributeError, ValueError):
        return None


# Where the ssl module's connection object keeps its SSL pointer: after the object header and the socket's weak
# reference, before the context (CPython's PySSLSocket); None: not checked yet, 0: not usable here.
_SSL_OFFSET: int | None = None


def _ssl_offset() -> int:
    """The offset of the SSL pointer in the ssl module's connection object, checked on a throwaway connection
    (the field after it is the context object itself, and OpenSSL names the same SSL_CTX); 0 when it is not
    where CPython 3.11-3.13 put it."""
    global _SSL_OFFSET
    if _SSL_OFFSET is None:
        _SSL_OFFSET = 0
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            probe = raw_tls(ctx, ssl.MemoryBIO(), ssl.MemoryBIO(), True, None)
            word = ctypes.sizeof(ctypes.c_void_p)
            offset = object.__basicsize__ + word
            ctx_pointer = _ctx_pointer(ctx)
            # Checked in Python first (the context object's address), so that OpenSSL is never handed a wrong pointer.
            if ctx_pointer is not None and ctypes.c_void_p.from_address(id(probe) + offset + word).value == id(ctx):
                pointer = ctypes.c_void_p.from_address(id(probe) + offset).value
                if pointer and _LIB.SSL_get_SSL_CTX(pointer) == ctx_pointer and _LIB.SSL_is_server(pointer) == 1:
                    _SSL_OFFSET = offset
        except (OSError, AttributeError, ValueError):
            _SSL_OFFSET = 0
    return _SSL_OFFSET


def deferred_tickets() -> bool:
    """Whether a TLS 1.3 server's session ticket can be made at its first write (L{new_session_ticket}) instead of
    at the end of every handshake."""
    return _ssl_offset() != 0


def new_session_ticket(tls: Any) -> bool:
    """OpenSSL's C{SSL_new_session_ticket} on a server connection (L{raw_tls}'s object) whose handshake is done: a
    TLS 1.3 session ticket goes out ahead of the next write. False if it could not be done."""
    offset = _ssl_offset()
    if not offset:
        return False
    pointer = ctypes.c_void_p.from_address(id(tls) + offset).value
    return bool(pointer) and _LIB.SSL_new_session_ticket(pointer) == 1


def set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    """Set the key-exchange groups of a standard-library context; False when it could not be done safely."""
    return _ctx_control(ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(groups.encode("ascii"))) == 1


def session_cache_off(ctx: ssl.SSLContext) -> bool:
    """No server-side session cache (OpenSSL keeps one per context by default: every full TLS 1.2 handshake adds
    its session, up to 20 480, and every 255th walks them all); resumption is by tickets, which need none."""
    return _ctx_control(ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None) is not None


def _load_material(ctx: ssl.SSLContext, material: CertificateMaterial) -> None:
    pem = material.pem()
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("labelgw-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        finally:
            os.close(fd)
    # Without memfd: a private file, removed at once.
    with tempfile.NamedTemporaryFile(prefix="labelgw-cert-", suffix=".pem") as file:
        file.write(pem)
        file.flush()
        ctx.load_cert_chain(file.name)


def build_stdlib_context(
    policy: TLSPolicy, alpn: Sequence[bytes], material: CertificateMaterial | None = None
) -> ssl.SSLContext:
    """A server context of the standard library with the policy's protocols, ciphers, groups and ALPN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # The client picks among strong suites (Mozilla intermediate); no compression, no renegotiation; tickets on.
    ctx.options &= ~(ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_ciphers(policy.tls12_ciphers)
    ctx.num_tickets = TLS13_TICKETS
    set_groups(ctx, policy.groups)
    session_cache_off(ctx)
    if alpn:
        ctx.set_alpn_protocols([p.decode("ascii") for p in alpn])
    if material is not None:
        _load_material(ctx, material)
    return ctx


def check_policy(policy: TLSPolicy) -> str | None:
    """Why the standard library cannot serve C{policy} exactly (None: it can)."""
    wanted = set(policy.tls13_ciphersuites.split(":"))
    if wanted != _OPENSSL_TLS13:
        return f"the ssl module cannot restrict the TLS 1.3 suites to {policy.tls13_ciphersuites}"
    if not set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), policy.groups):
        return f"the groups {policy.groups} could not be set (OpenSSL's defaults apply)"
    return None


def listener_alpn(wrapped: IProtocolFactory, policy: TLSPolicy) -> tuple[bytes, ...]:
    """ALPN for a listener: what its factory says it speaks (IProtocolNegotiationFactory), else the policy's."""
    negotiation = IProtocolNegotiationFactory(wrapped, None)
    return tuple(negotiation.acceptableProtocols()) if negotiation is not None else policy.alpn_protocols


class ServerContexts:
    """The standard-library contexts of one listener: a dispatch context per ticket-key period, one per material.

    Use on the reactor thread only.
    """

    _log = Logger()

    def __init__(
        self,
        chooser: CertificateChooser,
        alpn: Sequence[bytes],
        clock: IReactorTime,
        ticket_key_lifetime: float = TICKET_KEY_LIFETIME,
        challenges: ChallengeSource | None = None,
    ) -> None:
        self._chooser = chooser
        # TLS-ALPN-01: with a source, every connection's ClientHello is read for an acme-tls/1 offer.
        self.challenges = challenges
        self._challenge_contexts: weakref.WeakKeyDictionary[CertificateMaterial, ssl.SSLContext] = (
            weakref.WeakKeyDictionary()
        )
        self.policy: TLSPolicy = chooser.policy
        self._policy = self.policy
        self._alpn = tuple(alpn)
        self._clock = clock
        self._lifetime = ticket_key_lifetime
        # Lives as long as the material does: a rotated or evicted certificate takes its context with it.
        self._contexts: weakref.WeakKeyDictionary[CertificateMaterial, ssl.SSLContext] = weakref.WeakKeyDictionary()
        self._dispatch: ssl.SSLContext | None = None
        self._dispatch_since = 0.0
        # TLS 1.3 session tickets made at a connection's first write (none for a client that leaves first).
        self.deferred_tickets = deferred_tickets()

    def server_object(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, owner: Any) -> Any:
        """The ssl module's C object for one server connection (L{raw_tls}); C{owner} is what the SNI callback is
        handed (the connection's L{StdTLSProtocol})."""
        ctx = self._dispatch
        if ctx is None or self._clock.seconds() - self._dispatch_since >= self._lifetime:
            ctx = self._dispatch_context()
        # raw_tls's server call, made here: once per connection.
        return ctx._wrap_bio(incoming, outgoing, server_side=True, server_hostname=None, owner=owner, session=None)  # type: ignore[attr-defined]

    def _dispatch_context(self) -> ssl.SSLContext:
        now = self._clock.seconds()
        if self._dispatch is None or now - self._dispatch_since >= self._lifetime:
            ctx = build_stdlib_context(self._policy, self._alpn)
            if self.deferred_tickets:
                # A connection's tickets come from this context (SSL_new copies the count): none at the end of the
                # handshake; StdTLSProtocol asks for one at the first write.
                ctx.num_tickets = 0
            # Run by OpenSSL with or without SNI, before any certificate is chosen.
            ctx.sni_callback = self._on_server_name
            self._dispatch, self._dispatch_since = ctx, now
        return self._dispatch

    def context_for(self, material: CertificateMaterial) -> ssl.SSLContext:
        ctx = self._contexts.get(material)
        if ctx is None:
            ctx = build_stdlib_context(self._policy, self._alpn, material)
            self._contexts[material] = ctx
        return ctx

    def _challenge_context(self, server_name: str | None) -> ssl.SSLContext | None:
        material = self.challenges(server_name) if self.challenges is not None and server_name else None
        if material is None:
            return None
        ctx = self._challenge_contexts.get(material)
        if ctx is None:
            # Only acme-tls/1: a validation handshake carries no application data (RFC 8737 section 3).
            ctx = build_stdlib_context(self._policy, (ACME_TLS_ALPN,), material)
            self._challenge_contexts[material] = ctx
        return ctx

    def _on_server_name(self, connection: Any, server_name: str | None, _: ssl.SSLContext) -> int | None:
        # C{connection}: the owner given to raw_tls, the StdTLSProtocol whose handshake this is.
        try:
            if self.challenges is not None and ACME_TLS_ALPN in connection.offered_alpn:
                challenge = self._challenge_context(server_name)
                if challenge is None:
                    return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
                connection._tls.context = challenge
                return None
            chosen = self._chooser.choose(server_name)
            material = chosen.material if chosen is not None else None
            if material is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            ctx = self._contexts.get(material)
            connection._tls.context = ctx if ctx is not None else self.context_for(material)
        except Exception:
            self._log.failure("choosing a certificate for SNI {name!r}", name=server_name)
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        return None


def raw_tls(
    ctx: ssl.SSLContext, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool, owner: Any,
    server_hostname: str | None = None,
) -> Any:
    """The ssl module's own C object for a connection over two memory BIOs (what C{SSLObject} wraps).

    C{SSLObject} is a Python class whose every method (read, write, pending, do_handshake) is one more Python call
    around the C method of the same name; the transport calls those per record, so it holds the C object itself,
    made by C{SSLContext._wrap_bio} exactly as C{SSLObject._create} makes it. Its SNI callback is handed C{owner}.
    A client's server name goes through the public C{wrap_bio} (IDNA encoding, the check_hostname rules).
    """
    if server_side:
        return ctx._wrap_bio(incoming, outgoing, server_side=True, server_hostname=None, owner=owner, session=None)  # type: ignore[attr-defined]
    return ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_hostname)._sslobj  # type: ignore[attr-defined]


# --- the transport ----------------------------------------------------------------------------------------------


@implementer(ISSLTransport)
class StdTLSProtocol(Protocol):
    """The TLS layer of one connection: a protocol to TCP below, a transport to the protocol behind."""

    factory: "StdTLSFactory | StdTLSClientFactory"
    # TCP below (Twisted declares ITransport | None; every method here runs after makeConnection set it).
    transport: Any
    _timer: Any = None
    # Per-connection state: the defaults (the state read per record is also set by __init__, see there).
    _handshake_done = False
    _reading_paused = False
    _delivering = False
    # close_notify sent / received; TCP gone.
    _closing = False
    _peer_closed = False
    _lost = False
    disconnecting = False
    negotiatedProtocol: bytes | None = None
    # Writes held until the end of the reactor turn (HTTP/2 only); None: every write goes out when made.
    _batch: list[bytes] | None = None
    # Written by the protocol behind before the handshake completed (None: nothing was).
    _early: list[bytes] | None = None
    # The first bytes, kept until the ClientHello's ALPN offer is read (only with a TLS-ALPN-01 source); the offer.
    _hello: bytearray | None = None
    offered_alpn: tuple[bytes, ...] = ()
    # Bytes of session tickets (TLS 1.3) waiting in the outgoing BIO for the first write, which takes them along.
    _held = 0
    # A TLS 1.3 session ticket is to be made at the first write (the factory's deferred_tickets).
    _ticket_due = False

    def __init__(self, factory: "StdTLSFactory | StdTLSClientFactory", wrapped: Any, peer: Any = None) -> None:
        self.factory = factory
        # The client's address, as the listener gave it to the factory (None: ask TCP).
        self._peer = peer
        self.wrappedProtocol = wrapped
        self._incoming = incoming = ssl.MemoryBIO()
        self._outgoing = outgoing = ssl.MemoryBIO()
        # The state read per record, set on the instance in one order: CPython reads an instance's own attribute
        # from its values array at a fixed index, but one that falls back to the class default through a dictionary
        # miss and a lookup in the class (~200 instructions each, about a dozen per request).
        self._handshake_done = False
        self._reading_paused = False
        self._delivering = False
        self._closing = False
        self._lost = False
        self.disconnecting = False
        self._batch = None
        self._held = 0
        self._ticket_due = False
        self._hello = bytearray() if factory.reads_alpn_offer else None
        # The ssl module's C object (raw_tls); an SSL_new, no handshake yet.
        self._tls = factory.new_tls(incoming, outgoing, self)

    # --- from TCP ---------------------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        # The protocol behind starts with TCP: its own deadlines count from the connect.
        self.wrappedProtocol.makeConnection(self)
        factory = self.factory
        if not self._lost and not self.disconnecting and self._timer is None:
            if factory.handshake_timer:
                self._timer = factory.clock.callLater(factory.handshake_timeout, self._handshake_overdue)
            if factory.is_client:
                # The ClientHello.
                self._handshake()

    def dataReceived(self, data: bytes) -> None:
        if self._handshake_done and not self._delivering and not self._reading_paused and not self._closing:
            # The steady state, nearly every read: one whole record in, one call to the protocol behind (what
            # _deliver does, without its loop and list). Several records, a client's close_notify: _deliver.
            incoming, tls = self._incoming, self._tls
            incoming.write(data)
            try:
                plain = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                # Part of a record, or a post-handshake message alone (its answer is sent below).
                plain = b""
            except ssl.SSLZeroReturnError:
                self._close_notify_received()
                plain = b""
            except ssl.SSLError as error:
                self._refused(error)
                return
            else:
                if not plain or incoming.pending or tls.pending():
                    self._deliver(plain)
                    return
                self._delivering = True
                try:
                    self.wrappedProtocol.dataReceived(plain)
                finally:
                    self._delivering = False
            # A post-handshake message (a TLS 1.3 key update) may have an answer to send.
            if self._outgoing.pending > self._held and not self._lost:
                self._flush()
            return
        if self._closing and not self._handshake_done:
            # A refused handshake: TCP is closing, what else comes is not read.
            return
        self._incoming.write(data)
        if self._hello is not None:
            self._read_alpn_offer(data)
        if not self._handshake_done:
            self._handshake()
            if not self._handshake_done:
                return
            # Records that came with the last handshake message (a request sent along with the client's Finished)
            # wait in the incoming BIO; without any, a read would only raise SSLWantReadError.
            if not self._incoming.pending and not self._tls.pending():
                return
        self._deliver()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._lost:
            return
        self._lost = True
        self.disconnecting = True
        if self._timer is not None:
            self._cancel_timer()
        if not self._handshake_done:
            self.factory.handshake_failures += 1
        self.wrappedProtocol.connectionLost(reason)

    # --- the handshake ---------------------------------------------------------------------------------------

    def _read_alpn_offer(self, data: bytes) -> None:
        assert self._hello is not None
        self._hello += data
        offered = client_hello_alpn(self._hello)
        if offered is None and len(self._hello) < _MAX_RECORD:
            return
        # Read by the SNI callback, which runs once the record is whole (ServerContexts._on_server_name).
        self.offered_alpn = offered or ()
        self._hello = None

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as error:
            # A refusal (protocol, cipher, SNI) or garbage: the alert goes out, then TCP is closed.
            self.factory.log_refused(self, error)
            self._flush()
            self._fail()
            return
        self._handshake_done = True
        if self._timer is not None:
            self._cancel_timer()
        factory = self.factory
        factory.handshakes += 1
        tls = self._tls
        alpn = tls.selected_alpn_protocol()
        if alpn:
            self.negotiatedProtocol = protocol = alpn.encode("ascii")
            if protocol == b"h2":
                self._batch = []
        early, self._early = self._early, None
        if factory.deferred_tickets and tls.version() == "TLSv1.3":
            # No ticket was made at the end of the handshake: one is made at the first write (the response,
            # HTTP/2's SETTINGS, close_notify) and goes out ahead of it. A client that leaves before any answer
            # (openssl s_time) costs neither the ticket's encryption nor a send.
            if not early:
                self._ticket_due = True
                return
            new_session_ticket(tls)
        if early:
            for data in early:
                tls.write(data)
        elif not factory.is_client and tls.version() == "TLSv1.3":
            # What a TLS 1.3 server has left to send after the client's Finished is its session ticket: it waits
            # for the first write (the response, or HTTP/2's SETTINGS) and goes out in the same send. A client that
            # closes before any answer (openssl s_time) costs no send at all.
            self._held = self._outgoing.pending
            return
        # TLS 1.2's last flight (the client waits for it), and anything written early.
        self._flush()

    def _handshake_overdue(self) -> None:
        self._timer = None
        if not self._handshake_done and not self._lost:
            self.abortConnection()

    def _fail(self) -> None:
        self.disconnecting = True
        self._closing = True
        self._cancel_timer()
        tcp = self.transport
        if getattr(tcp, "producer", None) is not None:
            tcp.unregisterProducer()
        tcp.loseConnection()
        self._timer = self.factory.clock.callLater(self.factory.flush_timeout, self._flush_overdue)

    # --- reading ---------------------------------------------------------------------------------------------

    def _deliver(self, first: bytes | None = None) -> None:
        """Hand over what is decrypted, every whole record at hand in one call, until the protocol pauses or the
        incoming records run out; C{first}: a read already made (dataReceived's), b"" when it found the end."""
        # Re-entered from resumeProducing inside the protocol's dataReceived: the outer call goes on instead.
        if self._delivering:
            return
        self._delivering = True
        try:
            while not self._reading_paused and not self._lost:
                chunks: list[bytes] = []
                ended = False
                tls, incoming = self._tls, self._incoming
                try:
                    if first is not None:
                        data, first = first, None
                    else:
                        data = tls.read(READ_SIZE)
                    while True:
                        if not data:
                            ended = True
                            break
                        chunks.append(data)
                        # Nothing buffered on either side: the next read would only raise SSLWantReadError.
                        if not incoming.pending and not tls.pending():
                            break
                        data = tls.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    ended = True
                except ssl.SSLError as error:
                    self._refused(error)
                    return
                if chunks and not self._closing:
                    # Closing: what the client still sends is read (to see its close_notify) and dropped.
                    self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                if ended:
                    self._close_notify_received()
                    break
                if not chunks or (not incoming.pending and not tls.pending()):
                    break
        finally:
            self._delivering = False
        # TLS 1.3 post-handshake messages and alerts (a held session ticket waits for the first write).
        if self._outgoing.pending > self._held and not self._lost:
            self._flush()

    def _refused(self, error: ssl.SSLError) -> None:
        # A record that does not decrypt, an alert from the client: what OpenSSL has to say goes out, then TCP.
        self.factory.log_refused(self, error)
        self._flush()
        self.abortConnection()

    def _close_notify_received(self) -> None:
        if self._peer_closed:
            return
        self._peer_closed = True
        if not self._closing:
            # The client is done: answer its close_notify and close, as Twisted's TLS layer does.
            self.loseConnection()
        if self._closing:
            self._close_tcp()

    # --- ITransport ------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting or self._lost or not data:
            return
        if not self._handshake_done:
            if self._early is None:
                self._early = []
            self._early.append(bytes(data))
            return
        if self._batch is not None:
            # HTTP/2: frames of many streams, written one upstream event at a time, go out as one record per turn.
            if not self._batch:
                self.factory.clock.callLater(0, self._write_batch)
            self._batch.append(data)
            return
        tls = self._tls
        if self._ticket_due:
            self._ticket_due = False
            new_session_ticket(tls)
        tls.write(data)
        write_now(self.transport, self._outgoing.read())
        self._held = 0

    def _write_batch(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        if self._lost or self._closing:
            return
        if self._ticket_due:
            self._ticket_due = False
            new_session_ticket(self._tls)
        self._tls.write(batch[0] if len(batch) == 1 else b"".join(batch))
        write_now(self.transport, self._outgoing.read())
        self._held = 0

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def _flush(self) -> None:
        out = self._outgoing.read()
        self._held = 0
        if out and not self._lost:
            write_now(self.transport, out)

    def loseConnection(self) -> None:
        if self.disconnecting or self._lost:
            return
        # What is batched goes out before close_notify.
        self._write_batch()
        self.disconnecting = True
        if not self._handshake_done:
            # Nothing was said yet: there is nothing to finish cleanly.
            self.abortConnection()
            return
        self._closing = True
        if self._ticket_due:
            # The ticket goes out ahead of close_notify, as it would ahead of any first write (SSL_shutdown refuses
            # while a ticket is due: SSL_do_handshake writes it).
            self._ticket_due = False
            if new_session_ticket(self._tls):
                try:
                    self._tls.do_handshake()
                except (ssl.SSLError, ValueError):
                    pass
        try:
            # SSL_shutdown: close_notify into the outgoing BIO (SSLObject.unwrap is this call).
            self._tls.shutdown()
        except (ssl.SSLError, ValueError):
            pass
        self._flush()
        self._cancel_timer()
        if self._peer_closed:
            self._close_tcp()
        else:
            self._timer = self.factory.clock.callLater(self.factory.close_grace, self._close_tcp)

    def _close_tcp(self) -> None:
        # After close_notify: the client answered, or the grace is over. TCP closes once what is left is sent.
        self._cancel_timer()
        if self._lost:
            return
        tcp = self.transport
        # A producer still registered would hold TCP's close for good if it was paused when the buffer drained.
        if getattr(tcp, "producer", None) is not None:
            tcp.unregisterProducer()
        tcp.loseConnection()
        self._timer = self.factory.clock.callLater(self.factory.flush_timeout, self._flush_overdue)

    def _flush_overdue(self) -> None:
        self._timer = None
        if not self._lost:
            self.transport.abortConnection()

    def abortConnection(self) -> None:
        if self._lost:
            return
        self.disconnecting = True
        self._cancel_timer()
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def getPeer(self) -> Any:
        # The address the factory was given (TCP makes a new one per call).
        peer = self._peer
        return peer if peer is not None else self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getPeerCertificate(self) -> None:
        # Clients present no certificate to labelgw.
        return None

    def setTcpNoDelay(self, enabled: bool) -> None:
        setter = getattr(self.transport, "setTcpNoDelay", None)
        if setter is not None:
            setter(enabled)

    def getTcpNoDelay(self) -> bool:
        return bool(getattr(self.transport, "getTcpNoDelay", lambda: False)())

    def setTcpKeepAlive(self, enabled: bool) -> None:
        setter = getattr(self.transport, "setTcpKeepAlive", None)
        if setter is not None:
            setter(enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(getattr(self.transport, "getTcpKeepAlive", lambda: False)())

    def loseWriteConnection(self) -> None:
        # TLS has no half-close of its own: close_notify ends both directions.
        self.loseConnection()

    def getHandle(self) -> Any:
        # Not the socket: what is unread on it are TLS records, not the protocol's bytes (upstream.has_unread).
        return self._tls

    # --- IConsumer: producers are TCP's own (every ciphertext write reaches TCP when it is made) ----------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._lost:
            producer.stopProducing()
            return
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if not self._lost and getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()

    # --- IPushProducer: the protocol behind stops reading -------------------------------------------------------

    def pauseProducing(self) -> None:
        if self._reading_paused:
            return
        self._reading_paused = True
        if not self._lost:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._lost:
            return
        self.transport.resumeProducing()
        if self._handshake_done:
            # Records read from the socket before the pause and not yet decrypted.
            self._deliver()

    def stopProducing(self) -> None:
        self.abortConnection()

    def logPrefix(self) -> str:
        return "StdTLS"


class StdTLSFactory(Factory):
    """The standard-library TLS engine for one listener: wraps C{wrapped}, chooses certificates with C{chooser}."""

    protocol = StdTLSProtocol  # type: ignore[assignment]
    noisy = False
    _log = Logger()

    def __init__(
        self,
        chooser: CertificateChooser,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        handshake_timeout: float,
        close_grace: float = DEFAULT_CLOSE_GRACE,
        flush_timeout: float = FLUSH_TIMEOUT,
        policy: TLSPolicy | None = None,
        challenges: ChallengeSource | None = None,
        handshake_timer: bool = True,
    ) -> None:
        self.wrappedFactory = wrapped
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        # False: the protocol behind keeps a deadline of C{handshake_timeout} from the connect, which closes a
        # connection whose handshake is not done by then (loseConnection before the handshake aborts it); one timer
        # per connection instead of two that fire together (labelgw.tls.https: the gateway's HTTP/1.1 side).
        self.handshake_timer = handshake_timer
        self.close_grace = close_grace
        self.flush_timeout = flush_timeout
        self.contexts = ServerContexts(
            chooser, listener_alpn(wrapped, policy or chooser.policy), clock, challenges=challenges
        )
        self.reads_alpn_offer = challenges is not None
        problem = check_policy(self.contexts.policy)
        if problem is not None:
            self._log.warn("TLS policy: {problem}", problem=problem)
        self.new_tls = self.contexts.server_object
        self.deferred_tickets = self.contexts.deferred_tickets
        # For /metrics: handshakes completed, and connections closed before theirs completed.
        self.handshakes = 0
        self.handshake_failures = 0
        self.refusals = 0

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr: Any) -> StdTLSProtocol | None:  # type: ignore[override]
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return StdTLSProtocol(self, wrapped, addr)

    is_client = False

    def log_refused(self, connection: StdTLSProtocol, error: Exception) -> None:
        # Scanners and wrong clients are routine: counted, not logged one line each.
        self.refusals += 1


class StdTLSClientFactory(ClientFactory):
    """TLS to a backend on the standard library's ssl: wraps the connection's factory; one per connection attempt.

    A refused handshake (a certificate that does not verify, a protocol mismatch) is logged with OpenSSL's reason,
    and the connection closes before any byte reached the protocol behind (which answers 502).
    """

    protocol = StdTLSProtocol  # type: ignore[assignment]
    noisy = False
    is_client = True
    handshake_timer = True
    reads_alpn_offer = False
    deferred_tickets = False
    _log = Logger()

    def __init__(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None,
        wrapped: ClientFactory,
        clock: IReactorTime,
        handshake_timeout: float,
        close_grace: float = DEFAULT_CLOSE_GRACE,
        flush_timeout: float = FLUSH_TIMEOUT,
    ) -> None:
        self.context = context
        self.server_hostname = server_hostname
        self.wrappedFactory = wrapped
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.close_grace = close_grace
        self.flush_timeout = flush_timeout
        self.handshakes = 0
        self.handshake_failures = 0

    def new_tls(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, owner: Any) -> Any:
        return raw_tls(self.context, incoming, outgoing, False, owner, self.server_hostname)

    def buildProtocol(self, addr: Any) -> StdTLSProtocol | None:  # type: ignore[override]
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return StdTLSProtocol(self, wrapped)

    def startedConnecting(self, connector: Any) -> None:
        self.wrappedFactory.startedConnecting(connector)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.wrappedFactory.clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.wrappedFactory.clientConnectionLost(connector, reason)

    def log_refused(self, connection: StdTLSProtocol, error: Exception) -> None:
        peer = connection.getPeer()
        self._log.warn(
            "TLS to backend {host}:{port} (name {name}) failed: {reason}",
            host=getattr(peer, "host", "?"),
            port=getattr(peer, "port", "?"),
            name=self.server_hostname or "-",
            reason=str(error),
        )


def factory_for_engine(
    engine: str,
    chooser: Any,
    wrapped: IProtocolFactory,
    clock: IReactorTime,
    handshake_timeout: float,
    close_grace: float = DEFAULT_CLOSE_GRACE,
    challenges: ChallengeSource | None = None,
    protocol_keeps_deadline: bool = False,
) -> Any:
    """The listener factory of TLS engine C{engine}: "stdlib" (L{StdTLSFactory}) or "openssl" (Twisted's layer).
    C{challenges}: TLS-ALPN-01 certificates for the stdlib engine (the openssl one gets them through C{chooser}).
    C{protocol_keeps_deadline}: the protocols of C{wrapped} close a connection C{handshake_timeout} seconds after
    the connect unless it has spoken by then, so the stdlib engine arms no handshake timer of its own."""
    if engine == "stdlib":
        return StdTLSFactory(
            chooser, wrapped, clock, handshake_timeout, close_grace, challenges=challenges,
            handshake_timer=not protocol_keeps_deadline,
        )
    if engine == "openssl":
        from labelgw.tls.deadlines import TLSServerFactory  # noqa: PLC0415

        return TLSServerFactory(chooser, wrapped, clock=clock, handshake_timeout=handshake_timeout, close_grace=close_grace)
    raise ValueError(f"unknown TLS engine {engine!r} (stdlib or openssl)")


TLS_ENGINES: tuple[str, ...] = ("stdlib", "openssl")
