"""Client errors as JSON, and the one decorator that turns any failure into an answer.

Every 4xx names the problem (a stable ``error`` code and a short message) and, where a value
was out of range, the accepted values. Messages never echo large input back.
"""

from __future__ import annotations

import functools
import logging
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, TypeVar

import bentoml
from starlette.responses import JSONResponse

from infantino.images import ImageError
from service.schemas import ErrorBody

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# How each image problem maps to HTTP.
IMAGE_STATUS = {"empty_image": 400, "corrupt_image": 400, "not_an_image": 415, "image_too_large": 413}
ECHO_MAX_CHARS = 80  # the most of a client's value an answer repeats


def shown(value: Any, limit: int = ECHO_MAX_CHARS) -> str:
    """A client's value as an answer may quote it: repr'd and cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EndpointMark:
    """Whether the endpoint of the current request has started.

    ``service.middleware`` puts a fresh mark in :data:`ENDPOINT_MARK` for each API request and
    :func:`answers_errors` sets it: an error answered while it is unset came from BentoML reading
    the request, before any endpoint code ran. (The mark is an object, not a flag in the
    variable, so it is shared with any task BentoML runs the endpoint in.)
    """

    def __init__(self) -> None:
        self.started = False


ENDPOINT_MARK: ContextVar[EndpointMark | None] = ContextVar("infantino_endpoint_mark", default=None)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, accepted: list[str] | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=code, message=message, accepted=accepted)
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)

    @classmethod
    def from_image_error(cls, exc: ImageError, field: str = "image") -> "ApiError":
        return cls(IMAGE_STATUS.get(exc.code, 400), exc.code, f"{field}: {exc}")

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return JSONResponse(self.body.model_dump(exclude_none=True), status_code=self.status, headers=headers)


# A dependency that is down is the server's problem but not a bug: a 503 that says which one,
# with Retry-After, never a 500. Nothing was stored by a request that gets one of these, so the
# client's retry (with the same idempotency key) is safe.
DATABASE_DOWN_RETRY_S = 5
REGISTRY_DOWN_RETRY_S = 10


def database_unavailable() -> ApiError:
    return ApiError(503, "database_unavailable", "the feedback store's database cannot be reached; nothing was stored, retry later",
                    retry_after=DATABASE_DOWN_RETRY_S)


def registry_unavailable(what: str = "the model registry") -> ApiError:
    return ApiError(503, "registry_unavailable", f"{what} did not answer in time; the served model is unchanged, retry later",
                    retry_after=REGISTRY_DOWN_RETRY_S)


def dependency_error(exc: BaseException) -> ApiError | None:
    """The 503 for a failure of the database or of the registry, or None when ``exc`` is neither."""
    import sqlalchemy.exc

    from registry.store import RegistryUnavailable

    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError)) or (
            isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated):
        return database_unavailable()
    if isinstance(exc, RegistryUnavailable):
        return registry_unavailable()
    return None


def answers_errors(endpoint: F) -> F:
    """An endpoint's ApiError becomes its JSON answer; anything else a logged 500 that says only that.

    BentoML sends a returned Response as it is, bypassing the endpoint's declared output model,
    which therefore describes the successful answer alone; for an endpoint that takes the
    request context, BentoML then applies the context's status code, so it is set there too.
    """

    @functools.wraps(endpoint)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if (mark := ENDPOINT_MARK.get()) is not None:
            mark.started = True
        try:
            return await endpoint(*args, **kwargs)
        except ApiError as exc:
            error = exc
        except Exception as exc:
            error = dependency_error(exc)
            if error is not None:
                log.warning("%s: %s (%s)", endpoint.__name__, error.body.error, type(exc).__name__)
            else:
                log.exception("unexpected error in %s", endpoint.__name__)
                error = ApiError(500, "internal_error", "unexpected server error; see the server log")
        for value in kwargs.values():
            if isinstance(value, bentoml.Context):
                value.response.status_code = error.status
        return error.response()

    return wrapper  # type: ignore[return-value]
