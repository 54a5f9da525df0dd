# Sourced by the lab scripts: installs the real unit the way `make install-service` does.
# Args of the caller: CHECKOUT REDIS_URL. Defines result() for `RESULT <json>` lines.
result() { printf 'RESULT {"%s": %s}\n' "$1" "$2"; }
json_string() { python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'; }

ln -sf "$CHECKOUT/.venv/bin/sandboxd" /usr/local/bin/sandboxd
install -D -m 0644 "$CHECKOUT/systemd/sandboxd.service" /etc/systemd/system/sandboxd.service
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
if (( ${#hidden[@]} )); then
  mkdir -p /etc/systemd/system/sandboxd.service.d
  printf '[Service]\nProtectHome=tmpfs\nBindReadOnlyPaths=%s\n' "${hidden[*]}" \
    > /etc/systemd/system/sandboxd.service.d/hidden-paths.conf
fi
write_config() {  # extra TOML lines as arguments
  mkdir -p /etc/sandboxd
  { printf 'redis_url = "%s"\n' "$REDIS_URL"; printf '%s\n' "$@"
    printf '[local]\nworkspace_root = "/var/lib/sandboxd/sandboxes"\n'; } > /etc/sandboxd/sandboxd.toml
}
status_json() { sandboxd --config /etc/sandboxd/sandboxd.toml status -o json; }
