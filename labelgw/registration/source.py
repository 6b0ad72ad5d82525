"""Registered instances into the core `Registry`, as one more source of ContainerSpecs (reactor thread only).

`admit` is the API's path: the spec goes in, and if the registry refuses it for a clash with another service's host
and path (or the traffic-share rules between versions) the change is rolled back and the refusal returned, so the
caller answers 409 and nothing changed. `apply` is the path of registrations that are already decided (read back
from the state file, or from the etcd watch): a clash is then the registry's usual skipped-spec warning.
"""

from __future__ import annotations

from twisted.logger import Logger

from labelgw.core.model import Rejection
from labelgw.core.registry import Registry
from labelgw.registration.model import Registration, container_id

__all__ = ["RegisteredSource"]


class RegisteredSource:
    _log = Logger()

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        # What this source gave the registry, by registration key.
        self.applied: dict[str, Registration] = {}

    def admit(self, registration: Registration) -> Rejection | None:
        """Apply `registration`; on a clash, undo and return the registry's Rejection (nothing changed)."""
        spec = registration.spec
        previous = self.applied.get(registration.key)
        self._registry.apply(spec.container_id, spec)
        rejection = self._registry.rejections.get(spec.container_id)
        if rejection is None:
            self.applied[registration.key] = registration
            return None
        self._registry.remove(spec.container_id)
        if previous is not None:
            self._registry.apply(previous.spec.container_id, previous.spec)
        return rejection

    def apply(self, registration: Registration) -> None:
        self.applied[registration.key] = registration
        self._registry.apply(registration.spec.container_id, registration.spec)

    def withdraw(self, service: str, instance: str, why: str) -> bool:
        """Take the instance out of rotation and out of the registry at once; the log says which and why."""
        registration = self.applied.pop(f"{service}/{instance}", None)
        cid = container_id(service, instance)
        known = registration is not None or cid in self._registry.rejections
        if known:
            self._log.info(
                "registered instance {instance} of service {service} removed: {why}",
                instance=instance, service=service, why=why,
            )
            self._registry.remove(cid)
        return known
