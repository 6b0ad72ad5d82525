"""Docker Swarm services -> what labelgw routes. Pure: no threads, no reactor, no Docker client, no I/O.

`labelgw.docker.swarm_watcher.SwarmWatcher` does the plumbing (the SDK calls in threads, the event stream, the task
poll) and feeds `SwarmTracker` on the reactor thread with what the engine answered: `docker service inspect`,
`docker inspect <task>` and `docker node inspect` dicts. Everything that decides what the route sink hears lives
here and is tested on JSON captured from a real engine (tests/data/swarm/).

How a service becomes backends:

- The labels are the service's (`deploy.labels` in a stack file = `Spec.Labels`), read by the same
  `labelgw.core.labels.parse_container` as container labels: each task is presented to it as a container inspect
  (`task_inspect`), so versions, canary shares, health checks and middlewares mean exactly what they mean for
  containers. During a rolling update a task made from the previous spec keeps the previous spec's labels (its
  port, its version) until it leaves.
- One backend per task, keyed by task id, at the task's address on its networks (`<prefix>.network` chooses; the
  ingress network is never used: its addresses belong to the routing mesh), or for a host-network service at the
  node's address. In rotation only while the task is running and meant to run (`DesiredState` running): a task whose
  desired state turns to shutdown or remove leaves rotation then, before its container is stopped.
- A service with no live task keeps one placeholder backend (key `swarm-service:<id>`, not ready), so that its
  hosts answer 503 rather than 404 while it is scaled to zero or its first task starts. A label problem is one
  Rejection for the whole service under that same key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from twisted.logger import Logger

from labelgw.core.model import ContainerSpec, Outcome, Rejection
from labelgw.docker.tracker import _MISSING, TERMINATING_SIGNALS, ParseFunction, RouteSink, signal_number

__all__ = [
    "SERVICE_KEY_PREFIX",
    "PollSummary",
    "SwarmTracker",
    "TaskView",
    "node_addresses",
    "service_key",
    "service_outcomes",
    "task_inspect",
    "task_labels",
    "task_view",
]

SERVICE_KEY_PREFIX = "swarm-service:"

# Task states after which the task never runs again (swarmkit's TaskState from COMPLETE on).
_ENDED_STATES = frozenset({"complete", "shutdown", "failed", "rejected", "remove", "orphaned"})
# Container events of a task container (they carry com.docker.swarm.task.id) worth a look at its service now.
_TASK_START_ACTIONS = frozenset({"start", "health_status", "unpause"})
_TASK_DOWN_ACTIONS = frozenset({"kill", "stop", "die", "pause"})

TASK_ID_LABEL = "com.docker.swarm.task.id"
SERVICE_ID_LABEL = "com.docker.swarm.service.id"


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> Sequence[Any]:
    return value if isinstance(value, (list, tuple)) else ()


def service_key(service_id: str) -> str:
    """The registry key of a service's placeholder (or of its Rejection)."""
    return SERVICE_KEY_PREFIX + service_id


def _host_part(address: str) -> str:
    """"127.0.0.1:2377" -> "127.0.0.1"; "[::1]:2377" -> "::1"."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def node_addresses(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Node id -> the address its host-network tasks listen on (`Status.Addr`).

    A manager may report 0.0.0.0 there (it listens on every address); its advertised manager address says which.
    """
    found: dict[str, str] = {}
    for node in nodes:
        node_id = str(node.get("ID") or "")
        if not node_id:
            continue
        address = str(_mapping(node.get("Status")).get("Addr") or "")
        if address in ("", "0.0.0.0", "::"):
            address = _host_part(str(_mapping(node.get("ManagerStatus")).get("Addr") or ""))
        if address:
            found[node_id] = address
    return found


def _template_key(template: Mapping[str, Any]) -> str:
    """What tells which spec a task was made from: its container spec and networks (the task copy of the template
    lacks some of the service's fields, such as RestartPolicy and Runtime)."""
    return json.dumps(
        {"ContainerSpec": template.get("ContainerSpec"), "Networks": template.get("Networks")}, sort_keys=True
    )


