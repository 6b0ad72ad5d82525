"""The open-file limit labelgw raises for itself at startup (labelgw.cli.fdlimit)."""

from __future__ import annotations

import resource

from labelgw.cli.fdlimit import RAISE_CAP, FileLimit, raise_open_file_limit


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def set(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    fake = FakeLimits(1024, 524288)
    assert raise_open_file_limit(fake.get, fake.set) == FileLimit(1024, 524288, 524288)
    assert fake.limits == (524288, 524288)


def test_an_unlimited_hard_limit_raises_to_the_cap() -> None:
    fake = FakeLimits(1024, resource.RLIM_INFINITY)
    assert raise_open_file_limit(fake.get, fake.set).after == RAISE_CAP
    assert fake.calls == [(RAISE_CAP, resource.RLIM_INFINITY)]


def test_a_limit_already_there_or_higher_is_never_lowered() -> None:
    for soft, hard in ((4096, 4096), (RAISE_CAP * 2, RAISE_CAP * 4), (resource.RLIM_INFINITY, resource.RLIM_INFINITY)):
        fake = FakeLimits(soft, hard)
        assert raise_open_file_limit(fake.get, fake.set) == FileLimit(soft, soft, hard)
        assert fake.calls == []


def test_a_refused_raise_is_reported_and_keeps_the_old_limit() -> None:
    fake = FakeLimits(1024, 4096, refuse=True)
    limit = raise_open_file_limit(fake.get, fake.set)
    assert (limit.before, limit.after, limit.error) == (1024, 1024, "not allowed")


def test_enough_for_counts_two_descriptors_per_request_and_a_reserve() -> None:
    assert FileLimit(1024, 1024, 1024).enough_for(480)
    assert not FileLimit(1024, 1024, 1024).enough_for(1024)
    assert FileLimit(1024, 2112, 4096).enough_for(1024)
    assert not FileLimit(1024, 2111, 4096).enough_for(1024)
