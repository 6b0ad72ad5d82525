"""A listening endpoint as a Service: Twisted's C{StreamServerEndpointService}, plus what labelgw wants of it.

It listens in privilegedStartService, so a bad or busy endpoint stops twistd with one clear line before anything
else starts; it logs the URL it serves; and every listener gets a listen backlog of L{DEFAULT_BACKLOG} unless its
endpoint string says ``backlog=`` itself (Twisted's default of 50 makes a burst of connects wait for a SYN retry).
A TCP endpoint on a real reactor listens with a L{labelgw.cli.accept.LeanPort} (fewer Python steps per accepted
connection), and once the reactor runs, what start-up loaded is frozen out of the garbage collector's full passes
(L{freeze_after_start}).
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, execute, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from zope.interface import implementer

from labelgw.cli.accept import listen_tcp
from labelgw.cli.quietlog import PORT_LINES, install_quiet_log

# nginx listens with 511; twice that takes a burst of a thousand connects (the kernel caps it at
# net.core.somaxconn, 4096 since Linux 5.4).
DEFAULT_BACKLOG = 1024
# Endpoint types of Twisted's own parsers that take a backlog argument.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl"})


def _fields(description: str) -> list[str]:
    """The ``:``-separated fields of an endpoint string, honouring Twisted's backslash escapes."""
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """C{description} with ``:backlog=N`` added, unless it names a backlog or its type takes none."""
    fields = _fields(description)
    if fields[0].strip().lower() not in _BACKLOG_TYPES:
        return description
    if any(field.strip().lower().startswith("backlog=") for field in fields[1:]):
        return description
    return f"{description}:backlog={backlog}"


# Whether freeze_after_start has been scheduled in this process.
_FREEZE_SCHEDULED = False


def freeze_after_start(reactor: Any) -> None:
    """Once per process, when C{reactor} starts running (after every service has started): collect, then move
    every object left (what labelgw and its libraries loaded) out of the collector's reach with C{gc.freeze()}.

    Without it, the full collections that connection churn brings about walk the whole start-up heap each time
    (Twisted, cryptography, h2: ~23 ms on the development machine, once every few seconds under a handshake load).
    Collected first, so that no garbage is frozen; a frozen object is still freed when its reference count drops,
    only a cycle among frozen objects would stay. A reactor that is never run (a test's) never gets here.
    """
    global _FREEZE_SCHEDULED
    if _FREEZE_SCHEDULED or not isinstance(reactor, PosixReactorBase):
        return
    _FREEZE_SCHEDULED = True
    reactor.callWhenRunning(_freeze)


def _freeze() -> None:
    gc.collect()
    gc.freeze()


def _lean_accept(endpoint: Any) -> bool:
    """Whether C{endpoint} is one of Twisted's TCP endpoints on a real reactor (not a test's memory reactor): its
    port is then a L{LeanPort}."""
    return type(endpoint) in (TCP4ServerEndpoint, TCP6ServerEndpoint) and isinstance(
        getattr(endpoint, "_reactor", None), PosixReactorBase
    )


@implementer(IStreamServerEndpoint)
class _KeepsPort:
    """An endpoint that remembers the port it listens on (the stock service keeps it to itself)."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint
        self.port: IListeningPort | None = None

    def listen(self, factory: Any) -> Deferred[Any]:
        endpoint = self.endpoint
        listening: Deferred[Any]
        if _lean_accept(endpoint):
            # Twisted's TCP endpoints call reactor.listenTCP with these; a LeanPort accepts with fewer steps.
            listening = execute(
                listen_tcp, endpoint._reactor, endpoint._port, factory, endpoint._backlog, endpoint._interface
            )
        else:
            listening = endpoint.listen(factory)
        return listening.addCallback(self._keep)

    def _keep(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port


class ListenerService(StreamServerEndpointService):
    _log = Logger()
    # Logged once listening, with the URL.
    started_message = "labelgw listening on {url}"

    def __init__(self, reactor: Any, description: str, factory: Any, scheme: str = "http") -> None:
        from twisted.internet.endpoints import serverFromString

        self.description = description
        self.scheme = scheme
        try:
            endpoint = serverFromString(reactor, with_backlog(description))
        except Exception as error:  # the parser raises several kinds of errors; all mean the same to a user
            raise SystemExit(f"labelgw: cannot listen on {description!r}: {error}") from None
        self._endpoint = _KeepsPort(endpoint)
        self._reactor = reactor
        StreamServerEndpointService.__init__(self, self._endpoint, factory)
        # A failure to listen raises from privilegedStartService instead of being logged later.
        self._raiseSynchronously = True
        self._listening = False

    @property
    def port(self) -> Any:
        return self._endpoint.port

    def privilegedStartService(self) -> None:
        self._listening = True
        install_quiet_log()
        PORT_LINES.opening += 1
        try:
            StreamServerEndpointService.privilegedStartService(self)
        except Exception as error:
            raise SystemExit(f"labelgw: cannot listen on {self.description!r}: {error}") from None
        finally:
            PORT_LINES.opening -= 1
        if self.port is None:
            raise SystemExit(f"labelgw: listening on {self.description!r} did not complete at start")

    def startService(self) -> None:
        StreamServerEndpointService.startService(self)
        self._log.info(self.started_message, url=self.url)
        freeze_after_start(self._reactor)

    @property
    def url(self) -> str:
        address = self.port.getHost()
        host = getattr(address, "host", None)
        if host is None:
            return f"{self.scheme}+unix://{getattr(address, 'name', '?')}"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{address.port}"

    def stopService(self) -> Deferred[None]:
        if not self._listening:
            self.running = False
            return succeed(None)
        self._listening = False
        self._endpoint.port = None
        stopped: Deferred[None] = StreamServerEndpointService.stopService(self)
        return stopped
