"""What twistd's log gets, beyond what each component logs: two kinds of line are left out.

- Twisted's own lines for a port ("ProxyFactory starting on 8080", "(TCP Port 8080 Closed)"), for the ports of
  labelgw's listeners: each listener is announced once, by its URL (labelgw.cli.listeners).
- labelgw's debug-level lines (a periodic Docker resync that changed nothing, an engine still unreachable for the
  same reason), unless LABELGW_DEBUG=1: twistd's log file takes every level, so the filter is here.

twistd has installed its observers on the global publisher by the time services start; each is wrapped once by a
filter that compares equal to it, so that removeObserver(observer) still finds it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from twisted.logger import ILogObserver, LogLevel, LogPublisher, globalLogPublisher
from zope.interface import implementer

__all__ = ["PORT_LINES", "QuietObserver", "enable", "install_quiet_log"]

_TWISTED_PORT_LINE = re.compile(r"(?:\S+(?: \(TLS\))? starting on (\S+)|\((?:TCP|Unix) Port (\S+) Closed\))\Z")


class PortLines:
    """Which of Twisted's port lines to drop: those of ports labelgw's listeners opened."""

    def __init__(self) -> None:
        self.opening = 0  # > 0 while a labelgw listener listens: a "starting on" line then is its port's
        self.ports: set[str] = set()

    def drop(self, event: Mapping[str, Any]) -> bool:
        if event.get("log_namespace") != "log_legacy":
            return False
        match = _TWISTED_PORT_LINE.match(str(event.get("log_text", "")))
        if match is None:
            return False
        started, closed = match.groups()
        if started is not None and self.opening:
            self.ports.add(started)
            return True
        return closed is not None and closed in self.ports


PORT_LINES = PortLines()


def _debug_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("LABELGW_DEBUG", "") not in ("", "0")


@implementer(ILogObserver)
class QuietObserver:
    """An observer without the lines this module leaves out."""

    def __init__(self, observer: Any, port_lines: PortLines = PORT_LINES, debug: bool | None = None) -> None:
        self.observer = observer
        self._ports = port_lines
        self._debug = _debug_wanted() if debug is None else debug

    def __call__(self, event: dict[str, Any]) -> None:
        if not self._debug and event.get("log_level") is LogLevel.debug and str(
            event.get("log_namespace", "")
        ).startswith("labelgw."):
            return
        if self._ports.drop(event):
            return
        self.observer(event)

    def __eq__(self, other: object) -> bool:
        return other is self or other == self.observer

    def __hash__(self) -> int:
        return hash(self.observer)


# Set by `twistd labelgw` (labelgw.cli.tap.makeService) only: tests that run the service keep every line.
_enabled = False


def enable() -> None:
    global _enabled
    _enabled = True


def install_quiet_log(publisher: LogPublisher = globalLogPublisher, force: bool = False) -> None:
    """Wrap each of `publisher`'s observers (twistd's log file) once in a QuietObserver; called as the first
    listener opens, after twistd has begun logging (it has not yet when makeService runs)."""
    if not (_enabled or force):
        return
    for observer in list(getattr(publisher, "_observers", ())):
        if not isinstance(observer, QuietObserver):
            publisher.removeObserver(observer)
            publisher.addObserver(QuietObserver(observer))
