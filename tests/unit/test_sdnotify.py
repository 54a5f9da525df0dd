import socket

from sandboxd.outputs import sdnotify


def test_messages_reach_the_notify_socket(monkeypatch, tmp_path):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.ready("reconciling revision 3")
        assert sdnotify.status("adopting")
        assert sdnotify.stopping("bye")
        got = [server.recv(4096).decode() for _ in range(3)]
    assert got == [
        "READY=1\nSTATUS=reconciling revision 3",
        "STATUS=adopting",
        "STOPPING=1\nSTATUS=bye",
    ]


def test_abstract_socket(monkeypatch):
    name = f"sandboxd-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert server.recv(100) == b"WATCHDOG=1"


def test_without_systemd_it_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False
