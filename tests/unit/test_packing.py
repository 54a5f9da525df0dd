"""Commands packed by hiredis (store/connection.py) are byte for byte what redis-py's own
packer sends, for every argument the daemon and the clients can pass, including text that
is not valid UTF-8 (read back from Redis with `surrogateescape`) and types hiredis would
pack differently or refuse."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelManagedConnection

from sandboxd.store.connection import hiredis_packing, open_redis

OPTIONS = {"decode_responses": True, "encoding_errors": "surrogateescape"}
PACKED = hiredis_packing(Connection)(**OPTIONS)
REFERENCE = Connection(**OPTIONS)

names = st.sampled_from(
    ["EVALSHA", "HSET", "XADD", "CONFIG GET", "client setname", "PING", "CONFIG\tGET", "GET\n", ""]
)
arguments = st.one_of(
    st.text(),  # any code point, lone surrogates included
    st.binary(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.booleans().map(int),
)


@settings(max_examples=400, deadline=None)
@given(names, st.lists(arguments, max_size=20))
def test_the_same_bytes_as_redis_py(name, args):
    assert b"".join(PACKED.pack_command(name, *args)) == b"".join(
        REFERENCE.pack_command(name, *args)
    )


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", "\udcff\udcfe"),  # the bytes ff fe read back from Redis
        ("SET", "k", "caf\udce9"),
        ("SET", "k", memoryview(b"abc")),
        ("SET", "k", bytearray(b"abc")),
        ("SET", "k", 1.5),
        ("SET", b"k", "v"),
        ("CONFIG GET", "maxmemory"),
        ("CONFIG\tGET", "maxmemory"),  # redis-py splits on any whitespace
        ("GET\r\n", "k"),
        ("", "k"),  # redis-py drops an empty name
        ("SET", "k", 2**64),
        ("SET", "k", -(2**63) - 1),
    ],
)
def test_what_hiredis_would_pack_differently_goes_to_redis_py(args):
    assert b"".join(PACKED.pack_command(*args)) == b"".join(REFERENCE.pack_command(*args))


def test_an_int_of_thousands_of_digits_is_refused_as_redis_py_refuses_it():
    """hiredis's packer crashes the process on one (SIGSEGV); redis-py raises."""
    with pytest.raises(ValueError):
        REFERENCE.pack_command("WAIT", 1, 10**5000)
    with pytest.raises(ValueError):
        PACKED.pack_command("WAIT", 1, 10**5000)


def test_a_bool_is_refused_as_redis_py_refuses_it():
    from redis.exceptions import DataError

    with pytest.raises(DataError):
        PACKED.pack_command("SET", "k", True)


@pytest.mark.parametrize(
    "cls", [Connection, SSLConnection, UnixDomainSocketConnection, SentinelManagedConnection]
)
def test_every_kind_of_connection_keeps_its_class(cls):
    packing = hiredis_packing(cls)
    assert issubclass(packing, cls)
    assert hiredis_packing(packing) is packing
    assert hiredis_packing(cls) is packing  # one class each, not one per client


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "rediss://127.0.0.1:1/0",
        "unix:///run/redis.sock",
        "redis+sentinel://127.0.0.1:1/mymaster",
    ],
)
def test_every_client_opened_packs_with_hiredis(url):
    client = open_redis(url)
    kind = client.connection_pool.connection_class
    assert kind.__name__.startswith("HiredisPacking")


def test_plain_commands_are_packed_by_hiredis(monkeypatch):
    import hiredis

    calls = []

    def counting(args):
        calls.append(args)
        return hiredis.pack_command(args)

    monkeypatch.setattr(
        "sandboxd.store.connection.hiredis", type("H", (), {"pack_command": staticmethod(counting)})
    )
    PACKED.pack_command("EVALSHA", "abc", 2, "k1", b"k2", "é")
    PACKED.pack_command("SET", "k", 1.5)  # a float: left to redis-py
    assert calls == [("EVALSHA", "abc", 2, "k1", b"k2", "é")]
