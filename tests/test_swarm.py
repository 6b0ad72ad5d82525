"""labelgw.docker.swarm, pure: service + tasks -> specs, on `docker service inspect` / task / node JSON captured from
the private test engine (tests/data/swarm/, see its README.md; a single-node swarm on
loopback). Overlay addresses in that data are only parsed, never connected to."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from labelgw.core.labels import parse_container
from labelgw.core.model import ContainerSpec, Rejection
from labelgw.docker.swarm import (
    SwarmTracker,
    node_addresses,
    service_key,
    service_outcomes,
    task_inspect,
    task_labels,
    task_view,
)

DATA = Path(__file__).parent / "data" / "swarm"
NODES = json.loads((DATA / "nodes.json").read_text())
NODE_ADDRESSES = node_addresses(NODES)


def load(name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = json.loads((DATA / f"{name}.json").read_text())
    return data["service"], data["tasks"]


def outcomes(service: dict[str, Any], tasks: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return service_outcomes(service, tasks, NODE_ADDRESSES, parse_container, **kw)


def by_task(service: dict[str, Any], tasks: list[dict[str, Any]], state: str, desired: str) -> dict[str, Any]:
    return next(t for t in tasks if t["Status"]["State"] == state and t["DesiredState"] == desired)


# Nodes.


def test_the_node_address_is_its_status_address() -> None:
    assert set(NODE_ADDRESSES.values()) == {"127.0.0.1"}


def test_a_manager_reporting_0000_is_reached_at_its_advertised_manager_address() -> None:
    node = copy.deepcopy(NODES[0])
    node["Status"]["Addr"] = "0.0.0.0"
    node["ManagerStatus"]["Addr"] = "127.0.0.9:2377"
    assert node_addresses([node]) == {node["ID"]: "127.0.0.9"}
    node["ManagerStatus"]["Addr"] = "[::1]:2377"
    assert node_addresses([node]) == {node["ID"]: "::1"}
    del node["ManagerStatus"]
    assert node_addresses([node]) == {}


# One service, steady.


def test_a_host_network_task_is_a_backend_at_its_node_address_and_the_label_port() -> None:
    service, tasks = load("host_steady")
    result = outcomes(service, tasks)
    (task,) = tasks
    spec = result[task["ID"]]
    assert isinstance(spec, ContainerSpec)
    assert (spec.service, spec.address, spec.port, spec.version) == ("web", "127.0.0.1", 18091, "v1")
    assert spec.ready and spec.hosts == ("web.localhost",)
    assert spec.name == f"web.1.{task['ID']}"
    assert spec.started_at == task["Status"]["Timestamp"]
    assert list(result) == [task["ID"]]


def test_an_overlay_task_is_a_backend_at_its_address_on_that_network() -> None:
    service, tasks = load("overlay_steady")
    (task,) = tasks
    spec = outcomes(service, tasks)[task["ID"]]
    assert isinstance(spec, ContainerSpec)
    assert (spec.address, spec.port, spec.ready) == ("10.254.88.3", 80, True)


def test_the_network_label_chooses_among_the_task_networks() -> None:
    service, tasks = load("overlay_steady")
    service["Spec"]["Labels"]["labelgw.network"] = "lgwov"
    spec = outcomes(service, tasks)[tasks[0]["ID"]]
    assert isinstance(spec, ContainerSpec) and spec.address == "10.254.88.3"
    service["Spec"]["Labels"]["labelgw.network"] = "backend"
    rejection = outcomes(service, tasks)[tasks[0]["ID"]]
    assert isinstance(rejection, Rejection)
    assert rejection.label == "labelgw.network" and "not on network 'backend' (networks: lgwov)" in rejection.reason


def test_the_ingress_network_is_never_a_backend_address() -> None:
    service, tasks = load("overlay_steady")
    (task,) = tasks
    ingress = copy.deepcopy(task["NetworksAttachments"][0])
    ingress["Network"]["Spec"].update({"Name": "ingress", "Ingress": True})
    ingress["Addresses"] = ["10.0.0.7/24"]
    task["NetworksAttachments"].insert(0, ingress)
    inspect = task_inspect(service, task, NODE_ADDRESSES)
    assert inspect["NetworkSettings"]["Networks"] == {"lgwov": {"IPAddress": "10.254.88.3"}}


def test_the_gateway_shares_a_network_so_that_address_is_preferred() -> None:
    service, tasks = load("overlay_steady")
    (task,) = tasks
    other = copy.deepcopy(task["NetworksAttachments"][0])
    other["Network"]["Spec"]["Name"] = "aaa-first"
    other["Addresses"] = ["10.254.99.4/24"]
    task["NetworksAttachments"].insert(0, other)
    first = outcomes(service, tasks)[task["ID"]]
    shared = outcomes(service, tasks, own_networks=frozenset({"lgwov"}))[task["ID"]]
    assert isinstance(first, ContainerSpec) and first.address == "10.254.99.4"
    assert isinstance(shared, ContainerSpec) and shared.address == "10.254.88.3"


def test_without_a_port_label_the_single_published_target_port_is_used() -> None:
    service, tasks = load("overlay_steady")
    del service["Spec"]["Labels"]["labelgw.port"]
    service["Spec"]["EndpointSpec"]["Ports"] = [{"Protocol": "tcp", "TargetPort": 8000, "PublishMode": "ingress"}]
    spec = outcomes(service, tasks)[tasks[0]["ID"]]
    assert isinstance(spec, ContainerSpec) and spec.port == 8000
    service["Spec"]["EndpointSpec"]["Ports"] = []
    result = outcomes(service, tasks)
    assert list(result) == [service_key(service["ID"])]
    rejection = result[service_key(service["ID"])]
    assert isinstance(rejection, Rejection) and rejection.label == "labelgw.port"


# Labels: the same specs the container source makes.


SERVICE_LABELS = {
    "labelgw.service": "shop",
    "labelgw.version": "v2",
    "labelgw.traffic": "10",
    "labelgw.port": "18091",
    "labelgw.host": "shop.example.test",
    "labelgw.path": "/api",
    "labelgw.strip_prefix": "true",
    "labelgw.health.path": "/healthz",
    "labelgw.health.interval": "2s",
    "labelgw.ratelimit": "100/s",
    "labelgw.max_inflight": "20",
    "labelgw.canary.max_error_rate": "5%",
}


def test_a_service_label_means_what_the_same_container_label_means() -> None:
    service, tasks = load("host_steady")
    service["Spec"]["Labels"] = dict(SERVICE_LABELS)
    (task,) = tasks
    from_service = outcomes(service, tasks)[task["ID"]]
    container = {
        "Id": task["ID"],
        "Name": f"/web.1.{task['ID']}",
        "Config": {"Labels": dict(SERVICE_LABELS)},
        "State": {"Running": True, "StartedAt": task["Status"]["Timestamp"]},
        "HostConfig": {"NetworkMode": "host"},
    }
    from_container = parse_container(container)
    assert isinstance(from_service, ContainerSpec) and isinstance(from_container, ContainerSpec)
    assert from_service == from_container
    assert from_service.middleware is not None and from_service.health_check is not None
    assert from_service.traffic == 10.0 and from_service.canary_max_error_rate == 0.05


def test_a_bad_label_is_one_rejection_for_the_whole_service() -> None:
    service, tasks = load("host_update_05")
    service["Spec"]["Labels"]["labelgw.wieght"] = "3"
    result = outcomes(service, tasks)
    assert list(result) == [service_key(service["ID"])]
    rejection = result[service_key(service["ID"])]
    assert isinstance(rejection, Rejection)
    assert rejection.label == "labelgw.wieght" and rejection.name == "web" and rejection.hosts == ("web.localhost",)


def test_services_without_the_service_label_or_of_another_env_are_not_ours() -> None:
    service, tasks = load("host_steady")
    del service["Spec"]["Labels"]["labelgw.service"]
    assert outcomes(service, tasks) == {}
    service, tasks = load("host_steady")
    assert outcomes(service, tasks, pinned_env="prod") == {}
    service["Spec"]["Labels"]["labelgw.env"] = "prod"
    assert set(outcomes(service, tasks, pinned_env="prod")) == {tasks[0]["ID"]}


def test_another_prefix_reads_other_labels() -> None:
    service, tasks = load("host_steady")
    assert outcomes(service, tasks, prefix="edge") == {}
    service["Spec"]["Labels"] = {"edge.service": "api", "edge.port": "9000"}
    spec = outcomes(service, tasks, prefix="edge")[tasks[0]["ID"]]
    assert isinstance(spec, ContainerSpec) and (spec.service, spec.port) == ("api", 9000)


# A rolling update (order: start-first), snapshot by snapshot as the engine showed it.


def test_the_new_task_waits_out_of_rotation_while_it_starts() -> None:
    service, tasks = load("host_update_01")
    result = outcomes(service, tasks)
    old = by_task(service, tasks, "running", "running")
    new = by_task(service, tasks, "new", "ready")
    assert isinstance(result[old["ID"]], ContainerSpec) and result[old["ID"]].ready
    assert isinstance(result[new["ID"]], ContainerSpec) and not result[new["ID"]].ready


def test_a_task_made_from_the_previous_spec_keeps_its_labels_until_it_leaves() -> None:
    service, tasks = load("host_update_04")
    old = by_task(service, tasks, "running", "running")
    new = next(t for t in tasks if t is not old)
    assert task_labels(service, old)["labelgw.port"] == "18091"
    assert task_labels(service, new)["labelgw.port"] == "18092"
    result = outcomes(service, tasks)
    assert (result[old["ID"]].port, result[old["ID"]].version, result[old["ID"]].ready) == (18091, "v1", True)
    assert (result[new["ID"]].port, result[new["ID"]].version, result[new["ID"]].ready) == (18092, "v2", True)


def test_a_task_whose_desired_state_is_shutdown_leaves_rotation_while_still_running() -> None:
    service, tasks = load("host_update_05")
    old = by_task(service, tasks, "running", "shutdown")
    view = task_view(service, old)
    assert view.stopping and not view.serving and not view.ended
    result = outcomes(service, tasks)
    assert isinstance(result[old["ID"]], ContainerSpec)
    assert not result[old["ID"]].ready and result[old["ID"]].port == 18091
    assert [spec.port for spec in result.values() if spec.ready] == [18092]


def test_ended_tasks_are_forgotten_and_a_service_without_live_tasks_keeps_a_placeholder() -> None:
    service, tasks = load("host_scaled_to_zero")
    result = outcomes(service, tasks)
    shut = by_task(service, tasks, "shutdown", "shutdown")
    assert shut["ID"] not in result
    removing = by_task(service, tasks, "running", "remove")
    assert not result[removing["ID"]].ready
    removing["Status"]["State"] = "shutdown"
    result = outcomes(service, tasks)
    placeholder = result.pop(service_key(service["ID"]))
    assert result == {}
    assert isinstance(placeholder, ContainerSpec)
    assert (placeholder.service, placeholder.ready, placeholder.address, placeholder.name) == ("web", False, "", "web")


def test_a_task_known_to_be_down_stays_out_of_rotation() -> None:
    service, tasks = load("host_steady")
    (task,) = tasks
    result = outcomes(service, tasks, down=frozenset({task["ID"]}))
    assert not result[task["ID"]].ready


# The tracker: listings in, sink calls out.


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def apply(self, key: str, outcome: Any) -> None:
        self.calls.append(("apply", key, outcome))

    def mark_down(self, key: str) -> None:
        self.calls.append(("mark_down", key, None))

    def remove(self, key: str) -> None:
        self.calls.append(("remove", key, None))

    def resync(self, outcomes: Any) -> None:
        raise AssertionError("the swarm tracker never resyncs the whole registry")

    def take(self) -> list[tuple[str, str, Any]]:
        calls, self.calls = self.calls, []
        return calls


def tracker() -> tuple[SwarmTracker, Sink]:
    sink = Sink()
    return SwarmTracker(sink, parse_container), sink


def summary(calls: list[tuple[str, str, Any]]) -> list[tuple[str, str, bool | None]]:
    return [(verb, key[:5], getattr(outcome, "ready", None)) for verb, key, outcome in calls]


def test_a_full_listing_applies_each_task_once_and_again_only_on_change() -> None:
    track, sink = tracker()
    service, tasks = load("host_steady")
    result = track.apply_full(track.next_seq(), [service], tasks, NODES)
    assert (result.services, result.routed, result.rejected, result.changed) == (1, 1, 0, True)
    assert summary(sink.take()) == [("apply", tasks[0]["ID"][:5], True)]
    assert not track.apply_full(track.next_seq(), [service], tasks, NODES).changed
    assert sink.take() == []


def test_a_rolling_update_swaps_backends_without_a_moment_with_none_ready() -> None:
    track, sink = tracker()
    ready_after: list[int] = []
    live: dict[str, Any] = {}
    for name in ["host_steady", "host_update_01", "host_update_02", "host_update_03", "host_update_04",
                 "host_update_05", "host_scaled_to_zero"]:
        service, tasks = load(name)
        track.apply_full(track.next_seq(), [service], tasks, NODES)
        for verb, key, outcome in sink.take():
            if verb == "remove":
                live.pop(key, None)
            else:
                live[key] = outcome
        ready_after.append(sum(1 for spec in live.values() if spec.ready))
    assert ready_after == [1, 1, 1, 1, 2, 1, 0]


def test_a_service_gone_from_the_listing_is_removed() -> None:
    track, sink = tracker()
    service, tasks = load("host_steady")
    track.apply_full(track.next_seq(), [service], tasks, NODES)
    sink.take()
    track.apply_full(track.next_seq(), [], [], NODES)
    assert summary(sink.take()) == [("remove", tasks[0]["ID"][:5], None)]
    assert track.delivered() == {}


def test_an_older_listing_landing_after_a_newer_one_changes_nothing() -> None:
    track, sink = tracker()
    service, tasks = load("host_steady")
    older = track.next_seq()
    newer = track.next_seq()
    assert track.apply_service(newer, service["ID"], None, [], NODES) is False  # removed: nothing was known
    track.apply_service(newer, service["ID"], service, tasks, NODES)
    sink.take()
    track.apply_full(older, [], [], NODES)  # predates the service: must not remove it
    assert sink.take() == []
    track.apply_service(track.next_seq(), service["ID"], None, [])
    assert summary(sink.take()) == [("remove", tasks[0]["ID"][:5], None)]
    track.apply_full(older, [service], tasks, NODES)  # predates the removal
    assert sink.take() == []


def kill_event(task: dict[str, Any], action: str = "kill", signal: str | None = "15") -> dict[str, Any]:
    attributes = {
        "com.docker.swarm.task.id": task["ID"],
        "com.docker.swarm.service.id": task["ServiceID"],
        "name": f"web.1.{task['ID']}",
    }
    if signal is not None:
        attributes["signal"] = signal
    return {"Type": "container", "Action": action, "Actor": {"ID": "c" * 64, "Attributes": attributes}}


def test_a_killed_task_container_leaves_rotation_at_once_when_others_serve() -> None:
    track, sink = tracker()
    service, tasks = load("host_update_04")
    track.apply_full(track.next_seq(), [service], tasks, NODES)
    sink.take()
    old = by_task(service, tasks, "running", "running")
    assert track.container_event(kill_event(old)) == service["ID"]
    assert sink.take() == [("mark_down", old["ID"], None)]
    # A listing that predates the kill still shows it serving: it stays down.
    track.apply_full(track.next_seq(), [service], tasks, NODES)
    assert all(not outcome.ready for verb, key, outcome in sink.take() if key == old["ID"])
    assert not track.delivered()[old["ID"]].ready


def test_the_last_ready_task_stays_until_the_listing_shows_its_replacement() -> None:
    track, sink = tracker()
    service, tasks = load("host_steady")
    track.apply_full(track.next_seq(), [service], tasks, NODES)
    sink.take()
    assert track.container_event(kill_event(tasks[0])) == service["ID"]
    assert sink.take() == []
    track.apply_service(track.next_seq(), service["ID"], service, tasks)
    assert summary(sink.take()) == [("apply", tasks[0]["ID"][:5], False)]


def test_container_events_that_do_not_stop_a_task() -> None:
    track, sink = tracker()
    service, tasks = load("host_update_04")
    track.apply_full(track.next_seq(), [service], tasks, NODES)
    sink.take()
    old = by_task(service, tasks, "running", "running")
    assert track.container_event(kill_event(old, signal="HUP")) is None  # a reload
    assert track.container_event(kill_event(old, action="start", signal=None)) == service["ID"]
    assert track.container_event(kill_event(old, action="exec_start: sh", signal=None)) is None
    plain = kill_event(old)
    plain["Actor"]["Attributes"] = {"name": "not-a-task"}
    assert track.container_event(plain) is None
    assert track.container_event({"Type": "service", "Action": "update", "Actor": {"ID": service["ID"]}}) is None
    assert sink.take() == []


def test_settling_while_a_task_starts_or_stops() -> None:
    track, _ = tracker()
    for name, settling in [("host_steady", False), ("host_update_02", True), ("host_update_05", True)]:
        service, tasks = load(name)
        track.apply_service(track.next_seq(), service["ID"], service, tasks, NODES)
        assert track.settling(service["ID"]) is settling, name


def test_a_second_service_with_the_same_labelgw_service_adds_backends() -> None:
    track, sink = tracker()
    web, web_tasks = load("host_steady")
    other = copy.deepcopy(web)
    other["ID"] = "second" + web["ID"][6:]
    other["Spec"]["Name"] = "web-b"
    other["Spec"]["Labels"]["labelgw.port"] = "18099"
    other_tasks = copy.deepcopy(web_tasks)
    for task in other_tasks:
        task["ID"] = "t2" + task["ID"][2:]
        task["ServiceID"] = other["ID"]
    track.apply_full(track.next_seq(), [web, other], web_tasks + other_tasks, NODES)
    specs = [outcome for _, _, outcome in sink.take()]
    assert sorted((spec.service, spec.port, spec.ready) for spec in specs) == [("web", 18091, True), ("web", 18099, True)]


def test_a_sink_that_raises_does_not_stop_the_tracker() -> None:
    class Broken(Sink):
        def apply(self, key: str, outcome: Any) -> None:
            raise RuntimeError("registry bug")

    track = SwarmTracker(Broken(), parse_container)
    service, tasks = load("host_steady")
    track.apply_full(track.next_seq(), [service], tasks, NODES)
    assert set(track.delivered()) == {tasks[0]["ID"]}


@pytest.mark.parametrize("name", ["host_steady", "host_update_05", "overlay_steady"])
def test_task_inspect_is_plain_json(name: str) -> None:
    service, tasks = load(name)
    for task in tasks:
        json.dumps(task_inspect(service, task, NODE_ADDRESSES))
    assert dataclasses.is_dataclass(task_view(service, tasks[0]))


def test_a_paused_task_container_is_out_of_rotation_until_unpaused() -> None:
    track, sink = tracker()
    service, tasks = load("host_update_04")
    track.apply_full(track.next_seq(), [service], tasks, NODES)
    sink.take()
    old = by_task(service, tasks, "running", "running")
    assert track.container_event(kill_event(old, action="pause", signal=None)) == service["ID"]
    assert sink.take() == [("mark_down", old["ID"], None)]
    track.apply_service(track.next_seq(), service["ID"], service, tasks)
    assert sink.take() == []  # the listing still says running: it stays down
    assert track.container_event(kill_event(old, action="unpause", signal=None)) == service["ID"]
    track.apply_service(track.next_seq(), service["ID"], service, tasks)
    assert summary(sink.take()) == [("apply", old["ID"][:5], True)]
