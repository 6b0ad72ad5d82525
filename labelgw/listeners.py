"""A listening endpoint as a Service: listens in privilegedStartService so a bad or busy endpoint stops twistd
with a clear error before anything else starts, logs the URL it serves, and stops accepting on stop."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger


class ListenerService(Service):
    _log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Any, scheme: str = "http") -> None:
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.scheme = scheme
        self.port: Any = None

    def privilegedStartService(self) -> None:
        from twisted.internet.endpoints import serverFromString

        endpoint = serverFromString(self._reactor, self.description)
        result: list[Any] = []
        endpoint.listen(self.factory).addBoth(result.append)
        if result and not isinstance(result[0], Exception) and hasattr(result[0], "getHost"):
            self.port = result[0]
        elif result:
            failure = result[0]
            raise SystemExit(f"labelgw: cannot listen on {self.description!r}: {failure.getErrorMessage()}")
        else:
            raise SystemExit(f"labelgw: listening on {self.description!r} did not complete at start")
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        self._log.info("labelgw listening on {url}", url=self.url)

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
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return port.stopListening()
