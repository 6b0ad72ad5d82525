"""Plugin middlewares: a third party adds a middleware by shipping a Twisted plugin.

A package puts a module under ``twisted/plugins/`` (no ``__init__.py`` there, as for any Twisted plugin) that
defines an object providing `IMiddlewarePlugin`; labelgw finds it with
``getPlugins(IMiddlewarePlugin, twisted.plugins)`` the first time a container names it. A container turns it on
with ``labelgw.middlewares=<name>[,<name>...]`` (the order they run in, after the built-in request steps) and gives
it options with ``labelgw.plugin.<name>.<key>=<value>``. An unknown name, or options the plugin's
`parse_options` refuses, make the container's labels invalid (the reason is shown like any label error).

Per request the step's `request(head, peer_ip)` sees the request head (after routing, rate limit, breaker and
concurrency limit): it may change it (assign `head.headers`, a list of (name, value) pairs; `head.target`) and
returns None to let it through, or `Answer(status, message)` to answer it itself. If the step has
`response_head(head)` it sees (and may change) each response head before labelgw relays it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from twisted.logger import Logger
from zope.interface import Attribute, Interface

from labelgw.http.parser import RequestHead, ResponseHead

if TYPE_CHECKING:
    from labelgw.http.exchange import Exchange

__all__ = ["Answer", "IMiddlewarePlugin", "PluginOptionError", "PluginSide", "check_plugin", "find_plugins"]


class IMiddlewarePlugin(Interface):
    """A middleware that labelgw finds as a Twisted plugin."""

    name = Attribute("The name containers use in labelgw.middlewares and labelgw.plugin.<name>.* (lower case).")

    def parse_options(options: Mapping[str, str]) -> Any:
        """The options (label key after labelgw.plugin.<name>. -> value) as the plugin wants them; raise
        PluginOptionError(key, reason) or ValueError(reason) for options it refuses."""

    def step(options: Any) -> Any:
        """The step for one service, given what parse_options returned: an object with
        request(head: RequestHead, peer_ip: bytes) -> Answer | None and, optionally,
        response_head(head: ResponseHead) -> None."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A plugin step's own answer to a request: labelgw sends `status` with `message` as its plain-text body;
    `extra` are field lines ("Name: value\\r\\n" each)."""

    status: int
    message: str
    extra: bytes = b""


class PluginOptionError(ValueError):
    """A plugin refuses an option (`key`, "" when it is about the whole set) for `reason`."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


_plugins: dict[str, Any] | None = None
_log = Logger()


def find_plugins(refresh: bool = False) -> dict[str, Any]:
    """name -> plugin, from every ``twisted/plugins`` directory on the path (looked up once per process)."""
    global _plugins
    if _plugins is None or refresh:
        from twisted import plugins
        from twisted.plugin import getPlugins

        found: dict[str, Any] = {}
        for plugin in getPlugins(IMiddlewarePlugin, plugins):
            found.setdefault(str(plugin.name).lower(), plugin)
        _plugins = found
    return _plugins


def check_plugin(name: str, options: Mapping[str, str]) -> Any:
    """What the plugin `name` makes of `options`; PluginOptionError when there is no such plugin or it refuses."""
    plugin = find_plugins().get(name)
    if plugin is None:
        known = ", ".join(sorted(find_plugins())) or "none installed"
        raise PluginOptionError("", f"no middleware plugin named {name!r} (plugins: {known})")
    try:
        return plugin.parse_options(dict(options))
    except PluginOptionError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise PluginOptionError("", f"plugin {name!r} refuses its options: {error}") from None


def make_step(name: str, parsed: Any) -> Any:
    return find_plugins()[name].step(parsed)


class PluginSide:
    """A client side whose response heads pass through the plugin steps' response_head first."""

    def __init__(self, inner: Any, hooks: list[Any]) -> None:
        self._inner = inner
        self._hooks = hooks
        # The inner side's line kind, kept by whoever keeps the inner side's (labelgw.http.accesslog).
        self.log_kind = inner.log_kind
        self.log_kind_keeper = inner.log_kind_keeper or inner
        self.is_http2 = inner.is_http2
        for attribute in (
            "peer_ip", "proto", "local_port", "interim_head", "error_response", "abort", "set_response_producer",
            "pause_request_body", "start_tunnel", "tunnel_data", "exchange_done", "response_data", "flush",
            "response_end",
        ):
            setattr(self, attribute, getattr(inner, attribute))

    def response_head(self, head: ResponseHead, body: bool, close: bool, extra: bytes) -> None:
        for hook in self._hooks:
            try:
                hook(head)
            except Exception:
                # The response goes on as the backend sent it (and the hooks before this one changed it).
                _log.failure("a plugin middleware's response_head failed")
        self._inner.response_head(head, body, close, extra)


def wrap(exchange: "Exchange", hooks: list[Any]) -> None:
    exchange.client = PluginSide(exchange.client, hooks)  # type: ignore[assignment]


def run_request_steps(steps: list[tuple[str, Any]], head: RequestHead, peer_ip: bytes) -> Answer | None:
    for _name, step in steps:
        answer = step.request(head, peer_ip)
        if answer is not None:
            return answer  # type: ignore[no-any-return]
    return None
