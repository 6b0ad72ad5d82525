"""labelgw.cli.reactor: the epoll reactor without the per-event log context, and when twistd gets it."""

from __future__ import annotations

import errno
import select
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.python import context, log

from labelgw.cli.reactor import LeanEPollReactor
from labelgw.cli.tap import default_reactor
from support.gateway import TwistdProcess
from support.net import free_port

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll is Linux only")


class FakePoller:
    def __init__(self, events: list[tuple[int, int]] | Exception) -> None:
        self.events = events
        self.asked: list[tuple[float, int]] = []

    def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
        self.asked.append((timeout, most))
        if isinstance(self.events, Exception):
            raise self.events
        return self.events


class Selectable:
    """Just what the reactor's event dispatch touches."""

    def __init__(self, fd: int, fail: bool = False) -> None:
        self.fd = fd
        self.fail = fail
        self.reads = 0
        self.writes = 0
        self.lost: list[Any] = []
        self.system_seen: list[str] = []

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"selectable-{self.fd}"

    def doRead(self) -> None:
        self.reads += 1
        self.system_seen.append(context.get(log.ILogContext)["system"])
        if self.fail:
            raise RuntimeError("bug in a protocol")

    def doWrite(self) -> None:
        self.writes += 1

    def readConnectionLost(self, reason: Any) -> None:
        self.lost.append(reason)

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


@pytest.fixture
def lean() -> Iterator[LeanEPollReactor]:
    reactor = LeanEPollReactor()
    real_poller = reactor._poller
    yield reactor
    real_poller.close()
    reactor.waker.connectionLost(None)  # its pipe


def test_events_go_straight_to_their_selectables_without_a_log_context(lean: LeanEPollReactor) -> None:
    first, second = Selectable(1001), Selectable(1002)
    lean._selectables.update({1001: first, 1002: second})
    lean._poller = FakePoller([(1001, select.EPOLLIN), (1002, select.EPOLLOUT), (1003, select.EPOLLIN)])
    lean.doPoll(0.5)
    assert (first.reads, first.writes, second.reads, second.writes) == (1, 0, 0, 1)
    # The stock reactor would have pushed {"system": "selectable-1001"} around the call.
    assert first.system_seen == ["-"]
    # Asks for at most one event per descriptor it tracks (the waker is one of them), as the stock reactor does.
    assert lean._poller.asked == [(0.5, len(lean._selectables))]


def test_no_timeout_means_wait_until_an_event(lean: LeanEPollReactor) -> None:
    lean._poller = FakePoller([])
    lean.doIteration(None)
    assert lean._poller.asked[0][0] == -1


def test_an_error_in_one_event_is_logged_and_disconnects_only_its_selectable(lean: LeanEPollReactor) -> None:
    broken, healthy = Selectable(1001, fail=True), Selectable(1002)
    lean._selectables.update({1001: broken, 1002: healthy})
    lean._poller = FakePoller([(1001, select.EPOLLIN), (1002, select.EPOLLIN)])
    errors: list[dict[str, Any]] = []
    log.addObserver(errors.append)
    try:
        lean.doPoll(0)
    finally:
        log.removeObserver(errors.append)
    assert [event["failure"].type for event in errors if event.get("isError")] == [RuntimeError]
    assert len(broken.lost) == 1 and broken.lost[0].check(RuntimeError)
    assert healthy.reads == 1 and not healthy.lost


def test_an_interrupted_poll_is_not_an_error(lean: LeanEPollReactor) -> None:
    lean._poller = FakePoller(OSError(errno.EINTR, "interrupted"))
    lean.doPoll(0)
    lean._poller = FakePoller(OSError(errno.EBADF, "bad descriptor"))
    with pytest.raises(OSError):
        lean.doPoll(0)


def test_an_installed_reactor_is_kept() -> None:
    # pytest-twisted installed one before this test ran, as `twistd --reactor` would have.
    from twisted.internet import reactor

    assert default_reactor() is reactor


