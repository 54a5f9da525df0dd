#!/bin/sh
# after-redis.sh [REDIS_UNIT] [UNIT_DIR]: order sandboxd after the local Redis service.
#
# With Redis on the same host, sandboxd must start after it and, above all, stop before it:
# a host shutdown (or `systemctl stop redis-server sandboxd`, one transaction) then stops
# sandboxd while Redis still answers, so every record is closed as the sandboxes go.
# (sandboxd terminates its sandboxes at a stop even when Redis is already gone, from its
# local registry, and writes their records at the next start; the ordering keeps that
# the exception.) The unit name differs between distributions (Debian: redis-server.service,
# Fedora/Arch: redis.service, a template: redis@6379.service), so it is a drop-in, written
# by `make install-service` (REDIS_UNIT=..., found automatically; REDIS_UNIT=none for a
# Redis on another host) for sandboxd.service, its template sandboxd@.service and
# sandboxd-api.service. Wants= starts Redis with sandboxd; After= orders the stop.
set -eu
unit=${1:-}
dir=${2:-/etc/systemd/system}
if [ -z "$unit" ]; then
  for candidate in redis-server.service redis.service; do
    if systemctl cat "$candidate" >/dev/null 2>&1; then unit=$candidate; break; fi
  done
fi
for service in sandboxd.service sandboxd@.service sandboxd-api.service; do
  rm -f "$dir/$service.d/redis.conf"
  if [ -n "$unit" ] && [ "$unit" != none ]; then
    mkdir -p "$dir/$service.d"
    printf '# Written by systemd/after-redis.sh: Redis runs on this host as %s.\n[Unit]\nWants=%s\nAfter=%s\n' \
      "$unit" "$unit" "$unit" > "$dir/$service.d/redis.conf"
  fi
done
echo "sandboxd ordered after: ${unit:-no local Redis unit found (none)}"
