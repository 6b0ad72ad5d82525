# -*- test-case-name: tests.test_fdlimit -*-
"""The process's open-file limit: raised from the soft to the hard limit at startup.

Every proxied request holds two descriptors (the client's and the upstream's), so the usual soft limit of 1 024 is
exhausted by ~500 slow requests long before the in-flight bounds refuse anything, and then every route fails at
accept. nginx sets `worker_rlimit_nofile` for this; Go programs such as Traefik get their soft limit raised by the
Go runtime. labelgw raises its own, never beyond the hard limit a user or container runtime set.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Callable

# The most a soft limit is raised to when the hard limit is unlimited: select()-free reactors have no ceiling, but
# a bound keeps a runaway from taking the whole system's file table.
RAISE_CAP = 1 << 20
# Descriptors a request in flight may hold (client + upstream), and those kept for listeners, logs, the engine.
PER_REQUEST = 2
RESERVE = 64

Limits = tuple[int, int]


@dataclass(frozen=True, slots=True)
class FileLimit:
    before: int
    after: int
    hard: int
    error: str = ""

    def enough_for(self, in_flight: int) -> bool:
        """Whether `in_flight` requests fit into the soft limit with their descriptors."""
        return self.after >= in_flight * PER_REQUEST + RESERVE


def raise_open_file_limit(
    get: Callable[[int], Limits] = resource.getrlimit,
    set_: Callable[[int, Limits], None] = resource.setrlimit,
) -> FileLimit:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit (capped at RAISE_CAP); never lowers it."""
    soft, hard = get(resource.RLIMIT_NOFILE)
    target = RAISE_CAP if hard == resource.RLIM_INFINITY else min(hard, RAISE_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            set_(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            return FileLimit(soft, soft, hard, str(error))
        return FileLimit(soft, target, hard)
    return FileLimit(soft, soft, hard)
