"""zembed engines: the runtime (socket, heartbeats, batching) and the models it serves."""
