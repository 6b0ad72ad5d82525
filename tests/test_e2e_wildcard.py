"""End to end: a wildcard host label (`labelgw.host=*.<x>.localhost`) on a real container behind the real
`twistd -n labelgw`: names one label under it are routed to it, its parent and deeper names are not, an exact host
on another container wins, and an HTTPS handshake for a name under it gets a leaf minted for that name."""

from __future__ import annotations

from typing import Any

import pytest

from support import free_port
from support.net import http_get
from test_e2e_tls import client_context, handshake, https_get, wait_for

pytestmark = pytest.mark.docker


def whoami(containers: Any, service: str, name: str, port: int, **labels: str) -> Any:
    all_labels = {"labelgw.service": service, "labelgw.port": str(port), **{f"labelgw.{k}": v for k, v in labels.items()}}
    container = containers.python(["-m", "labelgw.tools.whoami", "--port", str(port), "--name", name], labels=all_labels)
    containers.wait_serving(container, port)
    return container


def test_wildcard_host_one_label_deep_exact_wins_and_minted_leaf(labelgw: Any, containers: Any, unique_name: Any) -> None:
    zone = unique_name("apps").replace("-", "")
    gw = labelgw()
    whoami(containers, f"{zone}wild", "wild-backend", free_port(), host=f"*.{zone}.localhost", version="v1")
    whoami(containers, f"{zone}special", "special-backend", free_port(), host=f"special.{zone}.localhost")

    def get(host: str, **kwargs: Any) -> Any:
        return http_get(gw.base_url + "/hello", host=host, timeout=3, **kwargs)

    wait_for("the wildcard route", lambda: get(f"a.{zone}.localhost").status == 200, log=gw.log_text)
    wait_for("the exact route", lambda: get(f"special.{zone}.localhost").status == 200, log=gw.log_text)
    for name in (f"a.{zone}.localhost", f"b.{zone}.localhost", f"B.{zone}.LOCALHOST:8080"):
        response = get(name)
        assert response.status == 200 and "wild-backend" in response.text, (name, response.text)
    # Exact wins over the wildcard covering it.
    assert "special-backend" in get(f"special.{zone}.localhost").text
    # One label deep only: neither the parent nor deeper names, nor the literal wildcard.
    for name in (f"{zone}.localhost", f"x.a.{zone}.localhost", f"*.{zone}.localhost"):
        response = get(name)
        assert response.status == 404, (name, response.status, response.text)
    # Versions work on a wildcard route as on an exact one: pinned to the container's version.
    pinned = get(f"a.{zone}.localhost", headers={"X-Labelgw-Version": "v1"})
    assert pinned.status == 200 and "wild-backend" in pinned.text

    # HTTPS: a handshake for a name under the wildcard gets a leaf minted for that name, which verifies.
    assert gw.state_dir is not None
    verified = client_context(gw.state_dir / "ca.pem")
    leaf = handshake(gw.https_port, f"a.{zone}.localhost", verified)
    assert leaf.names == [f"a.{zone}.localhost"] and "labelgw local CA" in leaf.issuer
    response = https_get(gw.https_port, f"c.{zone}.localhost", context=verified)
    assert response.status == 200 and "wild-backend" in response.text
