"""The etcd registry (`--registry etcd://...`): not built yet."""

from __future__ import annotations

from typing import Any


class EtcdRegistry:
    name = "etcd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise SystemExit("labelgw: --registry etcd:// is not available in this build")
