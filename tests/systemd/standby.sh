#!/usr/bin/env bash
# Runs INSIDE ../shared/tools/systemd-lab (issue 17, case 6): two instances of the template
# unit, sandboxd@a and sandboxd@b, with one config (same node, same workspace): one acts for
# the node, the other is its hot standby. `systemctl kill -s KILL` of the active one's main
# process: the standby takes over (next epoch, the same sandboxes adopted) and
# Restart=on-failure brings the killed one back as the new standby. Args: CHECKOUT REDIS_URL
set -uo pipefail
CHECKOUT=$1 REDIS_URL=$2
source "$CHECKOUT/tests/systemd/install.sh"
TTL=2
write_config 'node = "lab-node"' "lease_ttl_s = $TTL" "reconcile_interval_s = 1" \
  "heartbeat_interval_s = 0.5" 'on_shutdown = "terminate"'
verify=$(systemd-analyze verify sandboxd@a.service 2>&1); rc=$?
result verify_rc "$rc"
result verify_output "$(printf '%s' "$verify" | json_string)"
systemctl daemon-reload
exposure() { systemd-analyze security "$1" --no-pager 2>/dev/null | tail -1 | grep -oE '[0-9]+\.[0-9]+' | head -1; }
result exposure "{\"sandboxd\": \"$(exposure sandboxd)\", \"sandboxd@a\": \"$(exposure sandboxd@a)\"}"

PY="$CHECKOUT/.venv/bin/python"
now() { date +%s.%N; }
since() { printf '%.3f' "$(echo "$(now) - $1" | bc)"; }
wait_for() {  # wait_for SECONDS COMMAND...: poll with a deadline
  local deadline=$((SECONDS + $1)); shift
  while (( SECONDS < deadline )); do "$@" && return 0; sleep 0.1; done; return 1
}
unit() {  # unit X: what systemd says of sandboxd@X, as JSON
  systemctl show -p ActiveState -p SubState -p StatusText -p MainPID -p NRestarts -p Result \
    "sandboxd@$1" | python3 -c 'import json,sys; print(json.dumps(dict(l.rstrip("\n").split("=", 1) for l in sys.stdin)))'
}
line_of() {  # line_of X: the fresh line of sandboxd@X's main process in <prefix>:daemons ({})
  "$PY" - "$REDIS_URL" "$(systemctl show -P MainPID "sandboxd@$1")" <<'EOF'
import json, sys, time
import redis
url, pid = sys.argv[1], int(sys.argv[2])
lines = [json.loads(v) for v in redis.Redis.from_url(url).hvals("sandboxd:daemons")]
mine = [d for d in lines if d["pid"] == pid and time.time() - d["heartbeat_at"] < 3]
print(json.dumps(mine[0] if pid and mine else {}))
EOF
}
daemons() {  # every fresh line of <prefix>:daemons of a daemon still running (a SIGKILLed
  # one cannot take its line away: it stays fresh for a while, racing the restart)
  "$PY" - "$REDIS_URL" <<'EOF'
import json, os, sys, time
import redis
lines = [json.loads(v) for v in redis.Redis.from_url(sys.argv[1]).hvals("sandboxd:daemons")]
live = (d for d in lines if time.time() - d["heartbeat_at"] < 3 and os.path.exists(f"/proc/{d['pid']}"))
print(json.dumps(sorted(live, key=lambda d: d["role"])))
EOF
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin).get('$1', ''))"; }
role() { line_of "$1" | field role; }
status_text() { systemctl show -P StatusText "sandboxd@$1"; }
sandbox_ids() {  # STATE (or "all"): the ids of the pool's sandboxes in that state
  sandboxd --config /etc/sandboxd/sandboxd.toml get sandboxes -o json |
    python3 -c 'import json,sys; print(" ".join(sorted(s["id"] for s in json.load(sys.stdin) if sys.argv[1] in ("all", s["state"]))))' "$1"
}
agents() { pgrep -f "$AGENTS" | sort | tr '\n' ' '; }

