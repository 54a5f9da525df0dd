"""outputs — what the daemon tells the world; none of it changes a sandbox.

- `heartbeat` and `poolfacts`: the daemon's liveness and per-pool facts in Redis, read by
  `sandboxd status`;
- `metrics`: Prometheus `/metrics`, fed from the event stream; `cost`: sandbox-seconds and
  money per pool; `resources`: host and per-sandbox CPU/memory with threshold alerts;
- `mqtt`: the bridge that mirrors the event stream to an MQTT broker;
- `sdnotify` and `watchdog`: systemd readiness, status and watchdog pings.
"""
