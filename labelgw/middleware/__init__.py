"""Middlewares: steps a request passes through on its service's route before it reaches a backend, each set by
the service's labels (labelgw.core.middleware). Order: rate limit, circuit breaker and concurrency limit,
fallback; see labelgw.middleware.chain. One module per middleware, pure where it can be (time passed in)."""
