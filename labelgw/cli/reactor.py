"""The reactor labelgw runs on by default: Twisted's epoll reactor, minus the legacy log context around each event.

Twisted's reactors run every read or write event inside `log.callWithLogger`: the selectable's `logPrefix()` is
called and copied into a fresh context dictionary, pushed and popped on a thread-local stack, so that legacy
`log.msg` calls made during the event carry it as "system" (Twisted issues #2534 and #12338 describe the cost).
A proxied request is two events; under load (wrk, 50 keep-alive connections, CPU time read from /proc) that wrapping
cost 6.5 us of the 44 us of CPU labelgw spent per request. labelgw logs through `twisted.logger` with structured fields, which
never reads that context; without it, a legacy message emitted inside an event (an unhandled exception in a protocol
callback, say) shows "-" as its system, and its traceback still names the code. A read event of a plain TCP
transport is also handled without its doRead: the same recv and dataReceived, two Python calls fewer per event.

twistd installs a reactor only when asked (`--reactor`); `twistd -n labelgw` without that option gets this one
where the platform has epoll (labelgw.cli.tap), and a reactor chosen on the command line is used as it is. Linux only:
importing this module elsewhere fails.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet import base, main, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.python import log

from labelgw.http.fastwrite import own_defaults

_READABLE = EPollReactor._POLL_IN
# Transports whose read event is handled here without their doRead (tcp.Connection.doRead and the data-received
# step it calls: two Python calls per event, written out): exactly these types, never a subclass that may read
# differently.
TCP_TRANSPORTS = (tcp.Server, tcp.Client)
CONNECTION_DONE = main.CONNECTION_DONE
CONNECTION_LOST = main.CONNECTION_LOST
_SERVER = tcp.Server
_CLIENT = tcp.Client
_EWOULDBLOCK = errno.EWOULDBLOCK
# Twisted's main loop's error handler and log (base.py), and timeout()'s cap on a wait (epoll_wait's milliseconds
# in a C int).
_TOP_HANDLER = base._topHandler
_BASE_LOG = base._log
_LONGEST_WAIT = 2147483


class LeanEPollReactor(EPollReactor):
    """EPollReactor whose poll step dispatches each event without a log context; errors are caught, logged and
    disconnect their selectable exactly as in the stock reactor."""

    def doPoll(self, timeout: float | None) -> None:
        try:
            # At most one event per tracked descriptor, as the stock reactor asks.
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            # A descriptor removed by an earlier event of this same batch has no selectable any more.
            if selectable is None:
                continue
            if event != _READABLE:
                # Writable, hang-up, error: the stock dispatch.
                dispatch(selectable, fd, event)
                continue
            # Nearly every event under load: data to read, nothing else. Handled as _doReadOrWrite handles it, less
            # its check for a selectable whose fileno() is -1 (one still registered after closing its descriptor: a
            # bug it exists to report). A plain TCP transport's read is tcp.Connection.doRead and its data-received
            # step written out (tests/test_reactor_read.py pins both): a recv, then the protocol's dataReceived; an
            # empty read is the peer's close. The same lines twice, once per transport type: CPython specialises
            # each attribute read for the one type it sees there, and a server's and a client's transport read at
            # one place would miss that cache at nearly every event (bench/reactor_cost.py counts it).
            why: BaseException | None
            kind = type(selectable)
            try:
                if kind is _SERVER:
                    try:
                        data = selectable.socket.recv(selectable.bufferSize)
                    except OSError as error:
                        why = None if error.args[0] == _EWOULDBLOCK else CONNECTION_LOST
                    else:
                        if data:
                            selectable.protocol.dataReceived(data)
                            continue
                        why = CONNECTION_DONE
                elif kind is _CLIENT:
                    try:
                        data = selectable.socket.recv(selectable.bufferSize)
                    except OSError as error:
                        why = None if error.args[0] == _EWOULDBLOCK else CONNECTION_LOST
                    else:
                        if data:
                            selectable.protocol.dataReceived(data)
                            continue
                        why = CONNECTION_DONE
                else:
                    why = selectable.doRead()
            except BaseException:
                why = sys.exc_info()[1]
                log.err()
            if why:
                self._disconnectSelectable(selectable, why, True)

    doIteration = doPoll

    def mainLoop(self) -> None:
        """ReactorBase.mainLoop with its common turn written out: when no thread call, new or due timed call, stop
        or backlog of cancelled calls waits, the turn is the poll alone, with the timeout timeout() would give (the
        wait until the first pending call, from one clock reading); otherwise runUntilCurrent and timeout run as in
        Twisted's loop. An error is logged and the loop goes on, as with Twisted's _topHandler. Twisted's turn costs
        about 5 000 instructions more than this one before the poll (two context-manager calls, runUntilCurrent,
        timeout, two clock reads, two checks for new calls; bench/reactor_cost.py --connections 1)."""
        seconds = self.seconds
        poll = self.doPoll
        while self._started:
            try:
                pending = self._pendingTimedCalls
                busy = self.threadCallQueue or self._newTimedCalls or self._justStopped or self._cancellations > 50
                if not busy and pending:
                    wait = pending[0].time - seconds()
                    # runUntilCurrent has a call to make when the first one's time has come.
                    busy = wait <= 0
                if busy:
                    self.runUntilCurrent()
                    timeout = self.timeout()
                elif pending:
                    # timeout()'s figure (positive here), within what epoll_wait can wait.
                    timeout = min(_LONGEST_WAIT, wait)
                else:
                    timeout = None
                poll(self.running and timeout)
            except BaseException:
                _TOP_HANDLER.__exit__(*sys.exc_info())
        _BASE_LOG.info("Main loop terminated.")

    def addReader(self, reader: Any) -> None:
        # A TCP transport read here (and written by fastwrite) holds its own copy of the class-level state those
        # paths read on every event: equal values, far cheaper reads (labelgw.http.fastwrite.own_defaults). Twisted's
        # client transports come here first from their connect step; labelgw's listener sets them itself.
        if type(reader) in TCP_TRANSPORTS:
            own_defaults(reader)
        EPollReactor.addReader(self, reader)


def install() -> LeanEPollReactor:
    from twisted.internet.main import installReactor

    reactor = LeanEPollReactor()
    installReactor(reactor)
    return reactor
