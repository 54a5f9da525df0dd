# Sourced by the lab scripts: installs the real unit the way `make install-service` does.
# Args of the caller: CHECKOUT REDIS_URL. Defines result() for `RESULT <json>` lines.
result() { printf 'RESULT {"%s": %s}\n' "$1" "$2"; }
json_string() { python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'; }

ln -sf "$CHECKOUT/.venv/bin/sandboxd" /usr/local/bin/sandboxd
install -D -m 0644 "$CHECKOUT/systemd/sandboxd.service" /etc/systemd/system/sandboxd.service
install -d -m 0700 /etc/sandboxd/credentials
install -m 0600 /dev/null /etc/sandboxd/credentials/e2b-api-key
install -m 0600 /dev/null /etc/sandboxd/credentials/redis-password
# ProtectHome= hides /root and /home: a Python installed there (pyenv) must be shown again.
PYHOME=$(dirname "$(dirname "$(readlink -f "$CHECKOUT/.venv/bin/python")")")
case $PYHOME in /root/*|/home/*)
  mkdir -p /etc/systemd/system/sandboxd.service.d
  printf '[Service]\nProtectHome=tmpfs\nBindReadOnlyPaths=%s\n' "$PYHOME" \
    > /etc/systemd/system/sandboxd.service.d/python-home.conf;;
esac
write_config() {  # extra TOML lines as arguments
  mkdir -p /etc/sandboxd
  { printf 'redis_url = "%s"\n' "$REDIS_URL"; printf '%s\n' "$@"
    printf '[local]\nworkspace_root = "/var/lib/sandboxd/sandboxes"\n'; } > /etc/sandboxd/sandboxd.toml
}
status_json() { sandboxd --config /etc/sandboxd/sandboxd.toml status -o json; }
