"""The access log as a service: its writer thread started with labelgw and stopped last (after the drain, so the
drained requests' lines are written), and SIGUSR1 reopening its file."""

from __future__ import annotations

import signal
import threading
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from labelgw.http.accesslog import AccessLog, ThreadWriter


class AccessLogService(Service):
    _log = Logger()

    def __init__(self, settings: Any, reactor: Any, gateway: Any) -> None:
        self.reactor = reactor
        self.path: str | None = settings.access_log_file
        self.access_log: AccessLog | None = None
        self._previous_handler: Any = None
        gateway.debug_headers = settings.debug_headers
        if settings.access_log != "off":
            writer = ThreadWriter(self.path, report=self._report)
            self.access_log = AccessLog(reactor, settings.access_log, writer)
            gateway.access_log = self.access_log

    def _report(self, message: str) -> None:
        # Called on the writer thread.
        self.reactor.callFromThread(lambda: self._log.error("{message}", message=message))

    def startService(self) -> None:
        Service.startService(self)
        if self.access_log is None:
            return
        self.access_log.sink.start()
        if self.path is not None and threading.current_thread() is threading.main_thread():
            # logrotate's convention. twistd may have a SIGUSR1 handler of its own (rotating its log file): it
            # still runs.
            self._previous_handler = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        # In a signal handler: only hand the work to the reactor.
        self.reactor.callFromThread(self.reopen)
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)

    def reopen(self) -> None:
        if self.access_log is not None:
            self._log.info("access log: reopening {path}", path=self.path)
            self.access_log.reopen()

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None
        if self.access_log is not None:
            # Blocks at most 2 s for a destination that does not take the last lines.
            self.access_log.close()
        return None
