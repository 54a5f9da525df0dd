"""sd_notify(3): tell systemd we are ready, stopping, or what we are doing."""

import os
import socket


def notify(message: str) -> bool:
    """Send one datagram to $NOTIFY_SOCKET; False when not run by systemd (or it fails)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    return notify(f"READY=1\nSTATUS={status}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping(status: str) -> bool:
    return notify(f"STOPPING=1\nSTATUS={status}")
