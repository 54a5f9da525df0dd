"""The egress filter of a `network: true` local sandbox: nftables rules in the sandbox's own
network namespace, installed by the root daemon before slirp4netns gives that namespace a
way out, so never a moment with a route and no filter.

slirp4netns makes the sandbox's connections from the host's own network stack and has no
destination filter; `--disable-host-loopback` covers 127.0.0.0/8 only. So the filter refuses,
on the way out of the sandbox (its output hook), connections to:

- every address of the host itself (read when the sandbox starts, and again at each health
  probe: an address added later is added to every sandbox's filter then), and their
  broadcast addresses;
- loopback, unspecified, link-local (169.254.0.0/16: cloud metadata services), multicast and
  reserved ranges, IPv4-mapped IPv6;
- slirp's own network 10.0.2.0/24 (10.0.2.2 is the host), except DNS (10.0.2.3 port 53);
- unless the pool sets `network_private: true`, private ranges: RFC 1918, shared
  100.64.0.0/10 (carrier-grade NAT, tailnets) and IPv6 unique-local fc00::/7.

The sandbox cannot change the rules: it has no capabilities (bubblewrap drops them all, with
no new privileges) in the user namespace that owns its network namespace; a nested user
namespace (`security.nested_userns`) gets capabilities only over namespaces it makes itself,
which have no way out. A refused TCP connection is reset at once; anything else gets an ICMP
"administratively prohibited" (EHOSTUNREACH), never a silent drop that would hang.
"""

import asyncio
import ipaddress
import os
import shutil
import socket
from collections.abc import Iterable

import psutil

TABLE = "sandboxd"
SLIRP_NETWORK = "10.0.2.0/24"
SLIRP_DNS = "10.0.2.3"
# Never reachable from a networked sandbox, whatever the pool says.
ALWAYS_V4 = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/3",  # multicast, reserved, limited broadcast
)
ALWAYS_V6 = ("::/127", "::ffff:0:0/96", "fe80::/10", "ff00::/8")
# Other hosts of the host's networks: refused unless the pool sets `network_private: true`.
PRIVATE_V4 = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16")
PRIVATE_V6 = ("fc00::/7",)
TIMEOUT_S = 10.0
NFT = "nft"  # found on the PATH at each use


class FilterError(Exception):
    """The filter could not be installed or updated; `missing`: this host lacks nft."""

    def __init__(self, message: str, *, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def host_addresses() -> tuple[frozenset[str], frozenset[str]]:
    """The host's own IPv4 and IPv6 addresses (every interface, broadcast addresses too)."""
    v4: set[str] = set()
    v6: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET:
                for text in (addr.address, addr.broadcast):
                    if text:
                        v4.add(str(ipaddress.IPv4Address(text)))
            elif addr.family == socket.AF_INET6 and addr.address:
                v6.add(str(ipaddress.IPv6Address(addr.address.split("%", 1)[0])))
    return frozenset(v4), frozenset(v6)


def _elements(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def _set_elements(kind: str, values: frozenset[str]) -> str:
    return f"add element inet {TABLE} {kind} {{ {_elements(values)} }}\n" if values else ""


def ruleset(
    addresses: tuple[frozenset[str], frozenset[str]], *, allow_private: bool = False
) -> str:
    """The whole table, for `nft -f -` (it replaces any table of that name)."""
    v4, v6 = addresses
    private = (
        ""
        if allow_private
        else f"        ip daddr {{ {_elements(PRIVATE_V4)} }} jump refuse\n"
        f"        ip6 daddr {{ {_elements(PRIVATE_V6)} }} jump refuse\n"
    )
    return (
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        "    set host4 { type ipv4_addr; }\n"
        "    set host6 { type ipv6_addr; }\n"
        "    chain refuse {\n"
        "        meta l4proto tcp reject with tcp reset\n"
        "        reject with icmpx type admin-prohibited\n"
        "    }\n"
        "    chain output {\n"
        "        type filter hook output priority filter; policy accept;\n"
        '        oif "lo" accept\n'
        f"        ip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept\n"
        f"        ip daddr {SLIRP_NETWORK} jump refuse\n"
        f"        ip daddr {{ {_elements(ALWAYS_V4)} }} jump refuse\n"
        f"        ip6 daddr {{ {_elements(ALWAYS_V6)} }} jump refuse\n"
        "        ip daddr @host4 jump refuse\n"
        "        ip6 daddr @host6 jump refuse\n"
        f"{private}"
        "    }\n"
        "}\n" + _set_elements("host4", v4) + _set_elements("host6", v6)
    )


async def apply(netns_fd: int, script: str) -> None:
    """Run `script` with nft inside the network namespace open as `netns_fd` (as root: the
    daemon). Raises FilterError with nft's own message when it fails."""
    nft, nsenter = shutil.which(NFT), shutil.which("nsenter")
    if nft is None or nsenter is None:
        raise FilterError(
            "the egress filter needs nft and nsenter (apt install nftables)", missing=True
        )
    proc = await asyncio.create_subprocess_exec(
        nsenter,
        f"--net=/proc/self/fd/{netns_fd}",
        "--",
        nft,
        "-f",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        pass_fds=(netns_fd,),
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        cwd="/",
    )
    try:
        async with asyncio.timeout(TIMEOUT_S):
            out, _ = await proc.communicate(script.encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise FilterError("nft did not finish") from None
    if proc.returncode != 0:
        detail = out.decode(errors="replace").strip()[-300:]
        raise FilterError(f"nft failed ({proc.returncode}): {detail}")


def open_netns(pid: int, create_time: float) -> int:
    """A descriptor of the network namespace of `pid`, checked to be that process's (it was
    not replaced by a reused pid) and not the daemon's own (a filter meant for a sandbox
    must never land on the host)."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            same = psutil.Process(pid).create_time() == create_time
        except psutil.Error:
            same = False
        if not same:
            raise FilterError(f"process {pid} is gone")
        mine = os.stat("/proc/self/ns/net")
        theirs = os.fstat(fd)
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            raise FilterError("the sandbox has no network namespace of its own")
    except BaseException:
        os.close(fd)
        raise
    return fd
