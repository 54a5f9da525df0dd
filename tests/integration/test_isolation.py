"""A local sandbox is a security boundary: what code inside can see and do, tried as an
attacker would (issue: sandbox code was host root, could write sysctls, replace the control
socket, leak into the next tenant, exhaust the host, and reach the host's loopback)."""

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from sandboxd.client.connections import UnreachableSandbox, connect, trusted_socket
from sandboxd.config import LocalProviderConfig
from sandboxd.providers import CreateError, IsolationError
from sandboxd.providers.local import netfilter
from sandboxd.providers.local.agentclient import AgentClient
from sandboxd.providers.local.provider import LocalProvider
from sandboxd.spec import PoolSpec

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids need a root daemon")


def provider_for(root: Path, **config) -> LocalProvider:
    return LocalProvider(LocalProviderConfig(workspace_root=root, **config))


@pytest.fixture
async def boxes(tmp_path):
    """Creates sandboxes on one provider; terminates them and checks nothing is left."""
    provider = provider_for(tmp_path / "sandboxes")
    made: list[str] = []

    async def make(sandbox_id: str = "sb-iso", **pool) -> tuple[dict, AgentClient]:
        spec = PoolSpec(name="iso", **{"env": {"GREETING": "hi"}, **pool})
        handle = await provider.create(sandbox_id, spec)
        made.append(sandbox_id)
        return handle, AgentClient(handle["socket"])

    make.provider = provider
    try:
        yield make
    finally:
        for sandbox_id in made:
            await provider.terminate(sandbox_id, {})
            assert not await provider.is_alive(sandbox_id, {})
            assert not (tmp_path / "sandboxes" / sandbox_id).exists()


async def run(client: AgentClient, script: str, timeout: float = 20) -> str:
    result = await client.exec(["sh", "-c", script], timeout=timeout)
    return (result.stdout + result.stderr).decode().strip()


