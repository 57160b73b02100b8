"""forgeline/embedded.py restartable_port: ports a restarted server finds free again."""

from __future__ import annotations

import socket
from pathlib import Path

from forgeline.embedded import restartable_port


def test_the_port_is_free_and_outside_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {restartable_port() for _ in range(20)}

    assert all(1024 <= port < low for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: a server can listen on it
