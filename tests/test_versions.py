"""Version splits: shares by label (labelgw.core.versions); pinning by header and stickiness by cookie (labelgw.http.versioning)."""

from __future__ import annotations

from collections import Counter

import pytest

from labelgw.core.backends import RoundRobin, ServicePool, Backend
from labelgw.http.parser import parse_request_head
from labelgw.core.model import ContainerSpec
from support.specs import typed_options
from labelgw.http.versioning import choose_version, sticky_version
from labelgw.core.versions import VersionSplit, decide, versioned


def backend(name: str, version: str | None, traffic: str | None = None, ready: bool = True) -> Backend:
    spec = ContainerSpec(
        container_id=name, name=name, service="api", address="127.0.0.1", port=8000, hosts=("api.localhost",),
        version=version, running=ready, **typed_options({} if traffic is None else {"traffic": traffic}),
    )
    return Backend(spec)


def pool(*backends: Backend) -> ServicePool:
    service = ServicePool("api", RoundRobin())
    for item in backends:
        service.backends[item.key] = item
    service.refresh()
    return service


def request(*fields: str) -> object:
    return parse_request_head(("GET / HTTP/1.1\r\nHost: api.localhost\r\n" + "".join(f + "\r\n" for f in fields)).rstrip("\r\n").encode())


def test_one_version_needs_no_split() -> None:
    assert pool(backend("a", "v1"), backend("b", "v1")).split is None
    assert pool(backend("a", None), backend("b", None)).split is None
    assert versioned([backend("a", "v1"), backend("b", "v2")])


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({"v1": None, "v2": "10"}, {"v1": 90.0, "v2": 10.0}),
        ({"v1": None, "v2": None}, {"v1": 50.0, "v2": 50.0}),
        ({"v1": None, "v2": "20%", "v3": None}, {"v1": 40.0, "v2": 20.0, "v3": 40.0}),
        ({"v1": "30", "v2": "30"}, {"v1": 50.0, "v2": 50.0}),  # declared shares under 100 % are scaled
        ({"v1": "0", "v2": "0"}, {"v1": 50.0, "v2": 50.0}),  # all zero: equal rather than nobody
        ({"v1": "100", "v2": None}, {"v1": 100.0, "v2": 0.0}),
    ],
)
def test_shares(labels: dict[str, str | None], expected: dict[str, float]) -> None:
    split = VersionSplit([backend(f"c-{v}", v, t) for v, t in labels.items()])
    assert split.shares == pytest.approx(expected)


def test_smooth_weighted_round_robin_follows_the_shares_in_every_window() -> None:
    split = VersionSplit([backend("a", "v1"), backend("b", "v2", "10")])
    picks = [split.choose() for _ in range(1000)]
    assert Counter(picks) == {"v1": 900, "v2": 100}
    for start in range(0, 1000, 10):
        assert picks[start : start + 10].count("v2") == 1


def test_a_gone_version_gives_its_share_to_the_others() -> None:
    v2 = backend("b", "v2", "10")
    service = pool(backend("a", "v1"), v2, backend("c", "v3", "30"))
    assert service.split is not None and service.split.shares["v2"] == pytest.approx(10.0)
    v2.ready = False
    service.refresh()
    assert service.split is not None and set(service.split.shares) == {"v1", "v3"}
    assert sum(service.split.shares.values()) == pytest.approx(100.0)


def test_new_client_gets_a_version_and_a_cookie() -> None:
    service = pool(backend("a", "v1"), backend("b", "v2"))
    chosen, version, cookie, pinned = choose_version(service, request(), b"x-labelgw-version")
    assert chosen is not None and chosen.version == version and not pinned
    assert cookie == f"Set-Cookie: labelgw_version_api={version}; Path=/; HttpOnly; SameSite=Lax\r\n".encode()


def test_sticky_client_keeps_its_version_without_a_new_cookie() -> None:
    service = pool(backend("a", "v1"), backend("b", "v2", "1"))
    for _ in range(20):
        chosen, version, cookie, pinned = choose_version(service, request("Cookie: x=1; labelgw_version_api=v2"), b"x-labelgw-version")
        assert (chosen.version, version, cookie, pinned) == ("v2", "v2", b"", False)  # type: ignore[union-attr]