@needs_bwrap
async def test_only_loopback_own_hostname_own_pid_1(boxes):
    handle, client = await boxes()
    assert handle["isolation"].startswith("bwrap")
    interfaces = await run(client, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    assert interfaces.split() == ["lo"]
    assert await run(client, "hostname") == "sb-iso"
    assert "agent.py" in await run(client, "cat /proc/1/cmdline | tr '\\0' ' '")
    pids = [int(p) for p in (await run(client, "ls /proc | grep -E '^[0-9]+$'")).split()]
    assert max(pids) < 100  # a fresh pid namespace, not the host's


@needs_bwrap
async def test_writes_only_in_the_sandboxs_own_tmpfs(boxes, tmp_path):
    _handle, client = await boxes()
    for path in ("/etc/x", "/usr/x", "/x", "/opt/sandboxd/x", "/dev/x"):
        result = await client.exec(["sh", "-c", f"echo > {path}"])
        assert result.exit_code != 0, path
        assert b"Read-only file system" in result.stderr
    assert await run(client, "echo a > /workspace/f && echo b > /tmp/g && cat /workspace/f") == "a"
    assert (await run(client, "cat /etc/shadow 2>&1")).startswith("cat: /etc/shadow")
    # The host's paths of the sandbox are nowhere in its view of the mounts.
    mounts = await run(client, "cat /proc/self/mountinfo")
    assert str(tmp_path) not in mounts and "/work" not in mounts.replace("/workspace", "")
    assert not any(p.name == "f" for p in (tmp_path / "sandboxes").rglob("*"))


@needs_bwrap
@needs_root
async def test_root_inside_unprivileged_uid_outside_one_per_sandbox(boxes):
    first, client = await boxes("sb-uid-a")
    second, _ = await boxes("sb-uid-b")
    assert (await run(client, "id -u")) == "0"
    uids = {psutil.Process(h["pid"]).uids().real for h in (first, second)}
    assert len(uids) == 2 and min(uids) >= 1_000_000_000  # unprivileged, one each
    # Every process of the sandbox, not only the agent, runs as that uid.
    await client.exec(["sh", "-c", "sleep 30 & echo started"], timeout=5)
    tree = [*psutil.Process(first["pid"]).children(recursive=True), psutil.Process(first["pid"])]
    assert {p.uids().real for p in tree} == {psutil.Process(first["pid"]).uids().real}


@needs_bwrap
@needs_root
async def test_host_kernel_settings_are_out_of_reach(boxes):
    _, client = await boxes()
    before = Path("/proc/sys/vm/stat_interval").read_text()
    out = await run(client, "echo 7 > /proc/sys/vm/stat_interval; echo rc=$?")
    assert "rc=0" not in out
    assert Path("/proc/sys/vm/stat_interval").read_text() == before
    assert await run(client, "test -w /proc/sys/kernel/core_pattern && echo W || echo RO") == "RO"
    status = await run(client, "grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status")
    fields = dict(line.split(":\t") for line in status.splitlines())
    assert fields == {"Seccomp": "2", "NoNewPrivs": "1", "CapEff": "0000000000000000"}


SYSCALL = """
import ctypes, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
numbers = {"keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
           "kexec_load": 246, "init_module": 175, "unshare": 272, "ptrace": 101,
           "io_uring_setup": 425, "socket": 41}
args = {"unshare": (0x10000000,), "ptrace": (16, 1, 0, 0),  # CLONE_NEWUSER; ATTACH to pid 1
        "io_uring_setup": (1, 0), "socket": (40, 1, 0)}  # AF_VSOCK
for name in sys.argv[1:]:
    rc = libc.syscall(numbers[name], *args.get(name, (0, 0, 0, 0)))
    print(name, errno.errorcode.get(ctypes.get_errno(), "OK") if rc < 0 else "OK")
"""


@needs_bwrap
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86-64's")
async def test_seccomp_denies_what_a_code_sandbox_never_needs_and_allows_per_pool(boxes):
    _, client = await boxes()
    names = ["keyctl", "bpf", "perf_event_open", "userfaultfd", "kexec_load", "init_module"]
    names += ["unshare", "ptrace", "io_uring_setup"]
    result = await client.exec(["python3", "-c", SYSCALL, *names, "socket"], timeout=20)
    answers = dict(line.split() for line in result.stdout.decode().splitlines())
    assert answers == {**dict.fromkeys(names, "EPERM"), "socket": "EAFNOSUPPORT"}
    # A pool opts in: keyctl is then the kernel's to answer (not the filter's EPERM).
    _, allowed = await boxes("sb-allow", security={"allow_syscalls": ["keyctl"]})
    result = await allowed.exec(["python3", "-c", SYSCALL, "keyctl", "bpf"], timeout=20)
    answers = dict(line.split() for line in result.stdout.decode().splitlines())
    assert answers["keyctl"] != "EPERM" and answers["bpf"] == "EPERM"


@needs_bwrap
async def test_the_control_socket_cannot_be_reached_replaced_or_symlinked(boxes):
    handle, client = await boxes()
    socket_path = Path(handle["socket"])
    # Nothing of the control path is inside: no socket to find, no env file to read.
    found = await run(
        client, "find / -xdev \\( -name 'agent.sock' -o -name env.json \\) 2>/dev/null"
    )
    assert found == ""
    # The agent is not dumpable: its descriptors and memory are not the tenant's to open.
    steal = (
        "import os\n"
        "for name in os.listdir('/proc/1/fd') + ['mem', 'environ']:\n"
        "    path = '/proc/1/' + (name if name in ('mem', 'environ') else 'fd/' + name)\n"
        "    try:\n"
        "        os.close(os.open(path, os.O_RDONLY)); print('OPENED', path)\n"
        "    except OSError as exc:\n"
        "        print('denied', path, exc.errno)\n"
    )
    stolen = await client.exec(["python3", "-c", steal], timeout=10)
    assert b"denied" in stolen.stdout and b"OPENED" not in stolen.stdout
    # Try to plant a replacement and a symlink wherever the old layout had them.
    attack = (
        "mkdir -p /run/sandboxd /workspace/run; "
        'python3 -c "import socket; s=socket.socket(socket.AF_UNIX);'
        " s.bind('/run/sandboxd/agent.sock')\"; "
        "ln -sf /var/run/docker.sock /workspace/run/agent.sock; echo done"
    )
    assert (await run(client, attack)).endswith("done")
    info = os.lstat(socket_path)
    assert stat.S_ISSOCK(info.st_mode) and info.st_uid == os.geteuid()
    assert stat.S_IMODE(os.lstat(socket_path.parent).st_mode) == 0o700
    assert (await client.ping())["ok"]  # still the daemon's own agent


@needs_bwrap
async def test_reset_leaves_nothing_of_the_last_tenant(boxes):
    provider = boxes.provider
    handle, client = await boxes("sb-reset", reuse="reset")
    # Every writable place inside, from the sandbox's own view of its mounts.
    writable = (
        await run(client, "awk '$6 ~ /^rw/ && $5 != \"/proc\" {print $5}' /proc/self/mountinfo")
    ).split()
    assert {"/workspace", "/tmp", "/dev/shm", "/run"} <= set(writable)
    plant = "; ".join(f"echo secret > {p}/marker-$$" for p in writable)
    await run(client, f"{plant}; (setsid sleep 300 > /dev/null 2>&1 &) ; echo planted")
    assert "marker" in await run(client, "ls /dev/shm /tmp")
    await provider.reset("sb-reset", handle, PoolSpec(name="iso", reuse="reset"))
    leftovers = await run(client, f"ls -a {' '.join(writable)} | grep marker; ps -e -o comm=")
    assert "marker" not in leftovers
    assert "sleep" not in leftovers
    assert (await client.ping())["ok"]


@needs_bwrap
@needs_root
async def test_a_fork_bomb_stops_at_pids_max(boxes):
    _handle, client = await boxes(pids_max=64)
    bomb = (
        "import subprocess\n"
        "procs = []\n"
        "try:\n"
        "    for _ in range(3000):\n"
        "        procs.append(subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL))\n"
        "except OSError as exc:\n"
        "    print('stopped', len(procs), exc.errno)\n"
        "for proc in procs:\n"
        "    proc.kill()\n"
    )
    result = await client.exec(["python3", "-c", bomb], timeout=60)
    out = result.stdout.decode()
    assert out.startswith("stopped"), out
    assert int(out.split()[1]) < 64
    assert (await client.ping())["ok"]  # the agent itself survives its tenant's bomb


@needs_bwrap
@needs_root
async def test_memory_is_limited_for_the_whole_tree(boxes):
    _handle, client = await boxes(memory_mb=128)
    hog = (
        "python3 -c 'import time; b = bytearray(100 << 20);"
        ' b[::4096] = b"x" * len(b[::4096]); time.sleep(1)\''
    )
    # Two hogs at a time: together over the limit, and each grows past the agent's own
    # size before they reach it (six at once could each stay smaller than the agent, and
    # the OOM killer takes the biggest process of the cgroup: then the agent).
    out = await run(client, f"for i in 1 2 3; do {hog} & {hog} & wait; done; echo all-done", 60)
    assert "all-done" in out
    peak = boxes.provider._cgroups.memory_peak("sb-iso")
    assert peak is not None and peak <= 128 * 1024 * 1024


@needs_bwrap
async def test_tmpfs_writes_stop_at_disk_mb(boxes):
    _, client = await boxes(disk_mb=8, memory_mb=256)
    for path in ("/dev/shm", "/workspace", "/tmp"):
        out = await run(
            client, f"dd if=/dev/zero of={path}/big bs=1M count=20 2>&1; rm -f {path}/big"
        )
        assert "No space left on device" in out, path


async def test_host_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        provider = provider_for(tmp_path / "sandboxes", allow_weaker_isolation=True)
        handle = await provider.create("sb-private", PoolSpec(name="p", env={"SECRET": "s3"}))
    finally:
        os.umask(old)
    try:
        root = tmp_path / "sandboxes"
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        box = root / "sb-private"
        for path in box.iterdir():
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            assert mode & 0o077 == 0 or path.name == "work", (path, oct(mode))
        assert not any("s3" in p.read_text(errors="ignore") for p in box.iterdir() if p.is_file())
    finally:
        await provider.terminate("sb-private", handle)


async def test_a_forged_handle_never_makes_the_provider_kill_or_delete(tmp_path):
    provider = provider_for(tmp_path / "sandboxes", allow_weaker_isolation=True)
    victim = subprocess.Popen(["sleep", "60"])
    precious = tmp_path / "precious"
    precious.mkdir()
    try:
        forged = {
            "pid": victim.pid,
            "create_time": psutil.Process(victim.pid).create_time(),
            "dir": str(tmp_path),
            "socket": "/var/run/docker.sock",
        }
        for sandbox_id in ("sb-forged", "../precious", "..", "sb-forged/../../precious"):
            await provider.terminate(sandbox_id, forged)
            await provider.kill(sandbox_id, forged)
            assert not await provider.is_alive(sandbox_id, forged)
        assert victim.poll() is None
        assert precious.is_dir()
        # A symlink planted under the registry root is not followed either.
        (tmp_path / "sandboxes" / "sb-link").symlink_to(precious)
        await provider.terminate("sb-link", forged)
        assert precious.is_dir()
        assert await provider.cleanup_leftovers(set()) == []
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"bwrap_path": "/nonexistent/bwrap"}, "no bubblewrap"),
        ({"disable": ["userns"]}, "user namespaces switched off"),
        ({"disable": ["seccomp"]}, "no seccomp filter"),
        ({"disable": ["cgroups"]}, "cgroup limits switched off"),
    ],
)
async def test_weaker_isolation_is_refused_unless_allowed(tmp_path, config, says):
    with pytest.raises(IsolationError, match="allow_weaker_isolation"):
        provider_for(tmp_path / "a", **config)
    provider = provider_for(tmp_path / "b", allow_weaker_isolation=True, **config)
    assert any(says in w for w in provider.security_summary()["weaknesses"])


