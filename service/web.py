"""The web page at ``/``: its static files (``service/web/``), the data it reads, and the admin check.

The page is plain HTML, CSS and JavaScript modules served by this service (no build step, no
front-end server, nothing fetched from elsewhere: a Content-Security-Policy says so to the
browser). BentoML's Swagger UI, which would sit at ``/``, moves to ``/docs`` (the same bundled
assets under ``/static_content``, without BentoML's analytics tag); ``/docs.json`` is untouched.

Everything here is a function of what the service hands over (served heads, stores, registry),
so ``service/api.py`` keeps thin routes:

- :func:`status`: served versions, labels and queue of every task (also streamed by :func:`event_stream`);
- :func:`review`: the least sure, not yet labelled recent predictions, with thumbnails (active learning);
- :func:`history`: every head version of a task with its verdict, metrics and place in the champion history;
- :func:`require_admin`: the bearer-token check of the admin endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from starlette.responses import FileResponse, HTMLResponse, StreamingResponse
from starlette.staticfiles import StaticFiles

from infantino.images import open_image
from infantino.settings import Settings
from service.errors import ApiError

log = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent / "web"
REVIEW_MAX_ITEMS = 100
THUMBNAIL_PX = 128
HISTORY_MAX_VERSIONS = 100

# The page loads only its own files and talks only to this service; the browser enforces it.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Permissions-Policy": "camera=(self), microphone=()",
    "Cache-Control": "no-cache",
}

# BentoML's Swagger UI page (its bundled assets), minus the Google Tag Manager snippet it carries.
DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>InfantinO API</title>
<link rel="stylesheet" href="/static_content/swagger-ui.css">
<link rel="stylesheet" href="/static_content/index.css">
</head>
<body>
<p style="font:14px sans-serif;margin:8px 16px"><a href="/">Back to the InfantinO page</a></p>
<div id="swagger-ui"></div>
<script src="/static_content/swagger-ui-bundle.js"></script>
<script src="/static_content/swagger-ui-standalone-preset.js"></script>
<script src="/static_content/swagger-initializer.js"></script>
</body>
</html>
"""


def _docs_json_survives_union_answers() -> None:
    """BentoML 1.4 (1.4.40 at least) answers /docs.json with a 500 when an API returns a union of
    models (POST /predict: ``Answer | FacesAnswer``): flattening the answer's schema keeps the
    union's first ``#/components/schemas/...`` reference and looks it up as a local ``$defs`` one
    (KeyError). Where that happens, describe the answer as the union of its components instead
    (they are in the spec's components); every other answer is described as before."""
    from _bentoml_sdk import method

    original = method.APIMethod.openapi_response
    if getattr(original, "union_safe", False):
        return

    @functools.wraps(original)
    def openapi_response(self) -> dict[str, Any]:
        try:
            return original(self)
        except KeyError:
            from _bentoml_sdk.service.openapi import REF_TEMPLATE

            schema = self.output_spec.model_json_schema(ref_template=REF_TEMPLATE, mode="serialization")
            schema.pop("$defs", None)
            allowed = {attr.name for attr in method.Schema.__attrs_attrs__}
            return {"description": method.SUCCESS_DESCRIPTION, "content": {self.output_spec.mime_type(): method.MediaType(
                schema=method.Schema(**{k: v for k, v in schema.items() if k in allowed}))}}

    openapi_response.union_safe = True
    method.APIMethod.openapi_response = openapi_response


def install(app: FastAPI) -> None:
    """Add the page (``/``), the API docs (``/docs``) and the static files (``/web/...``) to ``app``."""
    _docs_json_survives_union_answers()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_HTML)

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


def require_admin(token: str | None, authorization: str | None) -> None:
    """Raise unless ``authorization`` is ``Bearer <token>`` (compared in constant time); 403 when admin is off."""
    if not token:
        raise ApiError(403, "admin_disabled", "admin endpoints are off; set INFANTINO_ADMIN_TOKEN to enable them")
    if not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")