# Both at once, as `systemctl enable --now sandboxd@a sandboxd@b` would: start returns when
# both sent READY=1 (the active one after its first reconcile, the standby at once).
systemctl start sandboxd@a sandboxd@b; result start_rc $?
one_each() { [[ "$(role a) $(role b)" =~ ^(active\ standby|standby\ active)$ ]]; }
two_ready() { [[ $(sandbox_ids ready | wc -w) -ge 2 ]]; }
wait_for 30 one_each; result one_each_rc $?
wait_for 30 two_ready; result two_ready_rc $?
if [[ $(role a) == active ]]; then ACTIVE=a STANDBY=b; else ACTIVE=b STANDBY=a; fi
result active_unit "\"$ACTIVE\""
result units_before "{\"active\": $(unit $ACTIVE), \"standby\": $(unit $STANDBY)}"
result lines_before "{\"active\": $(line_of $ACTIVE), \"standby\": $(line_of $STANDBY)}"
result daemons_before "$(daemons)"
before_all=$(sandbox_ids all); before_ready=$(sandbox_ids ready); before_agents=$(agents)
result sandboxes_before "\"$before_all\""
result ready_before "\"$before_ready\""
result agents_before "\"$before_agents\""
old_pid=$(systemctl show -P MainPID "sandboxd@$ACTIVE")
old_epoch=$(line_of $ACTIVE | field epoch)

# The active daemon's main process only: a plain `systemctl kill` signals every process of
# the unit's cgroup, the sandboxes too (KillMode= applies to stop, not to kill).
killed_at=$(now)
systemctl kill --kill-whom=main -s KILL "sandboxd@$ACTIVE"; result kill_rc $?
took_over() { [[ $(role $STANDBY) == active ]]; }
wait_for 20 took_over; result takeover_rc $?
result takeover_s "$(since "$killed_at")"
serving() { [[ $(status_text $STANDBY) == *"reconciling revision"* ]]; }  # after its 1st pass
wait_for 20 serving; result serving_rc $?
result serving_s "$(since "$killed_at")"
restarted() {
  local pid; pid=$(systemctl show -P MainPID "sandboxd@$ACTIVE")
  [[ $pid != 0 && $pid != "$old_pid" && $(systemctl show -P NRestarts "sandboxd@$ACTIVE") -ge 1 ]] &&
    [[ $(role $ACTIVE) == standby && $(status_text $ACTIVE) == standby* ]]
}
wait_for 30 restarted; result restarted_rc $?
result restarted_s "$(since "$killed_at")"
result old_epoch "${old_epoch:-null}"
result units_after "{\"killed\": $(unit $ACTIVE), \"other\": $(unit $STANDBY)}"
result lines_after "{\"killed\": $(line_of $ACTIVE), \"other\": $(line_of $STANDBY)}"
result daemons_after "$(daemons)"
# Nothing created twice: read the pool after a whole reconcile pass of the new active daemon
# that began after all this: the second pass to end after now (`last_reconcile_at` of the
# `<prefix>:daemon` heartbeat, which only the active daemon writes).
new_instance=$(line_of $STANDBY | field instance)
pass_ended_after() { status_json | python3 -c 'import json,sys; d=json.load(sys.stdin)["daemon"]
sys.exit(not (d["instance"] == sys.argv[1] and d["last_reconcile_at"] > float(sys.argv[2])))' "$new_instance" "$1"; }
last_pass() { status_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["daemon"]["last_reconcile_at"])'; }
wait_for 15 pass_ended_after "$(now)" && wait_for 15 pass_ended_after "$(last_pass)"
result passed_rc $?
result sandboxes_after "\"$(sandbox_ids all)\""
result ready_after "\"$(sandbox_ids ready)\""
result agents_after "\"$(agents)\""
result events "$(sandboxd --config /etc/sandboxd/sandboxd.toml events -n 1000 -o json | python3 -c '
import collections, json, sys
print(json.dumps(collections.Counter(json.loads(line)["type"] for line in sys.stdin if line.strip())))')"
messages() { journalctl -u "sandboxd@$1" -o cat --no-pager | python3 -c '
import json, sys
out = []
for line in sys.stdin:
    try:
        out.append(json.loads(line)["message"])
    except (ValueError, KeyError, TypeError):
        out.append(line.rstrip("\n"))  # systemd about the unit
print(json.dumps(out))'; }
result journal "{\"killed\": $(messages $ACTIVE), \"other\": $(messages $STANDBY)}"

# The standby first: stopping the active one first would hand its lease on.
systemctl stop "sandboxd@$ACTIVE"; result stop_standby_rc $?
systemctl stop "sandboxd@$STANDBY"; result stop_active_rc $?
result agents_after_stop "$(pgrep -fc "$AGENTS" || true)"
