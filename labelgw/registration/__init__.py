"""Services that register themselves: the registration API, its leases, and the registries that keep them.

A registration (`PUT /v1/services/<service>/instances/<instance-id>`) is one more source of the ContainerSpecs that
labels produce: its JSON fields are mapped to label keys and read by `labelgw.core.labels`, so the same rules apply
and versions, canary shares, balancing, health checks, middlewares, metrics and the admin views work unchanged.

- `model`: JSON body -> `Registration` (the spec built by the label parser), or a `RegistrationError` naming the
  field; pure.
- `leases`: lease bookkeeping on an injected clock (one timer, a heap of expiries); pure.
- `source`: applies registrations to the core `Registry` (admission with the host/path clash rule, removal).
- `embedded`: the default registry, in memory, persisted to the state directory (`persist`).
- `etcd`: registrations as keys under a prefix bound to etcd leases, watched by every gateway.
- `api`: the HTTP listener (`--registry-api`); `client`: `python -m labelgw register`.
"""
