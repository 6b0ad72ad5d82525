"""An example middleware plugin, as a third party would ship it (README, "Plugin middlewares").

`labelgw.middlewares=stamp` with `labelgw.plugin.stamp.header=X-Stamp` and `labelgw.plugin.stamp.value=...`
adds that field to each forwarded request and to each response; `labelgw.plugin.stamp.deny=/secret` answers 403
to paths starting with it.
"""

from __future__ import annotations

from typing import Any, Mapping

from zope.interface import implementer
from twisted.plugin import IPlugin

from labelgw.middleware.plugin import Answer, IMiddlewarePlugin, PluginOptionError


class _Step:
    def __init__(self, options: dict[str, str]) -> None:
        self.header = options["header"].encode("ascii")
        self.value = options.get("value", "stamped").encode("ascii")
        self.deny = options.get("deny", "").encode("ascii")

    def request(self, head: Any, peer_ip: bytes) -> Answer | None:
        if head.target.startswith(b"/crash"):
            raise RuntimeError("the example plugin crashes on /crash")
        if self.deny and head.target.startswith(self.deny):
            return Answer(403, "denied by the stamp plugin")
        head.headers = head.headers + [(self.header, self.value)]
        return None

    def response_head(self, head: Any) -> None:
        head.headers = head.headers + [(self.header, self.value)]


@implementer(IPlugin, IMiddlewarePlugin)
class StampPlugin:
    name = "stamp"

    def parse_options(self, options: Mapping[str, str]) -> dict[str, str]:
        for key in options:
            if key not in ("header", "value", "deny"):
                raise PluginOptionError(key, f"unknown option {key!r} (header, value, deny)")
        header = options.get("header", "")
        if not header or not header.replace("-", "").isalnum():
            raise PluginOptionError("header", "needs a field name")
        return dict(options)

    def step(self, options: dict[str, str]) -> _Step:
        return _Step(options)


stamp = StampPlugin()
