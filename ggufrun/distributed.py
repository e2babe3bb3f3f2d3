"""Parsing of the multi-device settings (--rpc, --tensor-split); no llama.cpp import here.

The values are checked when settings are merged, so a bad list gets the same one-line error
from a flag, config.toml or GGUFRUN_RPC / GGUFRUN_TENSOR_SPLIT.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import ConfigError

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
MAX_RPC_SERVERS = 16  # GGML_RPC_MAX_SERVERS in ggml-rpc.h


def parse_endpoint(text: str, origin: str = "rpc") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port). Raise ConfigError.

    llama.cpp's RPC transport speaks IPv4 only (inet_addr/gethostbyname), so IPv6 is refused here
    rather than failing inside llama.cpp.
    """
    text = text.strip()
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise ConfigError(f"Invalid RPC worker {text!r} in {origin}: expected HOST:PORT, e.g. 127.0.0.1:50052.")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ConfigError(f"Invalid RPC worker {text!r} in {origin}: port must be 1-65535.")
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            raise ConfigError(f"Invalid RPC worker {text!r} in {origin}: llama.cpp's RPC transport is IPv4 only.")
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ConfigError(f"Invalid RPC worker {text!r} in {origin}: {host!r} is not a host name or IPv4 address.") from None
    return host, port


def parse_endpoints(text: str, origin: str = "rpc") -> list[str]:
    """'h1:p1,h2:p2' -> normalised endpoints, in order, without duplicates. Raise ConfigError."""
    out: list[str] = []
    for part in text.split(","):
        if not part.strip():
            raise ConfigError(f"Invalid rpc={text!r} in {origin}: an empty entry in the list.")
        host, port = parse_endpoint(part, origin)
        endpoint = f"{host}:{port}"
        if endpoint in out:
            raise ConfigError(f"Invalid rpc={text!r} in {origin}: {endpoint} is listed twice.")
        out.append(endpoint)
    if len(out) > MAX_RPC_SERVERS:
        raise ConfigError(f"Invalid rpc={text!r} in {origin}: llama.cpp takes at most {MAX_RPC_SERVERS} workers.")
    return out


def parse_tensor_split(text: str, origin: str = "tensor_split") -> list[float]:
    """'3,1' -> [3.0, 1.0]: each device's share of the layers (or rows). Raise ConfigError."""
    values: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"Invalid tensor_split={text!r} in {origin}: {part.strip()!r} is not a number.") from None
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"Invalid tensor_split={text!r} in {origin}: shares must be finite and >= 0.")
        values.append(value)
    if not any(values):
        raise ConfigError(f"Invalid tensor_split={text!r} in {origin}: at least one share must be > 0.")
    return values
