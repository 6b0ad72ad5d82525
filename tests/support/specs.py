"""Container specs for unit tests, with their typed options read from label text by the real label parser."""

from __future__ import annotations

from typing import Any, Mapping

from labelgw.core.labels import parse_container
from labelgw.core.model import ContainerSpec


def typed_options(labels: Mapping[str, str]) -> dict[str, Any]:
    """The typed ContainerSpec fields `labelgw.core.labels` makes of these labels (prefix removed: "weight", ...),
    plus `options`, the labels as written. Fails the test when a label is invalid."""
    inspect = {
        "Id": "spec-helper",
        "Name": "/spec-helper",
        "Config": {
            "Labels": {"labelgw.service": "helper", "labelgw.port": "1", **{f"labelgw.{k}": v for k, v in labels.items()}}
        },
        "HostConfig": {"NetworkMode": "host"},
        "State": {"Running": True},
    }
    spec = parse_container(inspect)
    assert isinstance(spec, ContainerSpec), spec
    return {
        "weight": spec.weight,
        "traffic": spec.traffic,
        "balancer": spec.balancer,
        "health_check": spec.health_check,
        "tls": spec.tls,
        "options": tuple(sorted(labels.items())),
    }
