"""HTTP(S) fetching that cannot be turned against the machine it runs on (SSRF guard).

A URL list is untrusted input: a row (or a redirect from an innocent-looking host, or a DNS
answer that changes between two look-ups) may point at ``169.254.169.254`` (cloud metadata),
``10.x``, ``localhost``... :func:`fetch` applies a :class:`NetPolicy` at every step:

* scheme: only ``http``/``https``, for the URL and for every redirect (``file:``, ``ftp:``...
  are refused); at most ``max_redirects`` hops (redirect loops end with an error);
* address: the host is resolved ONCE per connection, every resolved address is checked, and the
  socket connects to a checked address (never re-resolving), so DNS rebinding cannot slip a
  private address in between check and connect; the peer of the connected socket is checked
  again. Only globally reachable addresses pass (:mod:`reco.pipelines.addresses`: IANA
  special-purpose registries, wrapped IPv4 forms unwrapped), unless the address is in
  ``allow_networks``; link-local and metadata addresses never pass. Redirects go through the
  same connection code, so each hop is checked;
* proxies from the environment are not used (they would hide the real peer);
* size: a response declaring or delivering more than ``max_bytes`` is refused (memory);
* time: one deadline per URL (connect + headers + body, redirects included), not per read; a
  body shorter than its Content-Length is a download failure, not a truncated image.

Refusals raise :class:`Refused`; :func:`download_image` (img2dataset's signature) turns every
failure into an error message, refusals prefixed with ``"refused: "``.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urlsplit

from reco.pipelines.addresses import refusal as address_refusal
from reco.pipelines.deadline import Deadline, connect_timeout, watch

SCHEMES = ("http", "https")
REFUSED_PREFIX = "refused: "
MAX_BYTES = 32 * 1024 * 1024
MAX_REDIRECTS = 5
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


class Refused(OSError):
    """A URL, redirect or address that the policy does not allow (never retried)."""

    def __str__(self) -> str:
        return REFUSED_PREFIX + (self.args[0] if self.args else "")


@dataclass(frozen=True)
class NetPolicy:
    """What may be fetched.

    Args:
        allow_networks: CIDR networks allowed although not globally reachable (e.g.
            ``("127.0.0.0/8",)`` for the loopback world server); never link-local/metadata.
        max_bytes: largest response body accepted.
        max_redirects: most redirect hops followed.
        resolver: ``host -> [ip, ...]`` (default: the system resolver); for tests.
    """

    allow_networks: tuple[str, ...] = ()
    max_bytes: int = MAX_BYTES
    max_redirects: int = MAX_REDIRECTS
    resolver: Callable[[str], list[str]] | None = None


def is_internal(ip: str) -> bool:
    """True for every address that is not globally reachable (:mod:`reco.pipelines.addresses`)."""
    return address_refusal(ip) is not None


def resolve(host: str) -> list[str]:
    """All addresses of ``host`` (a literal address resolves to itself, without DNS)."""
    try:
        return [ipaddress.ip_address(host.strip("[]")).compressed]
    except ValueError:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})


def blocked(ip: str, policy: NetPolicy) -> str | None:
    """Why ``ip`` is refused under ``policy``, or None."""
    return address_refusal(ip, policy.allow_networks)


def check_host(host: str, policy: NetPolicy, unresolved: type[OSError] = Refused) -> list[str]:
    """The addresses of ``host`` if ALL of them are allowed; :class:`Refused` otherwise (and
    ``unresolved`` when the name does not resolve)."""
    try:
        addresses = (policy.resolver or resolve)(host)
    except (OSError, UnicodeError, KeyError) as exc:
        raise unresolved(f"cannot resolve host {host!r} ({exc})") from exc
    if not addresses:
        raise Refused(f"host {host!r} has no address")
    for ip in addresses:
        why = blocked(ip, policy)
        if why:
            raise Refused(f"host {host!r} resolves to a non-global (private/loopback/link-local/"
                          f"reserved) address {ip}: {why} (embed.allow_networks allows a network)")
    return addresses


def check_url(url: str, policy: NetPolicy, *, resolve_host: bool = True) -> None:
    """Scheme and host of ``url`` (resolved when asked); :class:`Refused` if not allowed."""
    if not isinstance(url, str) or not url.strip():
        raise Refused("empty url")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError as exc:
        raise Refused(f"malformed url ({exc})") from exc
    if parts.scheme.lower() not in SCHEMES:
        raise Refused(f"scheme {parts.scheme or '(none)'!r} not allowed (only http, https)")
    if not host:
        raise Refused("url has no host")
    if resolve_host:
        check_host(host, policy)


# ---------------------------------------------------------------------------------------------
# connections that check the address they connect to
# ---------------------------------------------------------------------------------------------

def _connect(address, timeout, source_address=None):   # indirection: tests watch connections
    return socket.create_connection(address, timeout, source_address)


def guarded_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, *,
                       policy: NetPolicy) -> socket.socket:
    """``socket.create_connection`` that resolves once, checks every address, connects to a
    checked address and re-checks the connected peer."""
    host, port = address
    last: OSError | None = None
    for ip in check_host(host, policy, unresolved=OSError):   # a DNS failure: a download failure
        try:
            sock = _connect((ip, port), connect_timeout(timeout), source_address)
        except OSError as exc:
            last = exc
            continue
        peer = sock.getpeername()[0]
        why = blocked(peer, policy)
        if why:
            sock.close()
            raise Refused(f"connected peer {peer} of {host!r} is a private address: {why}")
        watch(sock)                           # reads bounded by, and cut at, the URL's deadline
        return sock
    raise last or OSError(f"cannot connect to {host!r}")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: NetPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(guarded_connection, policy=policy)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, policy: NetPolicy, **kwargs):
        super().__init__(*args, **kwargs)      # TLS still verifies the certificate of the host name
        self._create_connection = functools.partial(guarded_connection, policy=policy)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: NetPolicy):
        super().__init__()
        self.policy = policy

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, policy=self.policy), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: NetPolicy):
        super().__init__()
        self.policy = policy

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, policy=self.policy), req,
                            context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: NetPolicy):
        super().__init__()
        self.policy = policy
        self.max_redirections = policy.max_redirects

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:          # scheme checked here; the address when the next hop connects
            check_url(urljoin(req.full_url, location), self.policy, resolve_host=False)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


@functools.lru_cache(maxsize=16)
def opener(policy: NetPolicy) -> urllib.request.OpenerDirector:
    """An opener with only http/https handlers (no file:, ftp:, data:, no proxies)."""
    director = urllib.request.OpenerDirector()
    for handler in (_HTTPHandler(policy), _HTTPSHandler(policy), _RedirectHandler(policy),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        director.add_handler(handler)
    return director


def fetch(url: str, policy: NetPolicy, timeout: float = 10.0, headers: dict | None = None,
          accept: Callable | None = None) -> bytes:
    """The body of ``url`` under ``policy``, within ONE deadline of ``timeout`` seconds for the
    whole request (connect, headers, body, every redirect hop; :mod:`reco.pipelines.deadline`).
    ``accept(response) -> error or None`` may veto a response before its body is read. Raises
    :class:`Refused`, :class:`~reco.pipelines.deadline.DeadlineExceeded` ("timed out ..."),
    :class:`ShortBody` or the urllib/socket error."""
    check_url(url, policy, resolve_host=False)
    request = urllib.request.Request(url.strip(), headers={"User-Agent": USER_AGENT, **(headers or {})})
    with Deadline(timeout) as dl:
        try:
            data = _get(request, policy, timeout, accept)
        except Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - anything cut short by the deadline is a timeout
            if dl.expired or dl.remaining() <= 0:
                raise dl.error() from exc
            raise
        if dl.expired:                      # the timer shut the socket: what was read is partial
            raise dl.error()
    return data


class ShortBody(OSError):
    """The body ended before the length its Content-Length header declared."""


def _get(request, policy: NetPolicy, timeout: float, accept: Callable | None) -> bytes:
    try:
        with opener(policy).open(request, timeout=timeout) as response:
            error = accept(response) if accept else None
            if error:
                raise OSError(error)
            return _read_body(response, policy.max_bytes)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, Refused):
            raise exc.reason from None
        raise


def _read_body(response, max_bytes: int) -> bytes:
    """The whole body, refused over ``max_bytes``; :class:`ShortBody` if it ends before its
    Content-Length (http.client's ``read(n)`` returns a truncated body without complaint)."""
    raw = (response.headers.get("Content-Length") or "").strip()
    declared = int(raw) if raw.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise Refused(f"response of {declared} bytes is larger than {max_bytes}")
    data = bytearray()
    while True:
        chunk = response.read(min(1 << 16, max_bytes + 1 - len(data)) or 1)
        if not chunk:
            break
        data += chunk
        if len(data) > max_bytes:
            raise Refused(f"response is larger than {max_bytes} bytes")
    if declared is not None and len(data) < declared:
        raise ShortBody(f"download failed: the body ended after {len(data)} of the {declared} "
                        f"bytes its Content-Length declared")
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# img2dataset's download functions, guarded
# ---------------------------------------------------------------------------------------------

def download_image(row, timeout, user_agent_token, disallowed_header_directives, *,
                   policy: NetPolicy):
    """``img2dataset.downloader.download_image`` under ``policy``: (key, BytesIO | None, error)."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    agent = USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"

    def accept(response):
        if disallowed_header_directives and is_disallowed(response.headers, user_agent_token,
                                                          disallowed_header_directives):
            return "Use of image disallowed by X-Robots-Tag directive"
        return None

    try:
        return key, io.BytesIO(fetch(url, policy, timeout, {"User-Agent": agent}, accept)), None
    except Exception as err:  # noqa: BLE001 - every failure is this row's error message
        return key, None, str(err)


def download_image_with_retry(row, timeout, retries, user_agent_token, disallowed_header_directives,
                              *, policy: NetPolicy):
    """Retries transient failures only; a refusal is final."""
    for _ in range(retries + 1):
        key, stream, err = download_image(row, timeout, user_agent_token, disallowed_header_directives,
                                          policy=policy)
        if stream is not None or err.startswith(REFUSED_PREFIX):
            break
    return key, stream, err
