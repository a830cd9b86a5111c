"""Replica addresses from a target: an explicit list, or every address behind a DNS name."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import grpc

from ntk_client.client import NTKError


def _split_host_port(hostport: str, target: str) -> tuple[str, int]:
    if hostport.startswith("["):  # [v6 address]:port
        host, sep, port = hostport[1:].partition("]:")
    else:
        host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {target!r} needs host:port with a port in 1..65535")
    return host, int(port)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(target: str) -> list[str]:
    """The replica addresses behind one target.

    "dns:///name:port" (or "dns:name:port") becomes one "ip:port" per A or AAAA record, as a
    Kubernetes headless Service answers with one record per ready pod. Only one address family
    is kept, IPv4 when there is any: a dual-stack name lists each host once per family, and a
    server bound to 127.0.0.1 is not reachable at ::1. Any other target is one replica as is.
    """
    if not target.startswith("dns:"):
        return [target]
    rest = target[len("dns:") :]
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
        if authority:
            raise ValueError(
                f"target {target!r} names a DNS server ({authority!r}); only the system "
                "resolver is supported: dns:///name:port"
            )
    host, port = _split_host_port(rest, target)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise NTKError(grpc.StatusCode.UNAVAILABLE, f"cannot resolve {target!r}: {exc}") from None
    by_family: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    for family, _, _, _, sockaddr in infos:
        if family in by_family:
            address = _format_address(str(ipaddress.ip_address(sockaddr[0])), port)
            if address not in by_family[family]:
                by_family[family].append(address)
    addresses = by_family[socket.AF_INET] or by_family[socket.AF_INET6]
    if not addresses:
        raise NTKError(grpc.StatusCode.UNAVAILABLE, f"{target!r} resolved to no IP address")
    return addresses


def resolve_targets(targets: str | Sequence[str]) -> list[str]:
    """Addresses of every replica: `targets` is one target or a sequence; duplicates dropped."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise ValueError("targets is empty; give host:port strings or a dns:///name:port")
    addresses: list[str] = []
    for item in items:
        for address in resolve(item):
            if address not in addresses:
                addresses.append(address)
    return addresses