def _start(tmp_path: Path, *twistd_options: str) -> TwistdProcess:
    tmp_path.mkdir(parents=True)
    config = tmp_path / "labelgw.yaml"
    config.write_text("services:\n  static:\n    hosts: [static.localhost]\n    backends: ['127.0.0.1:9']\n")
    port = free_port()
    args = [
        *twistd_options, "-n", "--pidfile=", "labelgw", "--http", f"tcp:{port}:interface=127.0.0.1",
        "--config", str(config), "--https", "none", "--admin", "none", "--docker-host", "unix:///nonexistent.sock",
    ]
    gateway = TwistdProcess(args, port=port, cwd=tmp_path / "run")
    gateway.wait_until_listening()
    return gateway


@pytest.mark.docker  # runs the real product (no engine needed)
def test_twistd_labelgw_runs_on_the_lean_reactor_unless_told_otherwise(tmp_path: Path) -> None:
    gateway = _start(tmp_path / "default")
    try:
        assert "reactor class: labelgw.cli.reactor.LeanEPollReactor" in gateway.log_text()
    finally:
        gateway.stop()
    chosen = _start(tmp_path / "chosen", "--reactor", "epoll")
    try:
        assert "reactor class: twisted.internet.epollreactor.EPollReactor" in chosen.log_text()
    finally:
        chosen.stop()


class WaitingPoller(FakePoller):
    """No events; each poll moves a fake clock on by its timeout, at most `step` seconds (or raises once)."""

    def __init__(self, now: list[float], step: float) -> None:
        super().__init__([])
        self.now = now
        self.step = step
        self.fail_once = False

    def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
        self.asked.append((timeout, most))
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("bug in the loop")
        self.now[0] += self.step if timeout < 0 else min(timeout, self.step)
        return []


def test_the_main_loop_runs_due_thread_and_timed_calls_and_otherwise_only_polls(lean: LeanEPollReactor) -> None:
    from twisted.logger import globalLogPublisher

    now = [100.0]
    lean.seconds = lambda: now[0]  # type: ignore[method-assign]
    poller = WaitingPoller(now, 2.0)
    real_poller, lean._poller = lean._poller, poller  # type: ignore[assignment]
    runs: list[float] = []
    stock_run = lean.runUntilCurrent

    def counted() -> None:
        runs.append(now[0])
        stock_run()

    lean.runUntilCurrent = counted  # type: ignore[method-assign]
    done: list[str] = []
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)

    def first() -> None:
        done.append(f"first at {now[0]}")
        lean.callFromThread(lambda: done.append(f"thread call at {now[0]}"))
        poller.fail_once = True

    # 60 calls cancelled at once: a backlog runUntilCurrent compacts on the next turn.
    cancelled = [lean.callLater(1000, done.append, "never") for _ in range(60)]
    for call in cancelled:
        call.cancel()
    lean.callLater(5, first)
    lean.callLater(8, lambda: (done.append(f"second at {now[0]}"), lean.stop()))
    lean.addSystemEventTrigger("during", "shutdown", done.append, "shutdown")
    try:
        lean.run(installSignalHandlers=False)
    finally:
        globalLogPublisher.removeObserver(logged.append)
        lean._poller = real_poller
    assert done == ["first at 105.0", "thread call at 105.0", "second at 108.0", "shutdown"]
    # At 100: new calls (and the backlog): runUntilCurrent, poll(5). At 102 and 104 nothing is due: the poll alone,
    # with the wait left (3, then 1). At 105: the first call, then a poll that fails (logged, the loop goes on),
    # then the thread call it made, poll(3). At 107 the poll alone (1). At 108 the second call stops the reactor.
    timeouts = [timeout for timeout, _ in poller.asked]
    assert timeouts[:6] == [5.0, 3.0, 1.0, 3.0, 3.0, 1.0]
    assert runs[:4] == [100.0, 105.0, 105.0, 108.0]
    assert not any(call.cancelled for call in lean._pendingTimedCalls)
    failures = [event for event in logged if "log_failure" in event]
    assert len(failures) == 1 and failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["log_format"] == "Unexpected error in main loop"
