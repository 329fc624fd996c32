"""Who may talk to the server: the bind-address rule and the api key check.

Safe by default: the server binds 127.0.0.1. Binding any other address exposes generation and
`POST /v1/weights` (which replaces the served weights) to the network, so it is refused unless
an api key is set. With a key, every /v1 route needs `Authorization: Bearer KEY`; /health and
/metrics stay open (load balancers and Prometheus scrape them) and reveal no prompt or output.
"""

from __future__ import annotations

import hmac
import ipaddress

from rollout.server.errors import APIError

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, api_key: str | None) -> None:
    """Raise ValueError when binding `host` without an api key would expose the server."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"refusing to bind {host!r} without an api key: any machine that reaches this address could "
            "generate with the model and replace its weights through POST /v1/weights. Pass --api-key KEY "
            "(api_key=... in Python) and give clients that key, or bind 127.0.0.1 (the default) and put an "
            "authenticating proxy in front."
        )


def check_key(authorization: str | None, api_key: str | None) -> None:
    """Raise a 401 APIError unless `authorization` is `Bearer <api_key>` (or no key is set)."""
    if not api_key:
        return
    if not authorization:
        raise APIError(401, "missing api key: send the header 'Authorization: Bearer <key>' "
                       "(the server was started with --api-key)", type="authentication_error",
                       code="invalid_api_key")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid api key: the 'Authorization: Bearer <key>' header does not match the "
                       "server's --api-key", type="authentication_error", code="invalid_api_key")
