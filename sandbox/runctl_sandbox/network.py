"""The instances' private network: each sandbox instance gets its own loopback address
(127.0.0.2, 127.0.0.3, ...; Linux routes all of 127.0.0.0/8 to the loopback interface) as its
private IP, so processes of two emulated instances on this one host reach each other by it;
and a security group that does not allow a port is emulated for that address and port.

A security group drops traffic it does not allow, without an answer, so a client times out;
an allowed port with no listener answers with a TCP RST, "connection refused" (Amazon EC2 User
Guide, "Troubleshoot connecting to your instance": *Connection timed out* → check the security
group's inbound rules). The sandbox blocks ``address:port`` the same way: it holds a listening
socket there whose accept queue is full and never accepts, so the kernel drops every further
SYN (Linux `tcp_abort_on_overflow` = 0) and connects time out.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any

from moto.ec2.models import ec2_backends

FIRST = 2  # 127.0.0.1 serves the sandbox's own endpoints


class Network:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = FIRST
        self._addresses: dict[str, str] = {}  # instance id -> private IP
        self._blocked: dict[tuple[str, int], list[socket.socket]] = {}

    def _address(self) -> str:
        n = self._next
        self._next += 1
        if n % 256 in (0, 255):  # keep .0 and .255 out, as a subnet does
            return self._address()
        return f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    def assign(self, account_id: str, region: str, instance_ids: list[str]) -> None:
        """Give freshly launched instances their loopback address as their private IP."""
        backend: Any = ec2_backends[account_id][region]
        with self._lock:
            for iid in instance_ids:
                inst = backend.get_instance(iid)
                address = self._addresses.get(iid) or self._address()
                self._addresses[iid] = address
                nic = inst.nics[0]
                nic.private_ip_address = address
                nic.private_ip_addresses = [{"Primary": True, "PrivateIpAddress": address}]

    def address(self, instance_id: str) -> str:
        with self._lock:
            return self._addresses[instance_id]

    def block(self, instance_id: str, port: int) -> None:
        """Drop connections to the instance's private IP on ``port``, as a security group without the rule does."""
        address = self.address(instance_id)
        with self._lock:
            if (address, port) in self._blocked:
                return
            hole = socket.socket()
            hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hole.bind((address, port))
            hole.listen(0)
            held = [hole]
            for _ in range(3):  # fill the accept queue (backlog 0 holds one)
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect((address, port))
                held.append(filler)
            self._blocked[(address, port)] = held

    def unblock(self, instance_id: str, port: int) -> None:
        address = self.address(instance_id)
        with self._lock:
            for sock in self._blocked.pop((address, port), []):
                sock.close()

    def shutdown(self) -> None:
        with self._lock:
            for held in self._blocked.values():
                for sock in held:
                    sock.close()
            self._blocked.clear()
