"""Checks a running InfantinO container over HTTP (used by scripts/containerize.sh).

  python scripts/container_check.py ready URL TIMEOUT_S      -> seconds until /readyz answered 200
  python scripts/container_check.py predict URL              -> JSON: /predict on a drawn face, its 7 labels
  python scripts/container_check.py online URL TOKEN N       -> JSON: N /feedback posts, then /admin/update
  python scripts/container_check.py model URL                -> JSON: /model (served versions, queue)

Standard library only, plus testkit.faces (Pillow, numpy) for the face images.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}


def _face(label: int, seed: int) -> bytes:
    import numpy as np

    from testkit.faces import draw_face, png_bytes
    return png_bytes(draw_face(label, size=160, rng=np.random.default_rng(seed)))


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="face.png"\r\n'
                     f'Content-Type: image/png\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _call(url: str, body: bytes | None = None, ctype: str | None = None, token: str | None = None,
          timeout: float = 120) -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if ctype:
        req.add_header("content-type", ctype)
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")[:500]


def ready(url: str, timeout_s: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                if r.status == 200:
                    print(f"{time.monotonic() - start:.2f}")
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)
    sys.exit(f"/readyz not 200 within {timeout_s:.0f} s")


def predict(url: str) -> None:
    body, ctype = _multipart({}, {"image": _face(0, 7)})
    start = time.monotonic()
    status, answer = _call(f"{url}/predict", body, ctype)
    seconds = time.monotonic() - start
    probs = answer.get("probabilities", {}) if isinstance(answer, dict) else {}
    ok = status == 200 and set(probs) == LABELS
    print(json.dumps({"status": status, "seconds": round(seconds, 3), "has_7_labels": ok, "answer": answer}))
    if not ok:
        sys.exit(1)


def online(url: str, token: str, n: int) -> None:
    labels = ["happy", "sad", "surprise", "neutral"]
    acks = []
    for i in range(n):
        body, ctype = _multipart({"label": labels[i % 4]}, {"image": _face(i % 4, 100 + i)})
        status, ack = _call(f"{url}/feedback", body, ctype)
        acks.append(status)
        last = ack
    start = time.monotonic()
    status, report = _call(f"{url}/admin/update", json.dumps({"force": True}).encode(), "application/json", token, timeout=600)
    print(json.dumps({"feedback_posted": n, "feedback_status": sorted(set(acks)), "last_ack": last,
                      "update_status": status, "update_seconds": round(time.monotonic() - start, 2), "update": report}))
    # the loop must run in the container as it is: every item acknowledged and an update made (whatever the gate says)
    if sorted(set(acks)) != [200] or status != 200:
        sys.exit(f"the online loop failed in the container: feedback answered {sorted(set(acks))}, /admin/update {status}")


def model(url: str) -> None:
    status, info = _call(f"{url}/model")
    print(json.dumps({"status": status, "model": info}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"ready": lambda: ready(args[0], float(args[1])), "predict": lambda: predict(args[0]),
     "online": lambda: online(args[0], args[1], int(args[2])), "model": lambda: model(args[0])}[cmd]()
