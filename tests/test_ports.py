"""toolkit.ports: free ports for servers and rendezvous, below the kernel's ephemeral range (a client polling
an ephemeral port before its server listens can be connected to itself)."""

from __future__ import annotations

import socket

from toolkit.ports import LOWEST, ephemeral_low, free_port_block


def test_a_block_is_free_consecutive_and_below_the_ephemeral_range():
    low = ephemeral_low()
    assert 1024 < low <= 65535
    for size in (1, 5):
        base = free_port_block(size)
        assert LOWEST <= base and base + size <= low
        sockets = [socket.socket() for _ in range(size)]
        for port, s in zip(range(base, base + size), sockets):  # every port of the block binds
            s.bind(("127.0.0.1", port))
        for s in sockets:
            s.close()


def test_a_taken_port_is_never_given():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port_block(1)))
        taken.listen()
        port = taken.getsockname()[1]
        assert all(not (b <= port < b + 5) for b in (free_port_block(5) for _ in range(50)))
