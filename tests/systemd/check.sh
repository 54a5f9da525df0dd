#!/usr/bin/env bash
# Runs INSIDE ../shared/tools/systemd-lab: installs the real unit, starts, inspects, stops it.
# Prints `RESULT <json>` lines that tests/systemd/test_unit.py reads. Args: CHECKOUT REDIS_URL
set -uo pipefail
CHECKOUT=$1 REDIS_URL=$2
source "$CHECKOUT/tests/systemd/install.sh"
write_config "reconcile_interval_s = 1" "heartbeat_interval_s = 0.5" 'on_shutdown = "terminate"'
verify=$(systemd-analyze verify /etc/systemd/system/sandboxd.service 2>&1); rc=$?
result verify_rc "$rc"
result verify_output "$(printf '%s' "$verify" | json_string)"
systemctl daemon-reload
result exposure "$(systemd-analyze security sandboxd --no-pager 2>/dev/null | tail -1 | grep -oE '[0-9]+\.[0-9]+' | head -1)"

systemctl start sandboxd; result start_rc $?
result state_after_start "\"$(systemctl show -P ActiveState sandboxd)\""
result substate_after_start "\"$(systemctl show -P SubState sandboxd)\""
result pools_after_start "$(sandboxd --config /etc/sandboxd/sandboxd.toml get pools -o json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))')"
deadline=$((SECONDS + 30))
while (( SECONDS < deadline )); do   # poll with a deadline until the pool is full
  ready=$(sandboxd --config /etc/sandboxd/sandboxd.toml get pools -o json |
          python3 -c 'import json,sys; print(sum(p["ready"] for p in json.load(sys.stdin)))')
  [[ $ready -ge 2 ]] && break; sleep 0.1
done
result ready_before_stop "$ready"
result agents_before_stop "$(pgrep -fc "$AGENTS" || true)"
result agent_uids "$(ps -o uid= -p "$(pgrep -f "$AGENTS" | paste -sd,)" | python3 -c 'import json,sys; print(json.dumps(sorted({int(x) for x in sys.stdin.read().split()})))')"
result security "$(status_json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["daemon"]["security"]["local"]))')"

start=$(date +%s.%N)
systemctl stop sandboxd; result stop_rc $?
result stop_seconds "$(printf "%.3f" "$(echo "$(date +%s.%N) - $start" | bc)")"
result state_after_stop "\"$(systemctl show -P ActiveState sandboxd)\""
result result_after_stop "\"$(systemctl show -P Result sandboxd)\""
result agents_after_stop "$(pgrep -fc "$AGENTS" || true)"
journalctl -u sandboxd -o cat --no-pager > /var/lib/journal-copy.txt
result journal "$(python3 -c 'import json; print(json.dumps(open("/var/lib/journal-copy.txt").read()))')"