async def test_agent_exec_env_files_and_timeout_without_bubblewrap(tmp_path):
    # Without bubblewrap the sandbox uid works in a host directory: every parent of the
    # registry must let it pass (pytest's own temporary directories are 0700).
    base = Path(tempfile.mkdtemp(prefix="sandboxd-plain-"))
    base.chmod(0o711)
    provider = provider_for(base / "sandboxes", isolation="none", allow_weaker_isolation=True)
    handle = await provider.create("sb-plain", PoolSpec(name="p", env={"GREETING": "hi"}))
    client = AgentClient(handle["socket"])
    try:
        assert (await client.ping())["ok"]
        assert await run(client, "echo $GREETING $SANDBOX_ID") == "hi sb-plain"
        result = await client.exec(["python3", "-c", "print(6*7)"])
        assert (result.exit_code, result.stdout) == (0, b"42\n")
        assert (await client.exec("exit 3")).exit_code == 3
        slow = await client.exec(["sleep", "30"], timeout=0.2)
        assert slow.timed_out and slow.exit_code != 0
        home = await run(client, "echo $HOME")
        await client.write(f"{home}/data.bin", b"\x00\x01payload")
        assert await client.read(f"{home}/data.bin") == b"\x00\x01payload"
        assert (await client.exec("cat", stdin=b"piped")).stdout == b"piped"
        if os.geteuid() == 0:
            assert await run(client, "id -u") != "0"  # never host root, even without bwrap
    finally:
        await provider.terminate("sb-plain", handle)
        shutil.rmtree(base)


