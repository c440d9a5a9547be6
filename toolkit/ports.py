"""Free ports for servers and rendezvous on this machine, below the kernel's ephemeral range.

A port from the ephemeral range (what binding port 0 gives) is unsafe to poll before its server listens:
the kernel may pick that very port as the polling client's own source port, and the client is then
connected to itself and reads its own request back (TCP's self-connect; seen as
`BadStatusLine: GET /models/... HTTP/1.1` from TorchServe's management port). Ports below the range are
never given to clients."""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack
from pathlib import Path

LOWEST = 10000  # above the well-known and most registered services' ports


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux: /proc/sys/net/ipv4/ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; IANA's range starts at 49152


def free_port_block(size: int = 1, host: str = "127.0.0.1") -> int:
    """A port p with p..p+size-1 all free on `host`, below the ephemeral range, at a random place (so that
    processes looking at once rarely pick the same one; whoever binds first wins, the other fails clearly)."""
    top = max(ephemeral_low(), LOWEST + 2 * size)
    picker = random.Random()
    for _ in range(200):
        base = picker.randrange(LOWEST, top - size)
        try:
            with ExitStack() as stack:
                for port in range(base, base + size):
                    stack.enter_context(socket.socket()).bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no block of {size} free port(s) on {host} between {LOWEST} and {top}")
