"""Which addresses an agent advertises, and the order the controller tries them in."""

from __future__ import annotations

import ipaddress

from kowalski.common.addresses import (
    advertised_addresses,
    by_preference,
    host_addresses,
    local_networks,
)


def test_an_address_on_the_controllers_subnet_is_tried_first_and_loopback_last() -> None:
    networks = [ipaddress.IPv4Network("192.168.1.0/24")]
    advertised = ["127.0.0.1", "172.17.0.1", "192.168.1.20", "10.0.0.5", "192.168.1.20"]
    assert by_preference(advertised, networks) == [
        "192.168.1.20", "172.17.0.1", "10.0.0.5", "127.0.0.1"]


def test_without_a_shared_subnet_the_advertisers_order_stands() -> None:
    assert by_preference(["10.0.0.5", "172.17.0.1"], []) == ["10.0.0.5", "172.17.0.1"]


def test_an_agent_bound_to_loopback_advertises_only_loopback() -> None:
    assert advertised_addresses("127.0.0.1") == ["127.0.0.1"]
    assert advertised_addresses("localhost") == ["127.0.0.1"]


def test_an_agent_bound_to_one_address_advertises_just_that() -> None:
    assert advertised_addresses("192.0.2.7") == ["192.0.2.7"]


def test_an_agent_bound_to_every_interface_leaves_loopback_out() -> None:
    addresses = host_addresses()
    advertised = advertised_addresses("0.0.0.0")
    remote = [a for a in addresses if not a.startswith("127.")]
    # Loopback only when the host has no other address: a peer cannot dial it otherwise.
    assert advertised == (remote or addresses)
    assert advertised_addresses("") == advertised


def test_local_networks_hold_the_hosts_own_addresses_but_not_loopback() -> None:
    networks = local_networks()
    assert all(not network.is_loopback for network in networks)
    for address in host_addresses():
        ip = ipaddress.IPv4Address(address)
        assert ip.is_loopback or any(ip in network for network in networks)
