"""The embedded registry's state file (`<state-dir>/registrations.json`): written off the reactor, atomically.

A change marks the file dirty and schedules one write: soon after a registration or removal, later after
heartbeats alone (they only move expiries, and a restart within the delay keeps the lease anyway as long as it had
time left). The snapshot taken on the reactor is a list of references (cheap); JSON encoding and the write run in
the reactor's thread pool, into a temporary file that replaces the old one (`os.replace`): a crash leaves the old
file or the new one, never half of one. Reading happens once, at start.
"""

from __future__ import annotations

import json
import os
import tempfile
from itertools import islice
from typing import Any, Callable, Iterable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

__all__ = ["FORMAT_VERSION", "StateFile", "Record"]

FORMAT_VERSION = 1
# Records encoded per reactor turn while saving (about a millisecond; 2 000 took 4-5 ms on a loaded machine, a stall
# in the heartbeats' p99).
CHUNK = 500
# (the registration as a JSON object without its closing brace: `Registration.record`, lease expiry in clock seconds)
Record = tuple[bytes, float]
RunInThread = Callable[[Callable[[], None]], "Deferred[None]"]


def _thread_runner(reactor: Any) -> RunInThread:
    from twisted.internet.threads import deferToThreadPool

    return lambda work: deferToThreadPool(reactor, reactor.getThreadPool(), work)


def encode_record(record: bytes, expires: float) -> bytes:
    return b'%s,"expires":%r}' % (record, expires)


def document_pieces(parts: list[bytes], saved_at: float) -> list[bytes]:
    """The file as pieces to write one after another: `parts` are records (or comma-joined runs of them)."""
    pieces = [b'{"version":%d,"saved_at":%r,"registrations":[' % (FORMAT_VERSION, saved_at)]
    for index, part in enumerate(parts):
        if index:
            pieces.append(b",")
        pieces.append(part)
    pieces.append(b"]}")
    return pieces


def encode_document(parts: list[bytes], saved_at: float) -> bytes:
    return b"".join(document_pieces(parts, saved_at))


def write_records(path: str, records: Iterable[Record], saved_at: float) -> None:
    """Encode and replace `path` atomically (blocking: at stop)."""
    write_bytes(path, encode_document([encode_record(record, expires) for record, expires in records], saved_at))


def write_bytes(path: str, data: bytes | Sequence[bytes]) -> None:
    """Replace `path` with `data` (or its pieces, written one after another) atomically (blocking; the writer
    thread's part: each write releases the GIL, and no 15 MB join holds it against the reactor)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".registrations.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            if isinstance(data, bytes):
                out.write(data)
            else:
                for piece in data:
                    out.write(piece)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def read_records(path: str) -> list[dict[str, Any]]:
    """The saved registrations (blocking); [] when there is no file. ValueError for a file that is not ours."""
    try:
        with open(path, encoding="utf-8") as source:
            document = json.load(source)
    except FileNotFoundError:
        return []
    if not isinstance(document, dict) or document.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a registrations file of format {FORMAT_VERSION}")
    records = document.get("registrations")
    if not isinstance(records, list):
        raise ValueError(f"{path}: registrations must be a list")
    return [record for record in records if isinstance(record, dict)]


class StateFile:
    _log = Logger()

    def __init__(
        self,
        path: str,
        reactor: Any,
        snapshot: Callable[[], Iterable[Record]],
        run_in_thread: RunInThread | None = None,
        soon: float = 0.2,
        later: float = 5.0,
    ) -> None:
        self.path = path
        self._reactor = reactor
        self._snapshot = snapshot
        self._run = run_in_thread or _thread_runner(reactor)
        self._soon = soon
        self._later = later
        self._timer: IDelayedCall | None = None
        self._timer_at = float("inf")
        self._writing: Deferred[None] | None = None
        self._dirty = False
        self.writes = 0
        # The last write's duration: writes are spaced by at least twice that, so that a big registry under a
        # stream of registrations spends at most a third of its time saving.
        self._last_duration = 0.0

    def changed(self, urgent: bool) -> None:
        """Something to save: within `soon` seconds if `urgent`, else within `later`."""
        self._dirty = True
        delay = max(self._soon if urgent else self._later, 2 * self._last_duration)
        at = self._reactor.seconds() + delay
        if self._timer is not None and self._timer.active():
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._reactor.callLater(delay, self._write)

    def _write(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._writing is not None:
            self.changed(urgent=True)  # one write at a time: again once this one is done
            return
        self._dirty = False
        # Each record was encoded when it was registered; only its expiry is formatted here, on the reactor in
        # slices of CHUNK records (a thread looping in Python would hold the GIL against the reactor for its whole
        # run); the file is written in a thread.
        records = iter(self._snapshot())
        saved_at = self._reactor.seconds()
        # One joined piece per slice: the records' own bytes die young instead of surviving (and being promoted
        # through the collector's generations) until the whole file is built.
        parts: list[bytes] = []
        writing = self._writing = Deferred()

        def step() -> None:
            try:
                piece = [encode_record(record, expires) for record, expires in islice(records, CHUNK)]
                if piece:
                    parts.append(b",".join(piece))
                if len(piece) == CHUNK:
                    self._reactor.callLater(0, step)
                    return
                # Pieces, not one joined document: joining 15 MB (100 000 records) took 20-50 ms on the reactor.
                data = document_pieces(parts, saved_at)
            except Exception:
                writing.errback()
                return
            self._run(lambda: write_bytes(self.path, data)).chainDeferred(writing)

        step()

        def done(_: object) -> None:
            self._writing = None
            self.writes += 1
            self._last_duration = self._reactor.seconds() - saved_at

        def failed(failure: Any) -> None:
            self._writing = None
            self._dirty = True
            self._log.failure("could not save the registrations to {path}", failure, path=self.path)

        writing.addCallbacks(done, failed)

    def flush(self) -> "Deferred[None]":
        """Write now, blocking, if anything is unsaved (at stop, after a write in flight); fires when done."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = float("inf")
        pending: Deferred[None] = self._writing if self._writing is not None else succeed(None)

        def write_now(_: object) -> None:
            if not self._dirty:
                return
            self._dirty = False
            try:
                write_records(self.path, self._snapshot(), self._reactor.seconds())
            except OSError as error:
                self._log.error("could not save the registrations to {path}: {error}", path=self.path, error=error)

        finished: Deferred[None] = Deferred()
        pending.addBoth(write_now).addBoth(lambda _: finished.callback(None))
        return finished
