#!/usr/bin/env bash
# Runs INSIDE ../shared/tools/systemd-lab: `systemctl reload` applies a changed config live
# without touching the pools; a hung reconcile loop is killed by the watchdog, restarted by
# Restart=on-failure, and the new daemon adopts the sandboxes. Args: CHECKOUT REDIS_URL
set -uo pipefail
CHECKOUT=$1 REDIS_URL=$2
source "$CHECKOUT/tests/systemd/install.sh"
HANG=/var/lib/sandboxd/hang
mkdir -p /etc/systemd/system/sandboxd.service.d
printf '[Service]\nWatchdogSec=3s\nRestartSec=0.5s\n' > /etc/systemd/system/sandboxd.service.d/fast.conf
base=("heartbeat_interval_s = 0.3" "watchdog_hang_file = \"$HANG\"" 'on_shutdown = "terminate"')
write_config "${base[@]}" "reconcile_interval_s = 2" 'log_level = "INFO"'
systemctl daemon-reload
systemctl start sandboxd; result start_rc $?

ready_ids() { sandboxd --config /etc/sandboxd/sandboxd.toml get sandboxes -o json |
  python3 -c 'import json,sys; print(" ".join(sorted(s["id"] for s in json.load(sys.stdin) if s["state"]=="ready")))'; }
wait_for() {  # wait_for SECONDS COMMAND...: poll with a deadline
  local deadline=$((SECONDS + $1)); shift
  while (( SECONDS < deadline )); do "$@" && return 0; sleep 0.1; done; return 1
}
two_ready() { [[ $(ready_ids | wc -w) -ge 2 ]]; }
wait_for 30 two_ready
before=$(ready_ids); pid=$(systemctl show -P MainPID sandboxd)
result ready_before "\"$before\""
result pid_before "$pid"
result agents_before "\"$(pgrep -f "$AGENTS" | sort | tr '\n' ' ')\""

# reload: log level and reconcile interval change live; health_concurrency needs a restart
write_config "${base[@]}" "reconcile_interval_s = 0.25" 'log_level = "DEBUG"' "health_concurrency = 7"
systemctl reload sandboxd; result reload_rc $?
reloaded() { status_json | python3 -c 'import json,sys; d=json.load(sys.stdin)["daemon"]; sys.exit(d.get("log_level")!="DEBUG")'; }
wait_for 10 reloaded; result reloaded_rc $?
result status_after_reload "$(status_json | python3 -c 'import json,sys; d=json.load(sys.stdin)["daemon"]; print(json.dumps({k: d.get(k) for k in ("log_level","reconcile_interval_s","pid")}))')"
result pid_after_reload "$(systemctl show -P MainPID sandboxd)"
result ready_after_reload "\"$(ready_ids)\""
result reload_event "$(sandboxd --config /etc/sandboxd/sandboxd.toml events -n 500 -o json | grep '"daemon.reloaded"' | tail -1 | json_string)"
passes() { journalctl -u sandboxd -o json --no-pager | python3 -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin]
print(json.dumps([[int(r["__REALTIME_TIMESTAMP"]), r.get("MESSAGE", "")] for r in rows if "reconcile pass" in str(r.get("MESSAGE"))]))'; }
enough_passes() { [[ $(passes | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') -ge 8 ]]; }
wait_for 20 enough_passes
result debug_passes "$(passes)"

# watchdog: the reconcile loop hangs; systemd kills the daemon and starts a new one
touch "$HANG"
restarted() { local now; now=$(systemctl show -P MainPID sandboxd); [[ $now != 0 && $now != "$pid" ]] && reloaded_new; }
reloaded_new() { status_json | python3 -c "import json,sys; d=json.load(sys.stdin)['daemon']; sys.exit(not d['alive'] or d['pid'] == $pid)"; }
wait_for 40 restarted; result restarted_rc $?
result hang_file_left "$([[ -e $HANG ]] && echo true || echo false)"
result nrestarts "$(systemctl show -P NRestarts sandboxd)"
result ready_after_restart "\"$(ready_ids)\""
result agents_after_restart "\"$(pgrep -f "$AGENTS" | sort | tr '\n' ' ')\""
systemctl stop sandboxd; result stop_rc $?
result journal "$(journalctl -u sandboxd -o cat --no-pager | json_string)"
result agents_after_stop "$(pgrep -fc "$AGENTS" || true)"