@needs_bwrap
async def test_agent_exec_env_files_and_timeout(boxes):
    _, client = await boxes()
    assert await run(client, "echo $GREETING $SANDBOX_ID") == "hi sb-iso"
    streamed: list[bytes] = []
    result = await client.exec(["python3", "-c", "print(6*7)"], on_stdout=streamed.append)
    assert (result.exit_code, result.stdout, b"".join(streamed)) == (0, b"42\n", b"42\n")
    await client.write("/workspace/data.bin", b"\x00\x01payload")
    assert await client.read("/workspace/data.bin") == b"\x00\x01payload"
    assert (await client.exec("cat", stdin=b"piped")).stdout == b"piped"


@contextlib.contextmanager
def loopback_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("CONNECTED")
except OSError as exc:
    print("refused", exc.errno)
"""


@needs_bwrap
@needs_root
@pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="slirp4netns not installed")
async def test_networked_sandbox_has_its_own_namespace_without_host_loopback(boxes):
    handle, client = await boxes(network=True)
    assert handle["network"].startswith("slirp4netns")
    assert "tap0" in await run(client, "cat /proc/net/dev")
    with loopback_listener() as port:
        for host in ("127.0.0.1", "10.0.2.2"):
            out = await run(client, f"python3 -c '{CONNECT}' {host} {port}")
            assert out.startswith("refused"), (host, out)


NETWORK_MARKS = (
    needs_bwrap,
    needs_root,
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 not installed"),
    pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="slirp4netns not installed"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nftables not installed"),
)


def needs_network(test):
    for mark in NETWORK_MARKS:
        test = mark(test)
    return test


_networks = iter(range(1_000_000))


@contextlib.contextmanager
def own_network(outer: str, inner: str, port: int):
    """A network namespace of the test's own, joined to the host by a veth pair (`outer` on
    the host's side, so for the test's length it is one of the host's addresses), with a
    server on `inner` that sends one greeting. Never the internet."""
    n = next(_networks)
    netns, veth = f"sbd-net-{os.getpid()}-{n}", f"sbdv{os.getpid() % 10000}x{n}"
    setup = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", "inner", "netns", netns],
        ["ip", "addr", "add", f"{outer}/30", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", netns, "addr", "add", f"{inner}/30", "dev", "inner"],
        ["ip", "-n", netns, "link", "set", "inner", "up"],
    ]
    try:
        for cmd in setup:
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                pytest.skip(f"cannot make a test network namespace: {' '.join(cmd)}")
        server = subprocess.Popen(
            [
                *("ip", "netns", "exec", netns, "python3", "-c"),
                "import socket, sys; s=socket.socket(); s.bind((sys.argv[1], int(sys.argv[2])));"
                "s.listen(); print('up', flush=True); c,_=s.accept();"
                "c.sendall(b'hello from the test network')",
                inner,
                str(port),
            ],
            stdout=subprocess.PIPE,
        )
        with server.stdout:
            assert server.stdout.readline().strip() == b"up"
        try:
            yield
        finally:
            server.kill()
            server.wait(5)
    finally:
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", veth], capture_output=True)


GREETING = (
    'python3 -c "import socket, sys; s=socket.create_connection((sys.argv[1], 8765), 5);'
    ' print(s.recv(100).decode())" '
)


@needs_network
async def test_networked_sandbox_reaches_a_server_outside_the_host_loopback(boxes):
    """Egress, tried against a server the test runs in a network namespace of its own
    (never the internet): 198.18.0.2 exists only inside that namespace."""
    with own_network("198.18.0.1", "198.18.0.2", 8765):
        _, client = await boxes(network=True)
        assert await run(client, GREETING + "198.18.0.2") == "hello from the test network"


CONNECT_EACH = """
import socket, sys, time
port = int(sys.argv[1])
for host in sys.argv[2:]:
    started = time.monotonic()
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(3)
    try:
        s.connect((host, port))
        print(host, "CONNECTED")
    except OSError as exc:
        print(host, "refused", exc.errno, round(time.monotonic() - started, 2))
    finally:
        s.close()
