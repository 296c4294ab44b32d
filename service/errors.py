"""Client errors as JSON: every 4xx names the problem (a stable ``error`` code and a message)
and, where a value was out of range, the accepted values."""

from __future__ import annotations

from infantino.images import ImageError

# How each image problem maps to HTTP.
IMAGE_STATUS = {"empty_image": 400, "corrupt_image": 400, "not_an_image": 415, "image_too_large": 413}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.body = {"error": code, "message": message, **extra}

    @classmethod
    def from_image_error(cls, exc: ImageError, field: str = "image") -> "ApiError":
        return cls(IMAGE_STATUS.get(exc.code, 400), exc.code, f"{field}: {exc}")