def test_sticky_version_that_is_gone_is_replaced() -> None:
    service = pool(backend("a", "v1"), backend("b", "v3"))
    chosen, version, cookie, _ = choose_version(service, request("Cookie: labelgw_version_api=v2"), b"x-labelgw-version")
    assert version in ("v1", "v3") and cookie.startswith(b"Set-Cookie: labelgw_version_api=" + version.encode())  # type: ignore[union-attr]


def test_pinned_request_reaches_only_its_version_or_none() -> None:
    service = pool(backend("a", "v1"), backend("b", "v2"))
    for _ in range(10):
        chosen, version, cookie, pinned = choose_version(service, request("X-Labelgw-Version: v2"), b"x-labelgw-version")
        assert (chosen.version, version, cookie, pinned) == ("v2", "v2", b"", True)  # type: ignore[union-attr]
    chosen, version, _, pinned = choose_version(service, request("X-Labelgw-Version: v9"), b"x-labelgw-version")
    assert chosen is None and version == "v9" and pinned


def test_retry_stays_in_the_version_and_a_pinned_one_never_leaves_it() -> None:
    a, b, c = backend("a", "v1"), backend("b", "v2"), backend("c", "v2")
    service = pool(a, b, c)
    assert service.pick(exclude=b, version="v2") is c
    service = pool(a, b)
    assert service.pick(exclude=b, version="v2") is a  # sticky: another version beats a failure
    assert service.pick(exclude=b, version="v2", pinned=True) is None


@pytest.mark.parametrize(
    "header, expected",
    [
        (b"labelgw_version_api=v2", "v2"),
        (b"a=1; labelgw_version_api=v2; b=2", "v2"),
        (b"labelgw_version_apix=v2", None),
        (b"xlabelgw_version_api=v2", None),
        (None, None),
        (b"", None),
        # Pinned further: separators, order, quoting and case.
        (b"a=1;labelgw_version_api=v2", "v2"),  # no space after ';'
        (b"a=1;\tlabelgw_version_api=v2", "v2"),  # a tab
        (b"labelgw_version_api=v2 ; b=2", "v2"),  # the value ends at whitespace
        (b"labelgw_version_api=v1; labelgw_version_api=v2", "v1"),  # the first pair of the name
        (b'labelgw_version_api="v2"', "v2"),  # RFC 6265 allows a quoted value
        (b'labelgw_version_api="', '"'),  # a lone quote is the value as written (no such version)
        (b"labelgw_version_api=", ""),  # empty: no such version, the client gets a new one
        (b"LABELGW_VERSION_API=v2", None),  # cookie names are case-sensitive
        (b"labelgw_version_api =v2", None),  # no space before '='
        (b"a=labelgw_version_api=v2", None),  # inside another cookie's value
        (b"labelgw_version_api2=v2", None),  # another service's cookie
        (b"labelgw_version_api=v2,x", "v2,x"),
    ],
)
def test_sticky_cookie_parsing(header: bytes | None, expected: str | None) -> None:
    assert sticky_version(header, "api") == expected


def test_the_version_header_is_configurable() -> None:
    from labelgw.cli.tap import Options

    options = Options()
    options.parseOptions(["--version-header", "X-Canary", "--https", "none", "--admin", "none"])
    assert options.settings.version_header == "X-Canary"
    options = Options()
    options.parseOptions(["--https", "none"])
    assert options.settings.version_header == "X-Labelgw-Version"
    service = pool(backend("a", "v1"), backend("b", "v2"))
    chosen, version, _, pinned = choose_version(service, request("X-Canary: v2"), b"x-canary")
    assert (chosen.version, pinned) == ("v2", True)  # type: ignore[union-attr]


def test_a_bad_version_header_is_a_one_line_error() -> None:
    from twisted.python.usage import UsageError

    from labelgw.cli.tap import Options

    with pytest.raises(UsageError, match="--version-header"):
        Options().parseOptions(["--version-header", "X Canary"])


