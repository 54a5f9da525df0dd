"""The seccomp filter of local sandboxes, built with libseccomp (pyseccomp), never by hand.

The default action is ALLOW: a code sandbox runs arbitrary programs (compilers, language
runtimes, test suites) and an allow-list breaks them in ways nobody can predict. What it
denies is what a code sandbox never needs and what has been the door to the host kernel:

kernel code (kexec, modules), the kernel keyring, bpf, perf_event_open, userfaultfd, every
mount call (the mounts are set up before the filter), reboot, swap, clock setting, raw I/O
ports, ptrace ATTACH/SEIZE of processes the tracer did not start (strace or gdb of a child
still work), reading or writing other processes' memory, setns, and new user namespaces
(unshare/clone with CLONE_NEWUSER; clone3 answers ENOSYS so that libc falls back to clone,
whose flags a filter can see), io_uring (its own path around this filter), and AF_VSOCK
sockets (not namespaced: they reach the hypervisor's services when the host is a VM). Denied
calls fail with EPERM (vsock: EAFNOSUPPORT). The full list is `sandboxd.spec.DENIED_SYSCALLS`
(the spec validates `security.allow_syscalls` against it).

A pool adds an allowance with `security.allow_syscalls` (names from the table) and allows
nested user namespaces with `security.nested_userns: true` (rootless containers inside the
sandbox); the filter is built per distinct allowance and cached.
"""

import errno
import functools
import os
from collections.abc import Iterable

from sandboxd.spec import ALLOWABLE_SYSCALLS as ALLOWABLE
from sandboxd.spec import DENIED_SYSCALLS as DENIED

# Denied only with some arguments; allowable by name like the others.
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
CLONE_NEWUSER = 0x10000000
AF_VSOCK = 40  # host <-> VM sockets: not namespaced, they reach the hypervisor's services


class SeccompUnavailable(RuntimeError):
    """libseccomp (or its Python binding) is missing: no filter can be built."""


def available() -> str | None:
    """None when a filter can be built, else why not."""
    try:
        _module()
    except SeccompUnavailable as exc:
        return str(exc)
    return None


def _module():
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # OSError: libseccomp.so.2 not found by ctypes
        raise SeccompUnavailable(f"pyseccomp/libseccomp unavailable: {exc}") from None
    return pyseccomp


@functools.lru_cache(maxsize=32)
def _compiled(allow: frozenset[str], nested_userns: bool) -> bytes:
    sc = _module()
    flt = sc.SyscallFilter(defaction=sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        if name not in allow:
            _rule(sc, flt, eperm, name)
    if "ptrace" not in allow:
        for request in (PTRACE_ATTACH, PTRACE_SEIZE):
            _rule(sc, flt, eperm, "ptrace", sc.Arg(0, sc.EQ, request))
    if "vsock" not in allow:
        _rule(sc, flt, sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.EQ, AF_VSOCK))
    if not nested_userns:
        _rule(sc, flt, eperm, "unshare", sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
        # clone's flags are its first argument on x86-64 and arm64 alike.
        _rule(sc, flt, eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
        # clone3 passes its flags in memory, out of a filter's sight: refuse it as missing.
        _rule(sc, flt, sc.ERRNO(errno.ENOSYS), "clone3")
    with os.fdopen(os.memfd_create("sandboxd-seccomp"), "w+b") as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read()


def _rule(sc, flt, action, name: str, *args) -> None:
    try:
        flt.add_rule(action, name, *args)
    except (RuntimeError, ValueError, OSError):
        # A syscall this architecture or libseccomp does not know cannot be called either.
        pass


def program(allow: Iterable[str] = (), nested_userns: bool = False) -> bytes:
    """The compiled BPF program for bubblewrap's `--seccomp FD`."""
    unknown = set(allow) - ALLOWABLE
    if unknown:
        raise ValueError(f"not in the filter, nothing to allow: {sorted(unknown)}")
    return _compiled(frozenset(allow), nested_userns)
