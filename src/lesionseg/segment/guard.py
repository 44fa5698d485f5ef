"""The door of a local page: a server on 127.0.0.1 is reachable by every web page its user has open.

Two attacks matter (Jupyter answers both the same way): DNS rebinding, where a hostile name resolves to
127.0.0.1 and the browser then treats our pages as that site's own, and cross-site requests, where a page on any
site posts to us (a `no-cors` fetch needs no preflight). So every request must name us in its Host header (a
loopback name, or the address we were told to listen on), and every request that writes must come from our own
page: its Origin, where the browser sends one, is our own scheme, host and port, and a request the browser marks
as cross-site (Sec-Fetch-Site) is refused. Clients that are not browsers (curl, scripts) send neither header and
are let in: no web page can make a browser omit them. Bodies that are images must say so (`image/png`), which a
cross-site page can send only after a preflight that we never answer.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.responses import JSONResponse

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def host_name(value: str) -> str:
    """'Host: [::1]:8001' -> '::1'; 'LocalHost.:8001' -> 'localhost'; an unparsable value -> ''."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").rstrip(".").lower() if parts.port is None or parts.port > 0 else ""
    except ValueError:
        return ""


def allowed_hosts(bound: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The names a request may call us by: loopback, the address we listen on (unless it is every address),
    and any the user lists."""
    names = set(LOOPBACK) | {host_name(name) for name in extra}
    if bound not in ANY_ADDRESS:
        names.add(host_name(bound if ":" not in bound or bound.startswith("[") else f"[{bound}]"))
    else:  # every address: the machine's own name and addresses, which other machines call it by
        names |= machine_names()
    return frozenset(names - {""})


def machine_names() -> set[str]:
    """This machine's host name and the addresses it resolves to (nothing where the resolver fails)."""
    import socket

    try:
        name, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
    except OSError:
        return {socket.gethostname().lower()}
    return {socket.gethostname().lower(), name.lower(), *(a.lower() for a in aliases), *addresses}


def refusal(scope, allowed: frozenset[str]) -> str | None:
    """Why this request may not reach the app, or None."""
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    host = headers.get("host", "")
    if host_name(host) not in allowed:
        return f"Host {host[:100]!r} is not this server's name (DNS rebinding?); open the address review printed"
    if scope["method"] in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.netloc.lower() != host.lower() or parts.scheme != scope.get("scheme", "http"):
            return f"a write from another site ({origin[:100]}) is refused"
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return "a write from another site is refused"
    return None


class LocalOnly:
    """ASGI middleware: requests that fail the door's rules get 403 with the one-line reason, before the app
    reads a byte of them."""

    def __init__(self, app, hosts: frozenset[str]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            reason = refusal(scope, self.hosts)
            if reason:
                return await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)