# ---- status ----------------------------------------------------------------------------------------
def status(served: dict[str, Any], feedback, settings: Settings) -> dict:
    """What the page's header shows: per task the served head and backbone, labels and queue.

    ``served`` maps each task to its ``service.answers.Served`` (None while loading).
    """
    tasks = {}
    for task, s in served.items():
        tasks[task] = {
            "head_version": s.head.version if s else None,
            "backbone_version": s.head.backbone_version if s else None,
            "labels": list(s.classes) if s else [],
            "queue": feedback.counts(task),
        }
    return {
        "default_task": settings.models.default_task,
        "tasks": tasks,
        "store_images": settings.privacy.store_feedback_images,
        "retention_s": settings.privacy.prediction_retention_s,
        "admin": bool(settings.security.admin_token),
        # Whether feedback / predictions need a token (service/access.py): the page then asks for one.
        "feedback_token": bool(settings.security.feedback_token),
        "predict_token": bool(settings.security.predict_token),
    }


def event_stream(status_fn: Callable[[], dict], interval_s: float = 1.0, lifetime_s: float = 25.0,
                 keepalive_s: float = 10.0) -> StreamingResponse:
    """Server-sent events: ``status`` whenever it changes (and once at the start).

    A stream ends after ``lifetime_s`` and the browser's EventSource reconnects (``retry``),
    so no connection outlives a graceful shutdown for long.
    """

    async def events():
        yield "retry: 1000\n\n"
        last, quiet, started = None, 0.0, time.monotonic()
        while time.monotonic() - started < lifetime_s:
            try:
                current = await asyncio.to_thread(status_fn)
            except Exception as exc:  # the store is briefly unreachable: say so, keep the stream
                log.warning("status for the page failed: %s", exc)
                current = {"error": "status unavailable; retrying"}
            if current != last:
                yield f"event: status\ndata: {json.dumps(current)}\n\n"
                last, quiet = current, 0.0
            elif quiet >= keepalive_s:
                yield ": keep-alive\n\n"
                quiet = 0.0
            await asyncio.sleep(interval_s)
            quiet += interval_s

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the review queue --------------------------------------------------------------------------------
def thumbnail(raw: bytes, px: int = THUMBNAIL_PX) -> str | None:
    """A small JPEG of a stored image as a data URI (None if it cannot be decoded)."""
    try:
        img = open_image(raw, reduce_to=px)
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
    except Exception as exc:  # a stored image that no longer decodes must not break the list
        log.warning("cannot make a thumbnail: %s", exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def review(predictions, task: str, labels: list[str], settings: Settings, limit: int = 24, order: str = "margin",
           within_s: float | None = None) -> dict:
    """The predictions of ``task`` the model was least sure of, recent and not yet labelled, with crops."""
    if order not in ("margin", "confidence"):
        raise ApiError(422, "invalid_order", "order must be margin or confidence", accepted=["margin", "confidence"])
    if not 1 <= limit <= REVIEW_MAX_ITEMS:
        raise ApiError(422, "invalid_limit", f"limit must be between 1 and {REVIEW_MAX_ITEMS}")
    within = settings.privacy.prediction_retention_s if within_s is None else within_s
    if not within > 0:
        raise ApiError(422, "invalid_within_s", "within_s must be positive")
    rows = predictions.least_sure(task, limit=limit, since=time.time() - within, order=order)
    images = predictions.images([r["prediction_id"] for r in rows if r["has_image"]])
    items = [{**{k: v for k, v in r.items() if k != "has_image"}, "image": thumbnail(images[r["prediction_id"]])
              if r["prediction_id"] in images else None} for r in rows]
    return {"task": task, "labels": labels, "order": order, "within_s": within,
            "store_images": settings.privacy.store_feedback_images, "items": items}


# ---- model history -------------------------------------------------------------------------------------
_RUN_METRICS: dict[str, dict[str, float]] = {}  # a registered version's run metrics never change


def _metrics(registry, run_id: str | None) -> dict[str, float]:
    if not run_id:
        return {}
    if run_id not in _RUN_METRICS:
        try:
            _RUN_METRICS[run_id] = {k: float(v) for k, v in registry.run_metrics(run_id).items()}
        except Exception as exc:  # a deleted run: show the version without its metrics
            log.warning("no metrics for run %s: %s", run_id, exc)
            return {}
    return _RUN_METRICS[run_id]


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _feedback_evidence(metrics: dict[str, float], tags: dict[str, str]) -> dict:
    """The candidate's accuracy on feedback it was not taught, beside the reference head's on the same items.

    The gate's evidence has been, by gate version: a held-out share of the feedback against the
    parent champion (``heldout_*`` metrics), or every item cross-fitted against the lineage's
    offline-trained head (``feedback_*`` metrics). Either is shown; None where there was none.
    """
    if _number(metrics.get("heldout_accuracy_candidate")) is not None:
        return {"heldout_accuracy": _number(metrics["heldout_accuracy_candidate"]),
                "heldout_reference_accuracy": _number(metrics.get("heldout_accuracy_champion")),
                "heldout_reference": "parent", "heldout_items": _number(metrics.get("heldout_items"))}
    candidate = _number(metrics.get("feedback_accuracy_candidate", tags.get("feedback_accuracy_crossfit")))
    if candidate is not None:
        return {"heldout_accuracy": candidate, "heldout_reference_accuracy": _number(metrics.get("feedback_accuracy_root")),
                "heldout_reference": "offline-trained head", "heldout_items": _number(metrics.get("feedback_items"))}
    return {"heldout_accuracy": None, "heldout_reference_accuracy": None, "heldout_reference": None, "heldout_items": None}


def verdict(version: str, aliases: list[str], tags: dict[str, str], champion_history: list[str]) -> str:
    """``champion`` | ``promoted`` (was champion) | ``refused`` (by the gate) | ``rolled_back`` | ``registered``."""
    gate = tags.get("gate", "")
    if "champion" in aliases:
        return "champion"
    if version in champion_history:
        return "promoted"
    if gate.startswith("rejected") or "challenger" in aliases:
        return "refused"
    if gate.startswith("passed"):
        return "rolled_back"  # promoted by the gate, then taken out of the champion history by a rollback
    return "registered"


def history(registry, limit: int = HISTORY_MAX_VERSIONS) -> dict:
    """Every head version of the registry's task (the latest ``limit``), oldest first."""
    versions = registry.list_versions("head")[-limit:]
    try:
        model = registry.client.get_registered_model(registry.names["head"])
        champion_history = [str(v) for v in json.loads(model.tags.get("champion_history", "[]"))]
    except Exception:
        champion_history = []
    rows = []
    for v in versions:
        tags, metrics = v["tags"], _metrics(registry, v["run_id"])
        val = _number(tags.get("val_accuracy"))
        if val is None:
            val = _number(metrics.get("val_accuracy_candidate", metrics.get("val_accuracy")))
        rows.append({
            "version": v["version"], "created": (v["created"] or 0) / 1000.0, "aliases": v["aliases"],
            "origin": tags.get("origin", ""), "parent_version": tags.get("parent_version") or None,
            "backbone_version": tags.get("backbone_version"),
            "verdict": verdict(v["version"], v["aliases"], tags, champion_history),
            "gate": tags.get("gate"), "gate_reason": tags.get("gate_reason"),
            "val_accuracy": val,
            **_feedback_evidence(metrics, tags),
            "feedback_items": _number(tags.get("feedback_items")),
        })
    return {"task": registry.task, "versions": rows, "champion_history": champion_history,
            "champion": next((r["version"] for r in rows if "champion" in r["aliases"]), None),
            "rollback_to": champion_history[-2] if len(champion_history) >= 2 else None}
