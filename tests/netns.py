"""Separate hosts on this machine: Linux network namespaces joined by veth pairs to a bridge
in a namespace of their own, addresses in 198.18.0.0/24 (the benchmarking range, RFC 2544)
that exist only inside these namespaces. Needs root and iproute2's ``ip``; nothing outside
the namespaces it makes is touched, and ``close`` deletes them (their links go with them).

A test thread reaches a host's addresses by entering its namespace (``inside``): setns
applies to the calling thread only, and sockets keep the namespace they were made in.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
SUBNET = "198.18.0"


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (apt-get install iproute2)"
    probe = f"ferry-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """Named hosts on one switch: ``address(name)``, ``exec_argv(name)``, ``cut``/``mend``."""

    def __init__(self, names: list[str]):
        self.tag = f"fy{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.made: list[str] = []
        self.index = {name: i + 1 for i, name in enumerate(names)}
        try:
            self._ns(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
            for name in names:
                self._host(name)
        except BaseException:
            self.close()
            raise

    def _ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _host(self, name: str) -> None:
        ns, i = self.ns(name), self.index[name]
        self._ns(ns)
        # Both ends are made straight inside their namespaces: no name on the machine's own.
        ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", self.port(name),
           "netns", self.switch)
        ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", self.switch, "link", "set", self.port(name), "master", "br0", "up")

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def port(self, name: str) -> str:
        return f"p{self.index[name]}"

    def address(self, name: str) -> str:
        return f"{SUBNET}.{self.index[name]}"

    def exec_argv(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name)]

    def cut(self, name: str) -> None:
        """Pull the host's cable: its switch port goes down, packets are dropped both ways and
        no connection is reset."""
        ip("-n", self.switch, "link", "set", self.port(name), "down")

    def mend(self, name: str) -> None:
        ip("-n", self.switch, "link", "set", self.port(name), "up")

    @contextmanager
    def inside(self, name: str):
        """Run the body in the host's network namespace (this thread only)."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns(name)}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            yield
        finally:
            libc.setns(own, CLONE_NEWNET)
            os.close(own)
            os.close(target)

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self.made.clear()
