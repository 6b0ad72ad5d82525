"""Worker processes (`twistd labelgw --workers N`): a supervising process that owns the Docker watcher, the admin
listener and the certificate state, and N worker processes that serve the HTTP and HTTPS listeners.

- L{labelgw.workers.protocol}: the messages between them and their framing (sans-io);
- L{labelgw.workers.supervisor}: the supervising service (sockets held, workers spawned, restarted, replaced);
- L{labelgw.workers.worker}: a worker process (`python -m labelgw.workers.worker`);
- L{labelgw.workers.aggregate}: /metrics and the admin counters of the whole gateway, summed over the workers.
"""
