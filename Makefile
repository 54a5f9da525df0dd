# sandboxd — the two commands: `make run` (daemon with embedded defaults) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUN    := .run
REDIS_URL ?= redis://127.0.0.1:6379/0
PREFIX_DIR ?= /opt/sandboxd

.PHONY: run test lint format bench install-service clean host-packages

# What the local sandboxes' protections need from the host (see docs/security.md), and what
# the suite runs against. Installed with apt when missing and we are root on Debian.
RUN_PACKAGES  := bubblewrap slirp4netns nftables libseccomp2 util-linux
TEST_PACKAGES := $(RUN_PACKAGES) redis-server redis-tools mosquitto mosquitto-clients bc \
                 systemd iproute2 redis-sentinel

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,local-redis,e2b,mqtt,api]'
	touch $(STAMP)

## run: venv, a local Redis if none answers, the example spec, the daemon in the foreground
## and `sandboxd api` (E2B's REST API on api_listen, 127.0.0.1:3000) beside it
run: export SANDBOXD_REDIS_URL ?= $(REDIS_URL)
run: $(STAMP)
	@$(MAKE) --no-print-directory host-packages PACKAGES="$(RUN_PACKAGES)"
	$(BIN)/python -m sandboxd.store.localredis ensure --url $(SANDBOXD_REDIS_URL) --dir $(RUN)/redis
	SANDBOXD_LOCAL__WORKSPACE_ROOT=$(CURDIR)/$(RUN)/sandboxes $(BIN)/sandboxd --config config/sandboxd.toml apply -f config/spec.example.yaml
	$(BIN)/sandboxd --config config/sandboxd.toml api & api=$$!; trap 'kill $$api 2>/dev/null' EXIT; \
	  SANDBOXD_LOCAL__WORKSPACE_ROOT=$(CURDIR)/$(RUN)/sandboxes $(BIN)/sandboxd --config config/sandboxd.toml run

## test: the whole suite (unit, integration with real redis-server and sandboxes, systemd)
test: $(STAMP)
	@$(MAKE) --no-print-directory host-packages PACKAGES="$(TEST_PACKAGES)"
	$(BIN)/ruff check daemon tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -p no:cacheprovider

## host-packages: apt-get install the Debian packages in PACKAGES that are not installed
host-packages:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | \
	  grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:" $$missing; apt-get update -q >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages:" $$missing "(run as root, or apt install them)"; fi; \
	fi

## lint: style, the import layers (pyproject's [tool.importlinter]) and types (mypy)
lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format daemon tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.create && $(BIN)/python -m bench.claim

## install-service: package into $(PREFIX_DIR), config into /etc/sandboxd, the unit into systemd
## (ordered after the local Redis unit: REDIS_UNIT=redis.service, default found; none: remote)
REDIS_UNIT ?=
install-service:
	$(PYTHON) -m venv $(PREFIX_DIR)
	$(PREFIX_DIR)/bin/pip install --quiet '.[api]'
	install -d -m 0755 /etc/sandboxd /var/lib/sandboxd
	install -d -m 0700 /etc/sandboxd/credentials
	for c in e2b-api-key redis-password; do \
	  test -f /etc/sandboxd/credentials/$$c || install -m 0600 /dev/null /etc/sandboxd/credentials/$$c; done
	test -f /etc/sandboxd/sandboxd.toml || install -m 0644 config/sandboxd.toml /etc/sandboxd/sandboxd.toml
	install -m 0644 config/spec.example.yaml /etc/sandboxd/spec.example.yaml
	install -m 0644 systemd/sandboxd.service /etc/systemd/system/sandboxd.service
	install -m 0644 systemd/sandboxd@.service /etc/systemd/system/sandboxd@.service
	install -m 0644 systemd/sandboxd-api.service /etc/systemd/system/sandboxd-api.service
	sh systemd/after-redis.sh "$(REDIS_UNIT)"
	ln -sf $(PREFIX_DIR)/bin/sandboxd /usr/local/bin/sandboxd
	systemctl daemon-reload
	@echo "installed; start with: systemctl enable --now sandboxd"
	@echo "  (or, with a hot standby: systemctl enable --now sandboxd@a sandboxd@b)"
	@echo "  E2B's API for E2B SDK programs: systemctl enable --now sandboxd-api"

clean:
	rm -rf $(VENV) $(RUN) build *.egg-info