def task_labels(service: Mapping[str, Any], task: Mapping[str, Any]) -> Mapping[str, Any]:
    """The service labels a task runs under: the previous spec's while a rolling update has not replaced it yet.

    A task made from the previous spec (same container spec and networks) and not from the current one keeps the
    previous labels: during `docker service update --label-add labelgw.port=... --image ...` the old tasks still
    listen on the old port and are the old version until they are stopped.
    """
    spec = _mapping(service.get("Spec"))
    previous = _mapping(service.get("PreviousSpec"))
    if previous:
        made_from = _template_key(_mapping(task.get("Spec")))
        if made_from != _template_key(_mapping(spec.get("TaskTemplate"))) and made_from == _template_key(
            _mapping(previous.get("TaskTemplate"))
        ):
            return _mapping(previous.get("Labels"))
    return _mapping(spec.get("Labels"))


@dataclass(frozen=True, slots=True)
class TaskView:
    """The facts about one task that decide its backend."""

    task_id: str
    name: str
    # Running and meant to run: may receive requests.
    serving: bool
    # Will never run again (its state is complete, shutdown, failed ...): forgotten.
    ended: bool
    # Running but told to stop (desired state shutdown or remove): out of rotation, stopping soon.
    stopping: bool
    node_id: str
    started_at: str


def task_view(service: Mapping[str, Any], task: Mapping[str, Any]) -> TaskView:
    status = _mapping(task.get("Status"))
    state = str(status.get("State") or "")
    desired = str(task.get("DesiredState") or "")
    task_id = str(task.get("ID") or "")
    service_name = str(_mapping(service.get("Spec")).get("Name") or "")
    # Swarm's own container names: <service>.<slot>.<task id>, or <service>.<node id>.<task id> in global mode.
    slot = task.get("Slot")
    middle = str(slot) if isinstance(slot, int) and slot > 0 else str(task.get("NodeID") or "")
    running = state == "running"
    return TaskView(
        task_id=task_id,
        name=f"{service_name}.{middle}.{task_id}" if service_name else task_id,
        serving=running and desired == "running",
        ended=state in _ENDED_STATES,
        stopping=running and desired in ("shutdown", "remove"),
        node_id=str(task.get("NodeID") or ""),
        started_at=str(status.get("Timestamp") or "") if running else "",
    )


def _exposed_ports(service: Mapping[str, Any]) -> dict[str, Any]:
    """The service's target ports (its EndpointSpec): what a container's ExposedPorts says for an image."""
    ports = _sequence(_mapping(_mapping(service.get("Spec")).get("EndpointSpec")).get("Ports"))
    exposed: dict[str, Any] = {}
    for port in ports:
        port = _mapping(port)
        target = port.get("TargetPort")
        protocol = str(port.get("Protocol") or "tcp")
        if isinstance(target, int):
            exposed[f"{target}/{protocol}"] = {}
    return exposed


