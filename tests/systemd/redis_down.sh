#!/usr/bin/env bash
# Runs INSIDE ../shared/tools/systemd-lab (issue 21): a local Redis as a unit of its own
# (redis-lab.service), sandboxd ordered after it by the drop-in of systemd/after-redis.sh.
# 1. Both stopped in one transaction (as at a shutdown): sandboxd stops first, while Redis
#    answers. 2. `systemctl stop redis-lab sandboxd` (two jobs, in either order). 3. Redis
#    stopped first (a host where it went away), past the lease's TTL, then sandboxd. No
#    sandbox is left by any. Args: CHECKOUT REDIS_URL
set -uo pipefail
CHECKOUT=$1 REDIS_URL=$2
source "$CHECKOUT/tests/systemd/install.sh"
PORT=${REDIS_URL##*:}; PORT=${PORT%%/*}
cat > /etc/systemd/system/redis-lab.service <<UNIT
[Unit]
Description=a local Redis for the lab
[Service]
ExecStart=$(command -v redis-server) --port $PORT --bind 127.0.0.1 --save "" --appendonly no --dir /var/lib/redis-lab
StateDirectory=redis-lab
UNIT
result dropin "$(sh "$CHECKOUT/systemd/after-redis.sh" redis-lab.service | json_string)"
result dropin_text "$(cat /etc/systemd/system/sandboxd.service.d/redis.conf | json_string)"
write_config "lease_ttl_s = 1" "reconcile_interval_s = 0.5" "heartbeat_interval_s = 0.5" \
  'on_shutdown = "terminate"'
systemctl daemon-reload
result after "\"$(systemctl show -P After sandboxd)\""
result wants "\"$(systemctl show -P Wants sandboxd)\""

CLI=(sandboxd --config /etc/sandboxd/sandboxd.toml)
now() { date +%s.%N; }
since() { printf '%.3f' "$(echo "$(now) - $1" | bc)"; }
wait_for() {  # wait_for SECONDS COMMAND...: poll with a deadline
  local deadline=$((SECONDS + $1)); shift
  while (( SECONDS < deadline )); do "$@" && return 0; sleep 0.1; done; return 1
}
three_ready() {
  [[ $("${CLI[@]}" get pools -o json 2>/dev/null |
       python3 -c 'import json,sys; print(sum(p["ready"] for p in json.load(sys.stdin)))' 2>/dev/null) == 3 ]]
}
agents() { pgrep -fc "$AGENTS" || true; }
lapsed() { journalctl -u sandboxd -o cat --no-pager | grep -q '"lease lapsed'; }
start_both() {  # `sandboxd` alone: Wants= brings Redis up first
  systemctl start sandboxd || return 1
  [[ $(systemctl show -P ActiveState redis-lab) == active ]] || return 1
  printf 'pools:\n  - name: default\n    min_ready: 3\n    max_total: 3\n' |
    "${CLI[@]}" apply -f - >/dev/null || return 1
  wait_for 30 three_ready
}

stops() {  # systemd's own lines (a stopped unit is unloaded, with its timestamps), in order
  journalctl --no-pager -o cat _PID=1 | grep -E '^Stopp(ing|ed) (sandboxd|redis-lab)' | json_string
}

# 1. both in one transaction, as at a host's shutdown (shutdown.target conflicts with every
#    service): a target that conflicts with both. Ordered: sandboxd first, Redis after.
cat > /etc/systemd/system/lab-poweroff.target <<UNIT
[Unit]
Description=stops Redis and sandboxd in one transaction, like shutdown.target
Conflicts=redis-lab.service sandboxd.service
After=redis-lab.service sandboxd.service
UNIT
systemctl daemon-reload
start_both; result start1_rc $?
result agents_before1 "$(agents)"
systemctl start lab-poweroff.target; result stop1_rc $?
result agents_after1 "$(agents)"
result order1 "$(stops)"
systemctl stop lab-poweroff.target

# 2. `systemctl stop redis-lab sandboxd`: two jobs, queued one after the other (ordered only
#    if both are pending at once): whichever stops first, no sandbox is left.
start_both; result start3_rc $?
result agents_before3 "$(agents)"
systemctl stop redis-lab sandboxd; result stop3_rc $?
result agents_after3 "$(agents)"

# 3. Redis gone first, for longer than the lease; then the stop
start_both; result start2_rc $?
result agents_before2 "$(agents)"
# Its unit removed as well: a restart of sandboxd must not bring it back through Wants=
# (none would during a shutdown); Redis stays away.
systemctl stop redis-lab && rm /etc/systemd/system/redis-lab.service && systemctl daemon-reload
result redis_stop2_rc $?
wait_for 5 lapsed; result lapsed2_rc $?  # the TTL is 1 s
started=$(now)
systemctl stop sandboxd; result stop2_rc $?
result stop2_seconds "$(since "$started")"
result result2 "\"$(systemctl show -P Result sandboxd)\""
result agents_after2 "$(agents)"
result registry_after2 "$(ls /var/lib/sandboxd/sandboxes | wc -l)"
result outbox_after2 "$(python3 -c 'import json; print(json.dumps([json.loads(e["event"]["data"]) | {"type": e["event"]["type"]} for e in json.load(open("/var/lib/sandboxd/state/outbox.json"))]))' 2>/dev/null || echo null)"
journalctl -u sandboxd -o cat --no-pager > /var/lib/journal-copy.txt
result journal "$(python3 -c 'import json; print(json.dumps(open("/var/lib/journal-copy.txt").read()))')"
