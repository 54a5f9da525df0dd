# Sourced by the lab scripts: installs the real unit and its template (sandboxd@.service)
# the way `make install-service` does.
# Args of the caller: CHECKOUT REDIS_URL. Defines result() for `RESULT <json>` lines.
result() { printf 'RESULT {"%s": %s}\n' "$1" "$2"; }
json_string() { python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'; }

ln -sf "$CHECKOUT/.venv/bin/sandboxd" /usr/local/bin/sandboxd
install -D -m 0644 "$CHECKOUT/systemd/sandboxd.service" /etc/systemd/system/sandboxd.service
install -D -m 0644 "$CHECKOUT/systemd/sandboxd@.service" /etc/systemd/system/sandboxd@.service
install -d -m 0700 /etc/sandboxd/credentials
install -m 0600 /dev/null /etc/sandboxd/credentials/e2b-api-key
install -m 0600 /dev/null /etc/sandboxd/credentials/redis-password
# ProtectHome= hides /root and /home, PrivateTmp= the host's /tmp: a checkout or a Python
# (pyenv) living there must be shown to the service again, read-only.
PYHOME=$(dirname "$(dirname "$(readlink -f "$CHECKOUT/.venv/bin/python")")")
hidden=()
for path in "$PYHOME" "$CHECKOUT"; do
  case $path in /root/*|/home/*|/tmp/*|/var/tmp/*) hidden+=("$path");; esac
done
lab_dropin() {  # lab_dropin NAME LINES...: the same drop-in for the unit and the template
  local unit
  for unit in sandboxd.service sandboxd@.service; do
    mkdir -p "/etc/systemd/system/$unit.d"
    printf '%s\n' '[Service]' "${@:2}" > "/etc/systemd/system/$unit.d/$1.conf"
  done
}
# The checkout's code, also when its .venv is another checkout's (a git worktree sharing
# one venv): the same directory the venv's editable install names in a plain checkout.
export PYTHONPATH="$CHECKOUT/daemon"
lab_dropin checkout-code "Environment=PYTHONPATH=$CHECKOUT/daemon"
if (( ${#hidden[@]} )); then
  lab_dropin hidden-paths ProtectHome=tmpfs "BindReadOnlyPaths=${hidden[*]}"
fi
# The lab's own /sys/fs/cgroup is a cgroup2 mount without controllers when the host is
# cgroup v1 hybrid (the CI machine): show the service the host's v1 pids, memory and cpu
# hierarchies, as the host's own systemd would, so that its sandboxes get their limits.
CGROUP_ROOT=/sys/fs/cgroup
if ! grep -qsw pids /sys/fs/cgroup/cgroup.controllers && grep -qw pids /proc/cgroups; then
  CGROUP_ROOT=/run/sandboxd-lab-cgroup
  for c in pids memory cpu; do
    mkdir -p "$CGROUP_ROOT/$c"
    mountpoint -q "$CGROUP_ROOT/$c" || mount -t cgroup -o "$c" cgroup "$CGROUP_ROOT/$c"
  done
  lab_dropin lab-cgroup-v1 "ReadWritePaths=$CGROUP_ROOT"
fi
AGENTS='^[^ ]*python3[^ ]* -I -S /opt/sandboxd/agent.py'
write_config() {  # extra TOML lines as arguments
  mkdir -p /etc/sandboxd
  { printf 'redis_url = "%s"\n' "$REDIS_URL"; printf '%s\n' "$@"
    printf '[local]\nworkspace_root = "/var/lib/sandboxd/sandboxes"\ncgroup_root = "%s"\n' \
      "$CGROUP_ROOT"; } > /etc/sandboxd/sandboxd.toml
}
status_json() { sandboxd --config /etc/sandboxd/sandboxd.toml status -o json; }
