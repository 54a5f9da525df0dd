"""A lease token read from Redis is input: only what a daemon writes is believed."""

import pytest

from sandboxd.store.ownership import Holder


def test_a_daemons_token_names_its_epoch_and_instance():
    assert Holder.parse("12:3f9a0c1d2e4b") == Holder(12, "3f9a0c1d2e4b")


@pytest.mark.parametrize(
    "token",
    [
        None,
        "",
        "12",
        "12:",
        ":abc",
        "x:abc",
        "-1:abc",
        "١٢:abc",  # digits, but not ASCII ones
        "1" * 25 + ":abc",
        "3:abc\nMAINPID=1",  # would be another field of systemd's notify message
        "3:abc def",
        "3:" + "a" * 65,
    ],
)
def test_anything_else_names_no_holder(token):
    assert Holder.parse(token) is None
