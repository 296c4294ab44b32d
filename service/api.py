"""The public API service: POST /predict, /predict_batch, /feedback, /admin/update; GET /model.

It decodes and resizes images (the same decoder training uses), asks the backbone service for
embeddings (adaptive batching happens there), applies the scikit-learn head, and writes each
prediction and feedback durably to the shared queue before answering. Every worker follows
the registry's champion on its own (``service.models.ChampionWatcher``) and runs the online
updater loop, which takes a lease in the shared store so only one update runs at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from infantino.faces import Face, create_detector, crop_face
from infantino.images import ImageError, Preprocessing, open_image, to_model_array
from infantino.settings import get_settings
from online.queue import FeedbackQueue
from online.updater import Updater
from registry.store import LoadedHead
from service import metrics
from service.backbone import BackboneService
from service.errors import ApiError
from service.models import ChampionWatcher, ModelSource
from service.sequence import SequenceError, aggregate, decode_video

log = logging.getLogger(__name__)
SETTINGS = get_settings()
_SERVICE: "InfantinO | None" = None  # this worker's instance, for the plain Starlette routes


@dataclass(frozen=True)
class Region:
    """One thing to classify: the whole upload, or one face cropped from it."""

    array: np.ndarray  # model input, uint8 (S, S, 3)
    image: bytes  # what is kept for feedback and re-embedding: the upload, or the face crop (PNG)
    face: Face | None = None


@dataclass(frozen=True)
class Served:
    """What one worker serves right now; replaced as a whole on a swap."""

    head: LoadedHead
    preprocessing: Preprocessing

    @property
    def classes(self) -> list[str]:
        return self.head.classes


async def model_info(request: Request) -> JSONResponse:
    if _SERVICE is None or _SERVICE.served is None:
        return JSONResponse({"error": "not_ready", "message": "models are not loaded yet"}, status_code=503)
    return JSONResponse(await asyncio.to_thread(_SERVICE.describe))


# GET /model, mounted beside BentoML's own routes (BentoML APIs are POST only).
info_app = Starlette(routes=[Route("/model", model_info, methods=["GET"])])


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(name="infantino", workers=SETTINGS.api_workers, traffic={"timeout": 60})
class InfantinO:
    backbone = bentoml.depends(BackboneService)

    def __init__(self) -> None:
        global _SERVICE
        self.settings = SETTINGS
        self.task = SETTINGS.task
        self.source = ModelSource(SETTINGS)
        self.queue = FeedbackQueue(SETTINGS.resolved_queue_url)
        self.served: Served | None = None
        self.detector = create_detector(SETTINGS.face_detector, SETTINGS.face_model_path)
        try:
            self._switch(self.source.champion_head_version())
        except Exception:
            log.exception("no model loaded yet; readiness stays false until the registry has a champion")
        self.watcher = ChampionWatcher(self.source, self._current_head_version, self._switch, SETTINGS.model_poll_s).start()
        self.updater = Updater(SETTINGS, self.source.registry, self.queue, on_promoted=self.watcher.check_now).start()
        _SERVICE = self

    # ---- models -------------------------------------------------------------------------------
    def _current_head_version(self) -> str | None:
        return self.served.head.version if self.served else None

    def _switch(self, head_version: str | None) -> None:
        head = self.source.load_head(head_version)
        served = Served(head, self.source.backbone_preprocessing(head.backbone_version))
        self.served = served  # atomic swap: requests in flight finish with the object they read
        metrics.SERVED_VERSION.labels(task=self.task, kind="head").set(float(head.version))
        metrics.SERVED_VERSION.labels(task=self.task, kind="backbone").set(float(head.backbone_version))
        log.info("serving head v%s (backbone v%s)", head.version, head.backbone_version)

    def __is_ready__(self) -> bool:
        return self.served is not None

    def _require_served(self) -> Served:
        if self.served is None:
            raise ApiError(503, "not_ready", "models are not loaded yet; retry shortly")
        return self.served

    def describe(self) -> dict:
        served = self._require_served()
        reg = self.source.registry
        out = {"task": self.task, "labels": served.classes, "preprocessing": served.preprocessing.to_dict(),
               "queue": self.queue.counts(self.task), "tracking_uri": reg.tracking_uri}
        for kind, version in (("head", served.head.version), ("backbone", served.head.backbone_version)):
            entry = {"name": reg.names[kind], "version": version}
            try:
                mv = reg.version_info(kind, version)
                entry["tags"] = dict(mv.tags)
                entry["metrics"] = reg.run_metrics(mv.run_id) if mv.run_id else {}
            except Exception as exc:  # registry down: still describe what is served
                entry["registry_error"] = str(exc)
            out[kind] = entry
        return out

    # ---- request plumbing ---------------------------------------------------------------------
    async def _answer(self, ctx: bentoml.Context, work) -> dict:
        try:
            return await work
        except ApiError as exc:
            ctx.response.status_code = exc.status
            return exc.body
        except Exception:
            log.exception("unexpected error")
            ctx.response.status_code = 500
            return {"error": "internal_error", "message": "unexpected server error; see the server log"}

    def _image_bytes(self, upload: Path | None, b64: str | None, field: str) -> bytes:
        if upload is not None and b64 is not None:
            raise ApiError(400, "ambiguous_image", f"give either {field} (file upload) or {field}_base64, not both")
        if upload is not None:
            size = Path(upload).stat().st_size
            if size > self.settings.max_image_bytes:
                raise ApiError(413, "image_too_large", f"{field}: {size} bytes; the limit is {self.settings.max_image_bytes}")
            return Path(upload).read_bytes()
        if b64 is not None:
            if len(b64) > self.settings.max_image_bytes * 4 // 3 + 4:
                raise ApiError(413, "image_too_large", f"{field}_base64: over the limit of {self.settings.max_image_bytes} bytes")
            try:
                return base64.b64decode(b64.split(",", 1)[-1] if b64.startswith("data:") else b64, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_base64", f"{field}_base64 is not valid base64") from None
        raise ApiError(400, "missing_image", f"send an image: multipart field '{field}' or JSON field '{field}_base64'")

    def _regions(self, raw: bytes, prep: Preprocessing, faces: str = "whole", field: str = "image") -> list[Region]:
        """Decode once; ``faces`` is "whole" (the image), "largest" (that face, else the image) or "all"."""
        try:
            img = open_image(raw, self.settings.max_image_bytes, self.settings.max_image_pixels)
        except ImageError as exc:
            raise ApiError.from_image_error(exc, field) from None
        return self._regions_of(img, raw, prep, faces)

    def _regions_of(self, img, raw: bytes | None, prep: Preprocessing, faces: str) -> list[Region]:
        if raw is None:  # a video frame: keep a PNG of it for feedback
            buf = io.BytesIO()
            img.save(buf, "PNG")
            raw = buf.getvalue()
        found = self.detector.detect(img)[: self.settings.max_faces] if faces != "whole" else []
        if faces == "largest":
            found = found[:1]
        if not found:
            return [Region(to_model_array(img, prep.input_size, prep.grayscale), raw)] if faces != "all" else []
        regions = []
        for face in found:
            crop = crop_face(img, face, self.settings.face_margin)
            buf = io.BytesIO()
            crop.save(buf, "PNG")
            regions.append(Region(to_model_array(crop, prep.input_size, prep.grayscale), buf.getvalue(), face))
        return regions

    async def _embed(self, served: Served, arrays: np.ndarray) -> np.ndarray:
        # Calls larger than the runner's max batch size would be refused by its dispatcher.
        step = self.settings.batch_max_size

        async def call(chunk: np.ndarray):
            try:
                return await self.backbone.to_async.embed(chunk)
            except aiohttp.ClientConnectionError:  # a recycled connection: the call is safe to repeat once
                return await self.backbone.to_async.embed(chunk)

        try:
            parts = await asyncio.gather(*(call(arrays[i : i + step]) for i in range(0, len(arrays), step)))
        except (bentoml.exceptions.ServiceUnavailable, aiohttp.ClientConnectionError):
            raise ApiError(503, "overloaded", "the backbone runner is overloaded or restarting; retry shortly") from None
        out = np.concatenate([np.asarray(p) for p in parts])
        made_by = {str(int(v)) for v in out[:, -1]}
        if made_by != {served.head.backbone_version}:
            raise ApiError(503, "model_swap", f"the backbone is switching versions ({sorted(made_by)} -> v{served.head.backbone_version}); retry")
        return out[:, :-1]

    def _answers(self, served: Served, emb: np.ndarray, regions: list[Region]) -> list[dict]:
        probs = served.head.model.predict_proba(emb)
        answers = []
        for e, p, region in zip(emb, probs, regions):
            best = int(p.argmax())
            label = served.classes[best]
            pid = uuid.uuid4().hex
            self.queue.record_prediction(
                prediction_id=pid, task=self.task, label=label, embedding=e, backbone_version=served.head.backbone_version,
                head_version=served.head.version, image=region.image if self.settings.store_feedback_images else None,
            )
            metrics.PREDICTIONS.labels(label=label, task=self.task).inc()
            metrics.CONFIDENCE.labels(task=self.task).observe(float(p[best]))
            answer = {
                "prediction_id": pid, "label": label, "confidence": float(p[best]),
                "probabilities": {c: float(v) for c, v in zip(served.classes, p)},
                "task": self.task, "backbone_version": served.head.backbone_version, "head_version": served.head.version,
            }
            if region.face is not None:
                answer.update(box=list(region.face.box), detector_score=float(region.face.score))
            answers.append(answer)
        return answers

    def _one_image(self, uploads: list[Path], b64: str | None) -> bytes:
        if len(uploads) > 1:
            raise ApiError(400, "too_many_images", "this endpoint takes one image; use /predict_batch for several")
        return self._image_bytes(uploads[0] if uploads else None, b64, "image")

    async def _predict(self, raws: list[bytes], faces: bool = False, whole_image_if_no_face: bool = True) -> list[dict]:
        """One answer per upload: a prediction, or (faces=True) every face found with its box."""
        served = self._require_served()
        per_image = await asyncio.gather(*(
            asyncio.to_thread(self._regions, r, served.preprocessing, "all" if faces else "whole") for r in raws))
        if faces and whole_image_if_no_face:
            per_image = [regions or await asyncio.to_thread(self._regions, raw, served.preprocessing, "whole")
                         for regions, raw in zip(per_image, raws)]
        flat = [region for regions in per_image for region in regions]
        answers = []
        if flat:
            emb = await self._embed(served, np.stack([r.array for r in flat]))
            answers = await asyncio.to_thread(self._answers, served, emb, flat)
        if not faces:
            return answers
        out, i = [], 0
        for regions in per_image:
            mine, i = answers[i : i + len(regions)], i + len(regions)
            found = [a for a, r in zip(mine, regions) if r.face is not None]
            whole = next((a for a, r in zip(mine, regions) if r.face is None), None)
            out.append({"face_count": len(found), "faces": found, "whole_image": whole,
                        "message": None if found else "no face found" + ("; classified the whole image" if whole else "")})
        return out

    # ---- endpoints ------------------------------------------------------------------------------
    # File inputs are typed list[Path] (empty when absent): BentoML 1.4 cannot parse an
    # optional multipart file (`Path | None` skips its file handling; Optional[Path] fails on 3.11).
    @bentoml.api
    async def predict(
        self, ctx: bentoml.Context, image: list[Path] = [], image_base64: str | None = None,
        faces: bool = False, whole_image_if_no_face: bool = True,
    ) -> dict:
        """Classify one image (multipart field `image`, or JSON `image_base64`).

        With `faces=true`, every face found is classified, each with its box; when none is
        found the answer says so (and classifies the whole image unless told not to).
        """

        async def work() -> dict:
            raw = self._one_image(image, image_base64)
            return (await self._predict([raw], faces, whole_image_if_no_face))[0]

        return await self._answer(ctx, work())

    @bentoml.api
    async def predict_batch(
        self, ctx: bentoml.Context, images: list[Path] = [], images_base64: list[str] | None = None,
        faces: bool = False, whole_image_if_no_face: bool = True,
    ) -> dict:
        """Classify several images in one call (multipart `images`, or JSON `images_base64`)."""

        async def work() -> dict:
            uploads, b64s = list(images), list(images_base64 or [])
            n = len(uploads) + len(b64s)
            if n == 0:
                raise ApiError(400, "missing_image", "send images: multipart field 'images' (repeated) or JSON list 'images_base64'")
            if n > self.settings.max_batch_images:
                raise ApiError(413, "too_many_images", f"{n} images; the limit per call is {self.settings.max_batch_images}")
            raws = [self._image_bytes(u, None, "images") for u in uploads] + [self._image_bytes(None, b, "images") for b in b64s]
            return {"predictions": await self._predict(raws, faces, whole_image_if_no_face)}

        return await self._answer(ctx, work())

    @bentoml.api
    async def predict_sequence(
        self, ctx: bentoml.Context, frames: list[Path] = [], frames_base64: list[str] | None = None,
        video: list[Path] = [], video_base64: str | None = None, faces: bool = False, ema_alpha: float = 0.5,
    ) -> dict:
        """Several frames (images) or one short video: per-frame scores and the clip's aggregate.

        With `faces=true` each frame is read from its largest face (the whole frame if none).
        """

        async def work() -> dict:
            served = self._require_served()
            if not 0 < ema_alpha <= 1:
                raise ApiError(422, "invalid_ema_alpha", f"ema_alpha must be in (0, 1]; got {ema_alpha}")
            mode = "largest" if faces else "whole"
            given_frames = len(frames) + len(frames_base64 or [])
            given_video = len(video) + (video_base64 is not None)
            if bool(given_frames) == bool(given_video) or given_video > 1:
                raise ApiError(400, "bad_sequence", "send either frames (`frames` / `frames_base64`, one or more images) or one `video` / `video_base64`")
            if given_frames:
                if given_frames > self.settings.max_sequence_frames:
                    raise ApiError(413, "too_many_frames", f"{given_frames} frames; the limit is {self.settings.max_sequence_frames}")
                raws = [self._image_bytes(f, None, "frames") for f in frames] + [self._image_bytes(None, b, "frames") for b in frames_base64 or []]
                regions = await asyncio.gather(*(asyncio.to_thread(self._regions, r, served.preprocessing, mode, "frames") for r in raws))
                times = [float(i) for i in range(len(raws))]
            else:
                data = self._image_bytes(video[0] if video else None, video_base64, "video")
                try:
                    decoded = await asyncio.to_thread(decode_video, data, self.settings.max_sequence_frames, self.settings.max_video_seconds)
                except SequenceError as exc:
                    raise ApiError(413 if exc.code == "video_too_long" else 415 if exc.code == "not_a_video" else 400, exc.code, str(exc)) from None
                times = [t for t, _ in decoded]
                regions = await asyncio.gather(*(asyncio.to_thread(self._regions_of, img, None, served.preprocessing, mode) for _, img in decoded))
            flat = [r[0] for r in regions]
            emb = await self._embed(served, np.stack([r.array for r in flat]))
            answers = await asyncio.to_thread(self._answers, served, emb, flat)
            for answer, t in zip(answers, times):
                answer["time_s" if given_video else "index"] = t if given_video else int(t)
            probs = np.array([[a["probabilities"][c] for c in served.classes] for a in answers])
            return {"frame_count": len(answers), "frames": answers, "aggregate": aggregate(probs, served.classes, ema_alpha),
                    "task": self.task, "backbone_version": served.head.backbone_version, "head_version": served.head.version}

        return await self._answer(ctx, work())

    @bentoml.api
    async def feedback(
        self, ctx: bentoml.Context, label: str, image: list[Path] = [], image_base64: str | None = None,
        prediction_id: str | None = None, idempotency_key: str | None = None, face_crop: bool = False,
    ) -> dict:
        """Tell the model the true label of an image, or of an earlier prediction (prediction_id).

        `face_crop=true` learns from the largest face in the image (the whole image if none).
        """

        async def work() -> dict:
            served = self._require_served()
            if label not in served.classes:
                raise ApiError(422, "unknown_label", f"label {label!r} is not one of this task's labels", accepted=served.classes)
            predicted = None
            if prediction_id is not None:
                if image or image_base64 is not None:
                    raise ApiError(400, "ambiguous_feedback", "give either prediction_id or an image, not both")
                pred = await asyncio.to_thread(self.queue.get_prediction, prediction_id)
                if pred is None or pred["task"] != self.task:
                    raise ApiError(404, "unknown_prediction_id", f"no recent prediction {prediction_id!r}; send the image instead")
                embedding, backbone_version, raw, predicted = pred["embedding"], pred["backbone_version"], pred["image"], pred["label"]
            else:
                region = (await asyncio.to_thread(
                    self._regions, self._one_image(image, image_base64), served.preprocessing, "largest" if face_crop else "whole"))[0]
                raw = region.image
                embedding = (await self._embed(served, region.array[None]))[0]
                backbone_version = served.head.backbone_version
            feedback_id, duplicate = await asyncio.to_thread(
                self.queue.add, task=self.task, label=label, embedding=embedding, backbone_version=backbone_version,
                image=raw if self.settings.store_feedback_images else None, prediction_id=prediction_id,
                predicted_label=predicted, idempotency_key=idempotency_key,
            )
            depth = await asyncio.to_thread(self.queue.depth, self.task)
            if not duplicate:
                metrics.FEEDBACK.labels(label=label, task=self.task).inc()
            metrics.QUEUE_DEPTH.labels(task=self.task).set(depth)
            self.updater.nudge(depth)
            return {"feedback_id": feedback_id, "queue_depth": depth, "duplicate": duplicate, "label": label}

        return await self._answer(ctx, work())

    @bentoml.api(route="/admin/update")
    async def admin_update(self, ctx: bentoml.Context, force: bool = False) -> dict:
        """Run an online update now (needs `Authorization: Bearer $INFANTINO_ADMIN_TOKEN`)."""

        async def work() -> dict:
            token = self.settings.admin_token
            if not token:
                raise ApiError(403, "admin_disabled", "admin endpoints are off; set INFANTINO_ADMIN_TOKEN to enable them")
            if ctx.request.headers.get("authorization", "") != f"Bearer {token}":
                raise ApiError(401, "unauthorized", "missing or wrong bearer token")
            report = await asyncio.to_thread(self.updater.run_once, True)
            if report is None:
                raise ApiError(409, "update_not_run", "no queued feedback, or another worker holds the update lease")
            return report.to_dict()

        return await self._answer(ctx, work())