def test_shares_over_100_percent_are_scaled_and_never_negative() -> None:
    # The registry refuses such labels; the split itself stays sane when it meets them anyway.
    split = VersionSplit([backend("a", "v1", "80"), backend("b", "v2", "60"), backend("c", "v3")])
    assert split.shares == pytest.approx({"v1": 80 / 1.4, "v2": 60 / 1.4, "v3": 0.0})
    assert all(share >= 0 for share in split.shares.values())
    picks = Counter(split.choose() for _ in range(140))
    assert picks == {"v1": 80, "v2": 60}


def test_decide_from_plain_values() -> None:
    service = pool(backend("a", "v1"), backend("b", "v2"))
    pinned = decide(service, pinned="v2", sticky="v1")
    assert (pinned.backend.version, pinned.version, pinned.pinned, pinned.assigned) == ("v2", "v2", True, False)  # type: ignore[union-attr]
    missing = decide(service, pinned="v9")
    assert (missing.backend, missing.version, missing.pinned, missing.assigned) == (None, "v9", True, False)
    sticky = decide(service, sticky="v1")
    assert (sticky.backend.version, sticky.version, sticky.pinned, sticky.assigned) == ("v1", "v1", False, False)  # type: ignore[union-attr]
    for gone in ("v9", "", None):
        fresh = decide(service, sticky=gone)
        assert fresh.assigned and not fresh.pinned and fresh.backend is not None
        assert fresh.backend.version == fresh.version in ("v1", "v2")
    with pytest.raises(AttributeError):
        pinned.version = "v1"  # type: ignore[misc]  # a frozen value


def test_decide_needs_a_split_service() -> None:
    with pytest.raises(ValueError, match="not split by version"):
        decide(pool(backend("a", "v1")))


def test_the_core_knows_no_http() -> None:
    # The version decision and the rest of the pure core load without any module of the HTTP layer.
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "import labelgw.core.model, labelgw.core.labels, labelgw.core.paths, labelgw.core.routes, labelgw.core.registry, labelgw.core.backends\n"
        "import labelgw.core.balancer, labelgw.core.versions, labelgw.docker.tracker\n"
        "print(sorted(name for name in sys.modules if name.startswith('labelgw.http') or name == 'docker'))\n"
    )
    root = Path(__file__).resolve().parent.parent  # the working tree's labelgw, first on the path
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


def test_a_small_declared_total_is_scaled_not_split_equally() -> None:
    # Only "every version says 0 %" falls back to an equal split; 1 % against 0 % still means all to the first.
    split = VersionSplit([backend("a", "v1", "1"), backend("b", "v2", "0")])
    assert split.shares == pytest.approx({"v1": 100.0, "v2": 0.0})
    assert {split.choose() for _ in range(10)} == {"v1"}


def test_a_version_decision_has_no_instance_dict() -> None:
    # One is made per request: slots keep it small (and frozen keeps it a value).
    decision = decide(pool(backend("a", "v1"), backend("b", "v2")))
    assert not hasattr(decision, "__dict__")


def test_a_pinned_version_without_backends_is_not_asked_of_the_policy() -> None:
    # The default policy (wrt) cannot pick among nothing: the decision says "no backend" without asking it.
    import random

    from twisted.internet.task import Clock

    from labelgw.core.balancer import make_policy

    service = ServicePool("api", make_policy("wrt", Clock().seconds, random.Random(1)))
    for item in (backend("a", "v1"), backend("b", "v2")):
        service.backends[item.key] = item
    service.refresh()
    missing = decide(service, pinned="v9")
    assert (missing.backend, missing.version, missing.pinned) == (None, "v9", True)


def test_new_clients_are_counted_per_version() -> None:
    service = pool(backend("a", "v1"), backend("b", "v2"))
    versions = [decide(service).version for _ in range(5)]
    assert service.sticky_clients == dict(Counter(versions))
    decide(service, sticky="v1")  # a client that keeps its version is not counted again
    assert sum(service.sticky_clients.values()) == 5
