"""Image sequences and short videos: frame decoding (OpenCV) and temporal aggregation.

The answer has the shape video emotion systems return: per-class scores for the clip, with
per-frame detail. Two aggregates: the plain mean over frames, and an exponential moving
average (recent frames weigh more: what a live camera view would show).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image


class SequenceError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def decode_video(data: bytes, max_frames: int, max_seconds: float) -> list[tuple[float, Image.Image]]:
    """Up to ``max_frames`` frames, evenly spaced over the clip, as (time in s, RGB image)."""
    import cv2

    if not data:
        raise SequenceError("empty_video", "the video is empty (0 bytes)")
    fd, path = tempfile.mkstemp(suffix=".video")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise SequenceError("not_a_video", "the body is not a video OpenCV can read (accepted: mp4, avi, mkv, webm, mjpeg ...)")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        count = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)  # FFmpeg says -2**63 when it cannot tell (a still image)
        if fps > 0 and count > 0 and count / fps > max_seconds:
            raise SequenceError("video_too_long", f"the video lasts {count / fps:.1f} s; the limit is {max_seconds} s")
        wanted = set(np.linspace(0, max(count - 1, 0), min(max_frames, count)).round().astype(int).tolist()) if count else None
        frames, index = [], 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if wanted is None or index in wanted:
                frames.append((index / fps if fps else float(index), Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))))
                if len(frames) >= max_frames:
                    break
            index += 1
        cap.release()
    finally:
        os.unlink(path)
    if not frames:
        raise SequenceError("corrupt_video", "no frame could be decoded from the video")
    return frames


def aggregate(probs: np.ndarray, classes: list[str], alpha: float) -> dict:
    """Mean and exponentially smoothed (weight ``alpha`` on each new frame) class scores."""
    mean = probs.mean(axis=0)
    ema = probs[0].copy()
    for p in probs[1:]:
        ema = alpha * p + (1 - alpha) * ema
    return {
        "mean": {c: float(v) for c, v in zip(classes, mean)}, "mean_label": classes[int(mean.argmax())],
        "ema": {c: float(v) for c, v in zip(classes, ema)}, "ema_label": classes[int(ema.argmax())], "ema_alpha": alpha,
    }