"""


def host_addresses() -> list[str]:
    """The host's own addresses but loopback (IPv6 link-local ones need a scope: left out)."""
    found = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(addr.address.split("%")[0])
            if not ip.is_loopback and not ip.is_link_local:
                found.append(str(ip))
    return found


def assert_all_refused(out: str, hosts: list[str]) -> None:
    """Every host refused at once (reset or unreachable), none connected, none hung."""
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert set(lines) == set(hosts), out
    for host, result in lines.items():
        words = result.split()
        assert words[0] == "refused" and words[1] != "None", (host, result)
        assert float(words[2]) < 2, (host, result)


@contextlib.contextmanager
def host_listener():
    """A TCP listener on every address of the host (0.0.0.0), as a careless service has."""
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen()
        yield server.getsockname()[1]


@needs_network
async def test_networked_sandbox_reaches_no_address_of_the_host_nor_link_local(boxes):
    """The red team's finding: slirp4netns connects from the host's stack, so a sandbox
    reached services on the host's own non-loopback addresses (and would reach cloud
    metadata on 169.254.169.254). The egress filter refuses them at once, the sandbox's
    root cannot remove it, and an address the host gains later is refused after the
    sandbox's next probe."""
    hosts = host_addresses()
    if not [h for h in hosts if ":" not in h]:
        pytest.skip("the host has no IPv4 address besides loopback to try")
    handle, client = await boxes(network=True)
    targets = [*hosts, "10.0.2.2", "169.254.169.254"]
    with host_listener() as port:
        out = await run(client, f"python3 -c '{CONNECT_EACH}' {port} {' '.join(targets)}")
        assert_all_refused(out, targets)
        # Root inside has no capability over its network namespace: the rules stay.
        for attempt in (
            "/usr/sbin/nft flush ruleset",
            "/usr/sbin/nft delete table inet sandboxd",
            "/usr/sbin/iptables -F",
            "ip route del default",
            "ip link set tap0 down",
        ):
            name = attempt.split()[0]
            out = await run(
                client, f"command -v {name} >/dev/null || exit 0; {attempt}; echo rc=$?"
            )
            if out:  # installed, so tried
                assert "Operation not permitted" in out and "rc=0" not in out, (attempt, out)
        out = await run(client, f"python3 -c '{CONNECT_EACH}' {port} {hosts[0]}")
        assert_all_refused(out, [hosts[0]])
        # An address the host gains later (its side of a test veth pair): refused once the
        # sandbox is probed.
        with own_network("198.18.7.1", "198.18.7.2", 8765):
            await boxes.provider.probe("sb-iso", handle, None, 0)
            out = await run(client, f"python3 -c '{CONNECT_EACH}' {port} 198.18.7.1")
            assert_all_refused(out, ["198.18.7.1"])


