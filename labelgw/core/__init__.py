"""The pure core: container specs and their labels, routes, the registry, backends, balancing, versions. No I/O."""
