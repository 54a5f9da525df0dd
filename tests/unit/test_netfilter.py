"""The egress filter's rules (the attacks on them: tests/integration/test_isolation.py)."""

from sandboxd.providers.local import netfilter

HOST = (frozenset({"192.0.2.2", "192.0.2.255"}), frozenset({"fd00::2"}))


def test_the_host_link_local_and_slirps_gateway_are_always_refused():
    rules = netfilter.ruleset(HOST, allow_private=True)
    assert "add element inet sandboxd host4 { 192.0.2.2, 192.0.2.255 }" in rules
    assert "add element inet sandboxd host6 { fd00::2 }" in rules
    for net in (*netfilter.ALWAYS_V4, *netfilter.ALWAYS_V6, "10.0.2.0/24"):
        assert net in rules
    assert "ip daddr 10.0.2.3 meta l4proto { tcp, udp } th dport 53 accept" in rules
    assert '"lo" accept' in rules  # the sandbox's own loopback stays its own
    assert "192.168.0.0/16" not in rules and "fc00::/7" not in rules


def test_private_ranges_are_refused_unless_the_pool_allows_them():
    rules = netfilter.ruleset(HOST)
    for net in (*netfilter.PRIVATE_V4, *netfilter.PRIVATE_V6):
        assert net in rules
    # One transaction replacing any older table: never a moment without one.
    assert rules.startswith("table inet sandboxd\ndelete table inet sandboxd\n")


def test_a_host_without_addresses_gets_empty_sets():
    rules = netfilter.ruleset((frozenset(), frozenset()))
    assert "add element" not in rules


def test_the_hosts_addresses_include_broadcast_and_drop_the_scope():
    v4, v6 = netfilter.host_addresses()
    assert "127.0.0.1" in v4
    assert all("%" not in a for a in v6)