@needs_network
async def test_networked_sandbox_reaches_private_ranges_only_if_its_pool_allows(boxes):
    """Other hosts of the host's private networks (here a namespace of the test's own on
    10.213.0.2) are refused by default, reachable with `network_private: true`."""
    with own_network("10.213.0.1", "10.213.0.2", 8765):
        _, closed = await boxes("sb-closed", network=True)
        out = await run(closed, f"python3 -c '{CONNECT_EACH}' 8765 10.213.0.2")
        assert_all_refused(out, ["10.213.0.2"])
        _, private = await boxes("sb-private", network=True, network_private=True)
        assert await run(private, GREETING + "10.213.0.2") == "hello from the test network"


@needs_network
async def test_no_networked_sandbox_without_its_egress_filter(boxes, monkeypatch, tmp_path):
    monkeypatch.setattr(netfilter, "NFT", "sandboxd-no-such-nft")
    with pytest.raises(CreateError, match="egress filter"):
        await boxes("sb-unfiltered", network=True)
    assert await boxes.provider.list_sandboxes() == []
    assert not (tmp_path / "sandboxes" / "sb-unfiltered").exists()


def test_seccomp_allowances_are_checked_in_the_spec():
    with pytest.raises(ValueError, match="nothing to allow"):
        PoolSpec(name="p", security={"allow_syscalls": ["read"]})
    assert PoolSpec(name="p", security={"allow_syscalls": ["ptrace"]}).security.allow_syscalls


