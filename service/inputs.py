"""Reading what clients upload: multipart files or base64 strings, within the size limits.

Every problem becomes an :class:`ApiError` naming the field and the limit; nothing is decoded
here (images are decoded by ``infantino.images``, videos by ``service.sequence``).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from infantino.settings import LimitSettings
from service.errors import ApiError


class Uploads:
    def __init__(self, limits: LimitSettings):
        self.limits = limits

    def read(self, upload: Path | None, b64: str | None, field: str) -> bytes:
        """The bytes of one file: a multipart upload or a base64 string (a data: URL works too)."""
        limit = self.limits.max_image_bytes
        if upload is not None and b64 is not None:
            raise ApiError(400, "ambiguous_image", f"give either {field} (file upload) or {field}_base64, not both")
        if upload is not None:
            size = Path(upload).stat().st_size
            if size > limit:
                raise ApiError(413, "image_too_large", f"{field}: {size} bytes; the limit is {limit}")
            return Path(upload).read_bytes()
        if b64 is not None:
            if len(b64) > limit * 4 // 3 + 4:
                raise ApiError(413, "image_too_large", f"{field}_base64: over the limit of {limit} bytes")
            try:
                return base64.b64decode(b64.split(",", 1)[-1] if b64.startswith("data:") else b64, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_base64", f"{field}_base64 is not valid base64") from None
        raise ApiError(400, "missing_image", f"send an image: multipart field '{field}' or JSON field '{field}_base64'")

    def one(self, uploads: list[Path], b64: str | None, field: str = "image") -> bytes:
        if len(uploads) > 1:
            raise ApiError(400, "too_many_images", f"this endpoint takes one {field}; use /predict_batch for several")
        return self.read(uploads[0] if uploads else None, b64, field)

    def many(self, uploads: list[Path], b64s: list[str] | None, field: str, limit: int, what: str = "images",
             per_item: bool = False) -> list[bytes | ApiError]:
        """Every file sent; with ``per_item``, a file that cannot be read is its ApiError in the list
        (a batch answers per item) instead of failing the call."""
        n = len(uploads) + len(b64s or [])
        if n == 0:
            raise ApiError(400, f"missing_{'image' if what == 'images' else what}",
                           f"send {what}: multipart field '{field}' (repeated) or JSON list '{field}_base64'")
        if n > limit:
            raise ApiError(413, f"too_many_{what}", f"{n} {what}; the limit per call is {limit}")
        items: list[bytes | ApiError] = []
        for upload, b64 in [(u, None) for u in uploads] + [(None, b) for b in b64s or []]:
            try:
                items.append(self.read(upload, b64, field))
            except ApiError as exc:
                if not per_item:
                    raise
                items.append(exc)
        return items
