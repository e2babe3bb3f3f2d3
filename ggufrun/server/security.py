"""What keeps a web page from driving a local server: a Host allow-list, a cross-site POST check and
a case-insensitive ``Authorization`` scheme (no filesystem path in errors: api_errors.scrub_paths).

A keyless server on 127.0.0.1 is reachable from any page the user's browser opens:

* **DNS rebinding.** A page at ``evil.example`` re-points its name to 127.0.0.1 and is then
  same-origin with the server: it can read every reply. The ``Host`` header still says
  ``evil.example``, so only Host names on the allow-list are served (``--allowed-hosts``): the
  loopback names (``localhost``, ``*.localhost``, loopback addresses), the bound address, and,
  when bound to every interface (0.0.0.0, ::), any IP address and this machine's host name. An IP
  address cannot be rebound: the browser's origin is the address itself.
* **Cross-site requests.** A page may POST ``text/plain`` (a "simple request") to any origin
  without a CORS preflight; the browser then hides the reply but the request has run. Browsers
  send ``Origin`` with every POST, while the clients that use these APIs (openai, anthropic and
  ollama's Python clients, ``curl -d``, which sends a form content type) send none. So a request
  with an unsafe method is refused when it carries an ``Origin`` that is neither this server
  (the chat page) nor one of ``--cors``; requiring ``application/json`` instead would break
  ``curl -d``, as Ollama's own examples use it.

Refusals are 403s in the error shape of the API the path belongs to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .api_errors import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", "[::]", ""})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def split_host(value: str) -> tuple[str, int | None]:
    """``Host`` header value -> (lower-case host, port or None); IPv6 keeps its brackets off."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        host, rest = value[1:end], value[end + 1:]
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return value, None


class HostPolicy:
    """Which ``Host`` names a server bound to ``bind`` answers (``extra``: --allowed-hosts)."""

    def __init__(self, bind: str, extra: Iterable[str] = ()) -> None:
        names = [h.strip().lower() for h in extra if h.strip()]
        self.any = "*" in names
        self.names = {split_host(n)[0] for n in names if n != "*"} | {"localhost"}
        bound = bind.strip().lower()
        self.wildcard = bound in WILDCARD_BINDS
        if not self.wildcard:
            self.names.add(bound.strip("[]"))
        else:
            for name in (socket.gethostname(), socket.getfqdn()):
                if name:
                    self.names.add(name.lower())

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        name, _ = split_host(host)
        name = name.rstrip(".")
        if name in self.names or name.endswith(".localhost"):  # *.localhost is loopback by definition (RFC 6761)
            return True
        ip = _ip(name)
        return ip is not None and (ip.is_loopback or self.wildcard)


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a browser's ``Origin`` is the server the request reached (the chat page's own calls)."""
    parts = urlsplit(origin)
    if not parts.scheme or not parts.hostname:
        return False
    try:
        o_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    h_name, h_port = split_host(host)
    return parts.hostname.lower() == h_name and o_port == (h_port or _DEFAULT_PORTS.get(scheme))


class WebGuard:
    """ASGI middleware: the Host allow-list, the cross-site POST check, and the ``Authorization``
    scheme made case-insensitive (``bearer KEY`` is ``Bearer KEY``, RFC 9110 11.1) before the
    key check sees it."""

    def __init__(self, app: ASGIApp, hosts: HostPolicy, cors: Iterable[str],
                 shape: Callable[[str, ApiError], dict[str, Any]]) -> None:
        self.app, self.hosts, self.shape = app, hosts, shape
        origins = {o.strip().rstrip("/").lower() for o in cors}
        self.any_origin = "*" in origins
        self.origins = origins - {"*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        host = origin = ""
        for i, (k, v) in enumerate(headers):
            if k == b"host":
                host = v.decode("latin-1")
            elif k == b"origin":
                origin = v.decode("latin-1")
            elif k == b"authorization" and v[:7].lower() == b"bearer " and v[:7] != b"Bearer ":
                headers = scope["headers"] = [*headers[:i], (k, b"Bearer " + v[7:].lstrip()), *headers[i + 1:]]
        if host and not self.hosts.allows(host):
            name = split_host(host)[0]
            return await self._refuse(scope, receive, send, f"Host '{_printable(name)}' is not served here (DNS rebinding guard). "
                                      f"Start the server with --allowed-hosts {_printable(name)} to allow it.")
        if origin and scope["method"] not in SAFE_METHODS and not self._origin_ok(origin, host, scope.get("scheme", "http")):
            return await self._refuse(scope, receive, send, f"Cross-site request from origin '{_printable(origin)}' refused. "
                                      "Start the server with --cors ORIGIN to allow that page.")
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str, scheme: str) -> bool:
        if self.any_origin or origin.rstrip("/").lower() in self.origins:
            return True
        return bool(host) and same_origin(origin, host, scheme)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        body = self.shape(scope["path"], ApiError(403, message, kind="permission_error"))
        await JSONResponse(body, status_code=403)(scope, receive, send)


def _printable(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")[:200]


def middleware(config: Any, shape: Callable[[str, ApiError], dict[str, Any]]) -> list[Any]:
    """The app's web-exposure middleware for a ServeConfig, outermost first."""
    from starlette.middleware import Middleware

    hosts = HostPolicy(config.host, getattr(config, "allowed_hosts", ()))
    return [Middleware(WebGuard, hosts=hosts, cors=config.cors, shape=shape)]