async def test_registry_survives_a_new_provider_and_lists_only_its_own(boxes, tmp_path):
    handle, _ = await boxes("sb-adopt")
    again = provider_for(tmp_path / "sandboxes")
    listed = {sb.id: sb for sb in await again.list_sandboxes()}
    assert set(listed) == {"sb-adopt"} and listed["sb-adopt"].handle["pid"] == handle["pid"]
    meta = json.loads((tmp_path / "sandboxes" / "sb-adopt" / "meta.json").read_text())
    assert meta["uid"] == handle["uid"]
    await asyncio.sleep(0)


async def test_clients_refuse_a_socket_a_record_names_unless_it_is_sandboxds(boxes, tmp_path):
    handle, _ = await boxes("sb-client")
    other, _ = await boxes("sb-other")
    assert trusted_socket(handle["socket"], "sb-client") == handle["socket"]
    # A record of sb-client naming sb-other's (real, root-owned) socket: refused, or the
    # client's command and secrets would run in the other tenant's sandbox.
    with pytest.raises(UnreachableSandbox):
        connect("local", {"socket": other["socket"]}, sandbox_id="sb-client")
    elsewhere = tmp_path / "open"
    elsewhere.mkdir(mode=0o777)
    elsewhere.chmod(0o777)
    planted = elsewhere / "agent.sock"
    with socket.socket(socket.AF_UNIX) as rogue:
        rogue.bind(str(planted))
        link = tmp_path / "agent.sock"
        link.symlink_to(handle["socket"])
        for path in (str(planted), str(link), "/etc/passwd", "relative/agent.sock", None):
            with pytest.raises(UnreachableSandbox):
                connect("local", {"socket": path}, sandbox_id="sb-client")


async def test_a_reused_launcher_pid_is_never_killed(boxes):
    """The sandbox's launcher exits with it; its pid may then belong to anything. The
    registry's start time decides, so a process that got that pid survives a terminate."""
    handle, _ = await boxes("sb-reuse")
    victim = subprocess.Popen(["sleep", "60"])
    try:
        meta = boxes.provider.root / "sb-reuse" / "meta.json"
        entry = json.loads(meta.read_text())
        entry["launcher_pid"] = victim.pid  # as if the kernel handed the pid out again
        meta.write_text(json.dumps(entry))
        await boxes.provider.kill("sb-reuse", handle)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@needs_bwrap
@needs_root
async def test_another_registry_never_touches_this_ones_sandboxes_or_cgroups(boxes, tmp_path):
    handle, client = await boxes("sb-mine")
    mine = boxes.provider
    other = provider_for(tmp_path / "elsewhere", cgroup_name=mine._config.cgroup_group())
    await other.terminate("sb-mine", handle)  # as a forged lease in the other's Redis would
    await other.kill("sb-mine", handle)
    assert await mine.is_alive("sb-mine", handle) and (await client.ping())["ok"]
    assert mine._cgroups is not None and mine._cgroups.exists("sb-mine")
    # By default two registries get different uid ranges and cgroups.
    defaults = provider_for(tmp_path / "third")
    assert defaults._config.first_uid() != mine._config.first_uid()
    assert defaults._config.cgroup_group() != mine._config.cgroup_group()
