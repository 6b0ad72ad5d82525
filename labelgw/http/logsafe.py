"""Client-controlled text made safe for a log line: control characters escaped, nothing else changed."""

from __future__ import annotations

# C0 controls, DEL and C1 controls: a forged line break or terminal escape in a log is an injection.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


def printable(value: str | bytes) -> str:
    """`value` with every control character written as a \\xNN escape; bytes are read as UTF-8, invalid bytes
    escaped too."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return value.translate(_ESCAPES)