def _attachments(task: Mapping[str, Any], nodes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The task's networks as a container's NetworkSettings.Networks: name -> {"IPAddress": ...}."""
    networks: dict[str, dict[str, str]] = {}
    for attachment in _sequence(task.get("NetworksAttachments")):
        network = _mapping(_mapping(attachment).get("Network"))
        spec = _mapping(network.get("Spec"))
        name = str(spec.get("Name") or network.get("ID") or "")
        driver = str(_mapping(network.get("DriverState")).get("Name") or "")
        if not name or spec.get("Ingress"):
            continue  # the routing mesh's network: its task addresses are for the mesh, not for a proxy
        if driver == "host" or name == "host":
            networks[name] = {"IPAddress": nodes.get(str(task.get("NodeID") or ""), "")}
            continue
        addresses = [str(address) for address in _sequence(_mapping(attachment).get("Addresses"))]
        address = addresses[0].split("/", 1)[0] if addresses else ""
        networks[name] = {"IPAddress": address}
    return networks


def task_inspect(
    service: Mapping[str, Any],
    task: Mapping[str, Any] | None,
    nodes: Mapping[str, str],
    *,
    down: bool = False,
) -> dict[str, Any]:
    """A task (None: the service's placeholder) as the container inspect `parse_container` reads."""
    service_id = str(service.get("ID") or "")
    service_name = str(_mapping(service.get("Spec")).get("Name") or service_id)
    if task is None:
        return {
            "Id": service_key(service_id),
            "Name": service_name,
            "Config": {"Labels": dict(_mapping(_mapping(service.get("Spec")).get("Labels"))),
                       "ExposedPorts": _exposed_ports(service)},
            "State": {"Running": False},
            "HostConfig": {"NetworkMode": ""},
            "NetworkSettings": {"Networks": {}},
        }
    view = task_view(service, task)
    return {
        "Id": view.task_id,
        "Name": view.name,
        "Config": {"Labels": dict(task_labels(service, task)), "ExposedPorts": _exposed_ports(service)},
        # Swarm's task state already waits for the container's healthcheck ("starting" until healthy).
        "State": {"Running": view.serving and not down, "StartedAt": view.started_at},
        "HostConfig": {"NetworkMode": ""},
        "NetworkSettings": {"Networks": _attachments(task, nodes)},
    }


def _parse(
    parse: ParseFunction, inspect: Mapping[str, Any], prefix: str, pinned_env: str | None, own_networks: frozenset[str]
) -> Outcome:
    try:
        return parse(inspect, prefix=prefix, pinned_env=pinned_env, own_networks=own_networks)
    except Exception as problem:  # a parser bug must cost one service, not the whole poll
        return Rejection(
            container_id=str(inspect.get("Id") or ""),
            name=str(inspect.get("Name") or ""),
            label=f"{prefix}.*",
            value="",
            reason=f"labelgw could not read this service's labels: {problem!r}",
        )


def service_outcomes(
    service: Mapping[str, Any],
    tasks: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, str],
    parse: ParseFunction,
    *,
    prefix: str = "labelgw",
    pinned_env: str | None = None,
    own_networks: frozenset[str] = frozenset(),
    down: frozenset[str] = frozenset(),
) -> dict[str, Outcome]:
    """Registry key -> outcome for one service and its tasks (tasks of other services are ignored).

    `down`: task ids known to be stopping (their container was killed): never in rotation again.
    """
    service_id = str(service.get("ID") or "")
    placeholder = _parse(parse, task_inspect(service, None, nodes), prefix, pinned_env, own_networks)
    if placeholder is None:
        return {}  # not ours: no <prefix>.service label, or another environment's
    if isinstance(placeholder, Rejection):
        return {service_key(service_id): placeholder}
    outcomes: dict[str, Outcome] = {}
    for task in tasks:
        if str(task.get("ServiceID") or "") != service_id:
            continue
        view = task_view(service, task)
        if view.ended or not view.task_id:
            continue
        outcome = _parse(
            parse, task_inspect(service, task, nodes, down=view.task_id in down), prefix, pinned_env, own_networks
        )
        if outcome is not None:
            outcomes[view.task_id] = outcome
    if not outcomes:
        outcomes[service_key(service_id)] = placeholder
    return outcomes


def _settling(service: Mapping[str, Any], tasks: Iterable[Mapping[str, Any]]) -> bool:
    """Is a task of this service on its way in or out (worth looking again soon)?"""
    service_id = str(service.get("ID") or "")
    for task in tasks:
        if str(task.get("ServiceID") or "") != service_id:
            continue
        view = task_view(service, task)
        if not view.ended and not view.serving:
            return True
    return False


@dataclass(frozen=True, slots=True)
class PollSummary:
    """What one full poll found, for its log line."""

    services: int
    routed: int
    rejected: int
    changed: bool


@dataclass(slots=True)
class _ServiceState:
    keys: frozenset[str] = frozenset()
    # Sequence number of the newest listing applied for this service: an older one landing later is ignored.
    applied_seq: int = -1
    settling: bool = False
    gone: bool = False


@dataclass(slots=True)
class SwarmTracker:
    """Listings in, route sink calls out; keyed by task id. Call it from one thread only.

    Every listing is issued with `next_seq()` and applied with that number: listings run in threads and may land
    out of order, and a service's newest listing wins.
    """

    sink: RouteSink
    parse: ParseFunction
    prefix: str = "labelgw"
    pinned_env: str | None = None
    own_networks: frozenset[str] = frozenset()
    _seq: int = 0
    _delivered: dict[str, Outcome] = field(default_factory=dict)
    _services: dict[str, _ServiceState] = field(default_factory=dict)
    # Task id -> its service id: tasks whose container was killed, stopped or died (a task never runs twice).
    _down: dict[str, str] = field(default_factory=dict)
    # Task id -> its service id: tasks whose container is paused.
    _paused: dict[str, str] = field(default_factory=dict)
    _nodes: dict[str, str] = field(default_factory=dict)

    _log = Logger()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    @property
    def nodes(self) -> Mapping[str, str]:
        return self._nodes

    # Listings.

    def apply_full(
        self,
        seq: int,
        services: Sequence[Mapping[str, Any]],
        tasks: Sequence[Mapping[str, Any]],
        nodes: Sequence[Mapping[str, Any]] | None = None,
    ) -> PollSummary:
        """Every labelled service with its tasks: services absent are gone (unless a newer look says otherwise)."""
        if nodes is not None:
            self._nodes = node_addresses(nodes)
        by_service: dict[str, list[Mapping[str, Any]]] = {}
        for task in tasks:
            by_service.setdefault(str(task.get("ServiceID") or ""), []).append(task)
        listed: set[str] = set()
        changed = False
        for service in services:
            service_id = str(service.get("ID") or "")
            if not service_id:
                continue
            listed.add(service_id)
            changed |= self._apply_service(seq, service_id, service, by_service.get(service_id, []))
        for service_id, state in list(self._services.items()):
            if service_id in listed:
                continue
            changed |= self._apply_service(seq, service_id, None, [])
            if state.gone and state.applied_seq <= seq:
                del self._services[service_id]  # this listing is newer than the removal: no tombstone needed
        live_tasks = {str(task.get("ID") or "") for task in tasks}
        for owners in (self._down, self._paused):
            for task_id in list(owners):
                if task_id not in live_tasks:
                    del owners[task_id]
        rejected = sum(1 for outcome in self._delivered.values() if isinstance(outcome, Rejection))
        return PollSummary(
            services=len(listed), routed=len(self._delivered) - rejected, rejected=rejected, changed=changed
        )

    def apply_service(
        self,
        seq: int,
        service_id: str,
        service: Mapping[str, Any] | None,
        tasks: Sequence[Mapping[str, Any]],
        nodes: Sequence[Mapping[str, Any]] | None = None,
    ) -> bool:
        """One service (None: it no longer exists) and its tasks. True when the sink heard of a change."""
        if nodes is not None:
            self._nodes.update(node_addresses(nodes))
        return self._apply_service(seq, service_id, service, tasks)

    def settling(self, service_id: str) -> bool:
        """Was a task of this service starting or stopping at its latest listing?"""
        state = self._services.get(service_id)
        return state is not None and state.settling

    def _apply_service(
        self, seq: int, service_id: str, service: Mapping[str, Any] | None, tasks: Sequence[Mapping[str, Any]]
    ) -> bool:
        state = self._services.get(service_id)
        if state is not None and seq < state.applied_seq:
            return False  # a newer listing of this service was applied already
        if service is None:
            outcomes: dict[str, Outcome] = {}
        else:
            down = frozenset(
                task for owners in (self._down, self._paused) for task, owner in owners.items() if owner == service_id
            )
            outcomes = service_outcomes(
                service, tasks, self._nodes, self.parse,
                prefix=self.prefix, pinned_env=self.pinned_env, own_networks=self.own_networks, down=down,
            )
        if state is None:
            # Also for a service seen gone: a tombstone, so that an older listing landing later cannot revive it.
            state = self._services[service_id] = _ServiceState()
        state.applied_seq = seq
        state.gone = service is None
        state.settling = service is not None and _settling(service, tasks)
        changed = self._deliver(state, outcomes)
        if service is None:
            for owners in (self._down, self._paused):
                for task_id in [task for task, owner in owners.items() if owner == service_id]:
                    del owners[task_id]
        return changed

    def _deliver(self, state: _ServiceState, outcomes: Mapping[str, Outcome]) -> bool:
        """Newcomers and changes first, then removals: a service is never left without its new tasks between."""
        changed = False
        for key, outcome in outcomes.items():
            if self._delivered.get(key, _MISSING) != outcome:
                changed = True
                self._delivered[key] = outcome
                self._to_sink("apply", lambda key=key, outcome=outcome: self.sink.apply(key, outcome))
        for key in state.keys - outcomes.keys():
            changed = True
            self._delivered.pop(key, None)
            self._to_sink("remove", lambda key=key: self.sink.remove(key))
        state.keys = frozenset(outcomes)
        return changed

    # Container events of task containers (the local node's tasks only: the engine has no task events).

    def container_event(self, event: Mapping[str, Any]) -> str | None:
        """A container event; returns the service worth listing again now, if any.

        kill (with a stopping signal), stop, die or pause of a task's container: the task leaves rotation at once
        (its desired state turned to shutdown a moment ago, or it failed), unless it is the last ready backend of
        its labelgw service, which keeps it until the listing this asks for shows the replacement.
        """
        if event.get("Type") != "container":
            return None
        attributes = _mapping(_mapping(event.get("Actor")).get("Attributes"))
        task_id = str(attributes.get(TASK_ID_LABEL) or "")
        service_id = str(attributes.get(SERVICE_ID_LABEL) or "")
        if not task_id or not service_id:
            return None
        verb = str(event.get("Action") or event.get("status") or "").split(":", 1)[0].strip()
        if verb in _TASK_DOWN_ACTIONS:
            if verb == "kill":
                sent = signal_number(attributes.get("signal"))
                if sent is not None and sent not in TERMINATING_SIGNALS:
                    return None  # HUP, USR1 ...: a reload, not a stop
            if verb == "pause":
                self._paused[task_id] = service_id  # Swarm still calls the task running
            else:
                self._down[task_id] = service_id
            self._leave_rotation(task_id)
            return service_id
        if verb in _TASK_START_ACTIONS:
            if verb == "unpause":
                self._paused.pop(task_id, None)
            return service_id
        return None

    def _leave_rotation(self, task_id: str) -> None:
        delivered = self._delivered.get(task_id)
        if not isinstance(delivered, ContainerSpec) or not delivered.ready:
            return
        others = any(
            isinstance(outcome, ContainerSpec) and outcome.ready and outcome.service == delivered.service
            for key, outcome in self._delivered.items()
            if key != task_id
        )
        if not others:
            return  # the last one: better a stopping task for a few ms than a 503; the listing decides
        down = dataclasses.replace(delivered, running=False)
        self._delivered[task_id] = down
        self._to_sink("mark_down", lambda: self.sink.mark_down(task_id))

    def _to_sink(self, method: str, call: Any) -> None:
        try:
            call()
        except Exception:
            # A bug in the registry must not stop the watcher: the next poll tries again.
            self._log.failure("route sink {method} failed", method=method)

    # For tests and views.

    def delivered(self) -> Mapping[str, Outcome]:
        return dict(self._delivered)

