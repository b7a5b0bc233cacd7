"""Outbound addresses: where the service sends requests of its own (webhooks), and where it never does.

A URL is `http` or `https` with a host, a port in 1..65535 and no credentials. Link-local and
cloud-metadata addresses are refused always; loopback, private and other non-public addresses
unless `MC_WEBHOOK_ALLOW` (host names and CIDRs) admits them. The name is resolved and its
address checked at every request, and the request connects to that very address (the name
goes in the Host header and the TLS server name), so a name that resolves elsewhere a moment
later (DNS rebinding) changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket

import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

NEVER = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"))
"""Link-local and cloud-metadata: no setting admits them."""


class Refused(Exception):
    """A URL or address the service does not send to; the message says why."""


class Allowed:
    """MC_WEBHOOK_ALLOW: a comma list of host names and CIDRs admitted though not public."""

    def __init__(self, setting: str):
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in filter(None, (part.strip() for part in setting.split(","))):
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                if "/" in item or ":" in item:
                    raise ValueError(f"MC_WEBHOOK_ALLOW: {item!r} is neither a host name nor a CIDR") from None
                self.names.add(_name(item))

    def admits(self, host: str, address: Address) -> bool:
        return _name(host) in self.names or any(address in network for network in self.networks)


@functools.lru_cache(maxsize=8)
def allowed(setting: str) -> Allowed:
    return Allowed(setting)


def check_url(url: str, allow: Allowed) -> httpx.URL:
    """The URL, parsed, if the service may send to it; Refused saying why otherwise. A host
    that is an address is checked here; a name is checked at each request (`send`)."""
    try:
        parsed = httpx.URL(url)
        host = parsed.host  # decoded on first use: bad IDNA fails here
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are ValueErrors
        raise Refused(f"is not a URL a request can be sent to: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise Refused("must be an http or https URL")
    if not host:
        raise Refused("has no host")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise Refused(f"has port {parsed.port}, outside 1..65535")
    if parsed.userinfo:
        raise Refused("carries credentials (user:password@), which would be sent and kept in the log; "
                      "receivers authenticate deliveries by their signature instead")
    if (literal := _address(host)) is not None:
        _check_address(host, literal, allow)
    return parsed


async def send(client: httpx.AsyncClient, url: str, allow: Allowed, **request) -> httpx.Response:
    """POST to `url` at an address its host resolves to now and that `allow` admits."""
    parsed = check_url(url, allow)
    host = parsed.host
    if _address(host) is not None:
        return await client.post(parsed, **request)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"{host} cannot be resolved: {exc.strerror}") from None
    refusals, admitted = [], []
    for address in dict.fromkeys(_address(info[4][0]) for info in found):
        try:
            _check_address(host, address, allow)
            admitted.append(address)
        except Refused as refused:
            refusals.append(str(refused))
    if not admitted:
        raise Refused("; ".join(refusals))
    headers = {**request.pop("headers", {}), "Host": parsed.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}

    def post(address: Address):
        return client.post(parsed.copy_with(host=str(address)), headers=headers, extensions=extensions, **request)

    *others, last = admitted
    for address in others:  # the next one when nothing listens at one (localhost: ::1, then 127.0.0.1)
        with contextlib.suppress(httpx.ConnectError):
            return await post(address)
    return await post(last)


def client(timeout: float) -> httpx.AsyncClient:
    """A client for `send`: no proxy or .netrc from the environment (either would go around the
    check), no redirects, and no connection kept between requests: each one connects to the
    address checked for it (a kept one might carry another name's TLS session)."""
    return httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def _check_address(host: str, address: Address, allow: Allowed) -> None:
    plain = _embedded(address) or address
    if any(plain in network for network in NEVER):
        raise Refused(f"{host} is at {plain}, a link-local or cloud-metadata address, where nothing is ever sent")
    if not plain.is_global and not allow.admits(host, plain):
        raise Refused(f"{host} is at {plain}, a loopback, private or otherwise non-public address, "
                      "which MC_WEBHOOK_ALLOW does not admit")


def _embedded(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: mapped (::ffff:a.b.c.d), 6to4 or NAT64."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.split("%")[0])  # without a zone (fe80::1%25eth0)
    except ValueError:
        return None


def _name(host: str) -> str:
    return host.lower().rstrip(".")
