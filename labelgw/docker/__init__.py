"""The Docker side: the pure tracker of container state and the watcher that feeds it from the engine."""
