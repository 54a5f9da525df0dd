"""Processes the tests run: the real daemon, mosquitto; finding a test's sandboxes; ports."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

E2B_TEST_KEY = "e2b_0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DaemonProcess:
    """The real daemon (`python -m sandboxd run`) in its own process."""

    config_path: Path
    workspace: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log_path: Path = field(default_factory=Path)

    def start(self) -> "DaemonProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "--config", str(self.config_path), "run"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.log.close()
            return self.proc.returncode if self.proc else None
        self.signal(signal.SIGTERM)
        return self.wait()

    def logs(self) -> list[dict]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def sandbox_processes(workspace: Path) -> list[psutil.Process]:
    """Live sandbox agents of the sandboxes registered under `workspace` (i.e. of one test):
    found by their cgroup (`sandbox-<id>`) or by the pid their registry entry recorded."""
    ids = {p.name for p in workspace.iterdir() if p.is_dir()} if workspace.is_dir() else set()
    pids = set()
    for sandbox_id in ids:
        with contextlib.suppress(OSError, ValueError):
            pids.add(json.loads((workspace / sandbox_id / "meta.json").read_text()).get("pid"))
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if not (any("agent.py" in part for part in cmdline) and "--listen-fd" in cmdline):
            continue
        if "bwrap" in cmdline[0]:  # bubblewrap names the agent in its own arguments
            continue
        if proc.pid in pids or _cgroup_id(proc.pid) in ids:
            found.append(proc)
    return found


def _cgroup_id(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            name = line.rsplit("/", 1)[-1]
            if name.startswith("sandbox-"):
                return name.removeprefix("sandbox-")
    return None


def toml_config(config: dict, local: dict) -> str:
    return _toml_table({**config, "local": local}, "")


def _toml_table(table: dict, name: str) -> str:
    """Scalars first, then each nested table as its own [section]."""
    scalars = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    text = (f"[{name}]\n" if name else "") + "".join(line + "\n" for line in scalars)
    for key, value in table.items():
        if isinstance(value, dict):
            text += _toml_table(value, f"{name}.{key}" if name else key)
    return text


@dataclass
class Broker:
    """A real mosquitto on a free loopback port; persistent, so sessions survive a restart."""

    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.directory}/\nlog_dest stderr\n"
            # As root, stay root: the test's directory is private to this user.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        with open(self.directory / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # poll with a deadline until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
