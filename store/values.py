"""How values are stored: embeddings as little-endian float32 bytes, and argument checks that
name the problem before the database does."""

from __future__ import annotations

from typing import Any

import numpy as np


def encode_embedding(embedding: np.ndarray | None) -> tuple[bytes | None, int | None]:
    if embedding is None:
        return None, None
    a = np.asarray(embedding)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"embedding must be a non-empty 1-D vector, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"embedding must be numeric, got dtype {a.dtype}")
    a = a.astype("<f4", copy=False)
    if not np.isfinite(a).all():
        raise ValueError("embedding has NaN or infinite values")
    return a.tobytes(), int(a.shape[0])


def decode_embedding(blob: bytes | None, dim: int | None) -> np.ndarray | None:
    if blob is None:
        return None
    a = np.frombuffer(blob, dtype="<f4")
    if dim is not None and a.shape[0] != dim:
        raise ValueError(f"stored embedding has {a.shape[0]} values, expected {dim}")
    return a.astype(np.float32)  # native byte order, and a writable copy


def check_str(what: str, value: Any, max_len: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r:.80}")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")


def check_bytes(what: str, value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes or None, got {type(value).__name__}")
    return bytes(value)
