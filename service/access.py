"""Who may call what, and how often: bearer tokens on the API routes and a per-client rate limit on /feedback.

:class:`AccessGuard`, registered on the service (``add_asgi_middleware``) outside
``service.middleware.RequestGuard``, answers before BentoML reads a byte of the body, so a
refused request costs no upload, decoding or embedding:

- POST /feedback needs ``Authorization: Bearer <token>`` when ``INFANTINO_FEEDBACK_TOKEN`` is set,
  and the /predict endpoints when ``INFANTINO_PREDICT_TOKEN`` is set (401 otherwise). A more
  privileged token also opens a route: the admin token every route, the feedback token /predict.
  Tokens are compared in constant time (``hmac.compare_digest``), each against every accepted one.
- POST /feedback is limited per client, the peer's IP address (a token is shared by many
  clients, so it does not tell them apart), by a token bucket holding up to
  ``INFANTINO_FEEDBACK_RATE_PER_MIN`` requests and refilled at that rate: a 429 with
  ``Retry-After`` past it. The buckets live in each API worker's memory: with N workers a client
  gets up to N times the rate (connections are spread over the workers), and a restart refills them.
  Behind a reverse proxy every client has the proxy's address, so the limit is the proxy's.

Refusals are counted in ``infantino_requests_refused_total`` by route and reason. The admin
endpoints check the admin token themselves (``service.web.require_admin``): they also answer 403
when no admin token is set at all.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from infantino.settings import SecuritySettings
from service import metrics
from service.errors import ENDPOINT_MARK, ApiError

PREDICT_ROUTES = ("/predict", "/predict_batch", "/predict_sequence")
FEEDBACK_ROUTE = "/feedback"
MAX_TRACKED_CLIENTS = 10_000  # buckets kept per worker; the least recently seen client is forgotten first (a full bucket)


def bearer_matches(authorization: str | None, tokens: list[str]) -> bool:
    """Whether ``authorization`` is ``Bearer <t>`` for one of ``tokens``; every token is compared, in constant time."""
    given = (authorization or "").encode()
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given, f"Bearer {token}".encode())
    return found


class TokenBuckets:
    """One token bucket per client: up to ``capacity`` requests at once, refilled at ``per_s`` a second."""

    def __init__(self, capacity: float, per_s: float, max_clients: int = MAX_TRACKED_CLIENTS,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity, self.per_s, self.max_clients, self.clock = capacity, per_s, max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Spend one request of ``client``: 0.0 if allowed, else the seconds until one is allowed."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.pop(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.per_s)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.per_s
            self._buckets[client] = (tokens, now)  # most recently seen last
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait


class AccessGuard:
    """ASGI middleware: the token checks and the feedback rate limit (module docstring)."""

    def __init__(self, app: Callable, security: SecuritySettings):
        self.app = app
        admin = [security.admin_token] if security.admin_token else []
        feedback = [security.feedback_token] if security.feedback_token else []
        self.tokens: dict[str, list[str]] = {}  # route -> the tokens accepted there; absent: open
        if security.feedback_token:
            self.tokens[FEEDBACK_ROUTE] = feedback + admin
        if security.predict_token:
            for route in PREDICT_ROUTES:
                self.tokens[route] = [security.predict_token] + feedback + admin
        rate = security.feedback_rate_per_min
        self.buckets = TokenBuckets(capacity=float(rate), per_s=rate / 60.0) if rate > 0 else None

    def refusal(self, path: str, headers: dict[bytes, bytes], client: str) -> ApiError | None:
        accepted = self.tokens.get(path)
        if accepted is not None and not bearer_matches(headers.get(b"authorization", b"").decode("latin-1"), accepted):
            metrics.REFUSED.labels(route=path, reason="unauthorized").inc()
            return ApiError(401, "unauthorized", f"missing or wrong bearer token: {path} needs `Authorization: Bearer <token>`")
        if path == FEEDBACK_ROUTE and self.buckets is not None:
            wait = self.buckets.take(client)
            if wait > 0:
                metrics.REFUSED.labels(route=path, reason="rate_limited").inc()
                return ApiError(429, "rate_limited", f"too much feedback from this client: at most {int(self.buckets.capacity)} "
                                f"a minute; retry in {math.ceil(wait)} s", retry_after=math.ceil(wait))
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict((k.lower(), v) for k, v in scope.get("headers", ()))
        peer: Any = scope.get("client") or ("unknown", 0)
        error = self.refusal(path, headers, str(peer[0]))
        if error is None:
            return await self.app(scope, receive, send)
        if (mark := ENDPOINT_MARK.get()) is not None:
            mark.started = True  # inside a RequestGuard: this is the service's own answer, to pass as it is
        await error.response()(scope, receive, send)
