"""The suite: unit, integration (real Redis, sandboxes, daemons), systemd lab."""
