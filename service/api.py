"""The public API service: POST /predict, /predict_batch, /feedback, /admin/update; GET /model.

It decodes and resizes images (the same decoder training uses), asks the backbone service for
embeddings (adaptive batching happens there), applies the scikit-learn head, and writes each
prediction and feedback durably to the shared queue before answering. One service answers
every enabled task (INFANTINO_TASKS, each its own backbone, head and labels) in one response.
Every worker follows each task's champion on its own (``service.models.ChampionWatcher``) and
runs each task's online updater loop, which takes a lease in the shared store so only one
update per task runs at a time.
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
from infantino import EMBEDDING_DIM
from infantino.images import ImageError, Preprocessing, open_image, shared_input, to_model_array
from infantino.settings import get_settings
from online.queue import FeedbackQueue
from online.updater import Updater
from registry.store import LoadedHead
from service import metrics
from service.backbone import BackboneService
from service.errors import ApiError
from service.models import ChampionFollower
from service.recorder import PredictionRecorder
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
    """What one worker serves for one task right now; replaced as a whole on a swap."""

    head: LoadedHead
    preprocessing: Preprocessing

    @property
    def classes(self) -> list[str]:
        return self.head.classes


class ServedHead(ChampionFollower):
    """One task's champion head in this worker, with the preprocessing of its backbone."""

    def __init__(self, task: str):
        self.served: Served | None = None
        super().__init__(SETTINGS, task)

    def current_head_version(self) -> str | None:
        return self.served.head.version if self.served else None

    def switch(self, head_version: str | None) -> None:
        head = self.source.load_head(head_version)
        self.served = Served(head, self.source.backbone_preprocessing(head.backbone_version))  # atomic swap
        metrics.SERVED_VERSION.labels(task=self.task, kind="head").set(float(head.version))
        metrics.SERVED_VERSION.labels(task=self.task, kind="backbone").set(float(head.backbone_version))
        log.info("%s: serving head v%s (backbone v%s)", self.task, head.version, head.backbone_version)


# A snapshot of every task's Served, read once per request so a swap mid-request cannot mix versions.
Snapshot = dict[str, Served]


async def model_info(request: Request) -> JSONResponse:
    if _SERVICE is None or not _SERVICE.__is_ready__():
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
        self.default_task = SETTINGS.default_task
        self.queue = FeedbackQueue(SETTINGS.resolved_queue_url)
        self.recorder = PredictionRecorder(self.queue)
        self.detector = create_detector(SETTINGS.face_detector, SETTINGS.face_model_path)
        self.tasks = {task: ServedHead(task) for task in SETTINGS.tasks}
        self.updaters = {
            task: Updater(SETTINGS, heads.source.registry, self.queue, on_promoted=heads.watcher.check_now).start()
            for task, heads in self.tasks.items()
        }
        _SERVICE = self

    # ---- models -------------------------------------------------------------------------------
    def __is_ready__(self) -> bool:
        return all(t.served is not None for t in self.tasks.values())

    def _snapshot(self) -> Snapshot:
        snapshot = {task: heads.served for task, heads in self.tasks.items()}
        missing = [task for task, served in snapshot.items() if served is None]
        if missing:
            raise ApiError(503, "not_ready", f"models of {', '.join(missing)} are not loaded yet; retry shortly")
        return snapshot

    def _task(self, task: str | None) -> str:
        if task is None:
            return self.default_task
        if task not in self.tasks:
            raise ApiError(422, "unknown_task", f"task {task!r} is not served here", accepted=list(self.tasks))
        return task

    def describe(self) -> dict:
        """GET /model: every task's models; the default task's also at the top level (single-task clients)."""
        snapshot = self._snapshot()
        tasks = {task: self._describe_task(task, served) for task, served in snapshot.items()}
        return {**tasks[self.default_task], "tasks": tasks}

    def _describe_task(self, task: str, served: Served) -> dict:
        reg = self.tasks[task].source.registry
        out = {"task": task, "labels": served.classes, "preprocessing": served.preprocessing.to_dict(),
               "queue": self.queue.counts(task), "tracking_uri": reg.tracking_uri}
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
            # Whole images only go to the model size: decode JPEGs at reduced scale. Face search needs the detail.
            reduce_to = prep.input_size if faces == "whole" else None
            img = open_image(raw, self.settings.max_image_bytes, self.settings.max_image_pixels, reduce_to)
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

    @staticmethod
    def _input(snapshot: Snapshot) -> Preprocessing:
        """The array every task's backbone can take its input from (see infantino.images.shared_input)."""
        return shared_input([served.preprocessing for served in snapshot.values()])

    async def _embed(self, snapshot: Snapshot, arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Each task's embeddings of ``arrays``, made by the backbone its served head was trained on."""
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
        width = EMBEDDING_DIM + 1  # per task, in settings order: the embedding, then the backbone version
        embeddings = {}
        for i, (task, served) in enumerate(snapshot.items()):
            block = out[:, i * width : (i + 1) * width]
            made_by = {str(int(v)) for v in block[:, -1]}
            if made_by != {served.head.backbone_version}:
                raise ApiError(503, "model_swap", f"the {task} backbone is switching versions "
                                                  f"({sorted(made_by)} -> v{served.head.backbone_version}); retry")
            embeddings[task] = block[:, :-1]
        return embeddings

    def _task_answers(self, task: str, served: Served, emb: np.ndarray, regions: list[Region], records: list[dict]) -> list[dict]:
        """One task's answer per region; each is added to ``records`` so feedback can name it by prediction_id."""
        probs = served.head.model.predict_proba(emb)
        answers = []
        for e, p, region in zip(emb, probs, regions):
            best = int(p.argmax())
            label = served.classes[best]
            pid = uuid.uuid4().hex
            records.append(dict(
                prediction_id=pid, task=task, label=label, embedding=e, backbone_version=served.head.backbone_version,
                head_version=served.head.version, image=region.image if self.settings.store_feedback_images else None,
            ))
            metrics.PREDICTIONS.labels(label=label, task=task).inc()
            metrics.CONFIDENCE.labels(task=task).observe(float(p[best]))
            answers.append({
                "prediction_id": pid, "label": label, "confidence": float(p[best]),
                "probabilities": {c: float(v) for c, v in zip(served.classes, p)},
                "task": task, "backbone_version": served.head.backbone_version, "head_version": served.head.version,
            })
        return answers

    async def _answers(self, snapshot: Snapshot, embeddings: dict[str, np.ndarray], regions: list[Region]) -> list[dict]:
        """Per region: the default task's answer at the top level, every task's under "tasks";
        returned once every prediction is committed (so /feedback can name it anywhere)."""
        answers, records = await asyncio.to_thread(self._build_answers, snapshot, embeddings, regions)
        await self.recorder.record(records)
        return answers

    def _build_answers(self, snapshot: Snapshot, embeddings: dict[str, np.ndarray], regions: list[Region]) -> tuple[list[dict], list[dict]]:
        records: list[dict] = []
        per_task = {task: self._task_answers(task, served, embeddings[task], regions, records) for task, served in snapshot.items()}
        answers = []
        for i, region in enumerate(regions):
            by_task = {task: per_task[task][i] for task in snapshot}
            answer = {**by_task[self.default_task], "tasks": by_task}
            if region.face is not None:
                answer.update(box=list(region.face.box), detector_score=float(region.face.score))
            answers.append(answer)
        return answers, records

    def _one_image(self, uploads: list[Path], b64: str | None) -> bytes:
        if len(uploads) > 1:
            raise ApiError(400, "too_many_images", "this endpoint takes one image; use /predict_batch for several")
        return self._image_bytes(uploads[0] if uploads else None, b64, "image")

    async def _predict(self, raws: list[bytes], faces: bool = False, whole_image_if_no_face: bool = True) -> list[dict]:
        """One answer per upload: a prediction, or (faces=True) every face found with its box."""
        snapshot = self._snapshot()
        prep = self._input(snapshot)
        per_image = await asyncio.gather(*(asyncio.to_thread(self._regions, r, prep, "all" if faces else "whole") for r in raws))
        if faces and whole_image_if_no_face:
            per_image = [regions or await asyncio.to_thread(self._regions, raw, prep, "whole")
                         for regions, raw in zip(per_image, raws)]
        flat = [region for regions in per_image for region in regions]
        answers = []
        if flat:
            embeddings = await self._embed(snapshot, np.stack([r.array for r in flat]))
            answers = await self._answers(snapshot, embeddings, flat)
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
        """Classify one image (multipart field `image`, or JSON `image_base64`) for every served task.

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
            snapshot = self._snapshot()
            prep = self._input(snapshot)
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
                regions = await asyncio.gather(*(asyncio.to_thread(self._regions, r, prep, mode, "frames") for r in raws))
                times = [float(i) for i in range(len(raws))]
            else:
                data = self._image_bytes(video[0] if video else None, video_base64, "video")
                try:
                    decoded = await asyncio.to_thread(decode_video, data, self.settings.max_sequence_frames, self.settings.max_video_seconds)
                except SequenceError as exc:
                    raise ApiError(413 if exc.code == "video_too_long" else 415 if exc.code == "not_a_video" else 400, exc.code, str(exc)) from None
                times = [t for t, _ in decoded]
                regions = await asyncio.gather(*(asyncio.to_thread(self._regions_of, img, None, prep, mode) for _, img in decoded))
            flat = [r[0] for r in regions]
            embeddings = await self._embed(snapshot, np.stack([r.array for r in flat]))
            answers = await self._answers(snapshot, embeddings, flat)
            for answer, t in zip(answers, times):
                answer["time_s" if given_video else "index"] = t if given_video else int(t)
            clips = {}
            for task, served in snapshot.items():
                probs = np.array([[a["tasks"][task]["probabilities"][c] for c in served.classes] for a in answers])
                clips[task] = {"aggregate": aggregate(probs, served.classes, ema_alpha), "task": task,
                               "backbone_version": served.head.backbone_version, "head_version": served.head.version}
            return {"frame_count": len(answers), "frames": answers, **clips[self.default_task], "tasks": clips}

        return await self._answer(ctx, work())

    @bentoml.api
    async def feedback(
        self, ctx: bentoml.Context, label: str, image: list[Path] = [], image_base64: str | None = None,
        prediction_id: str | None = None, idempotency_key: str | None = None, face_crop: bool = False,
        task: str | None = None,
    ) -> dict:
        """Tell the model the true label of an image, or of an earlier prediction (prediction_id).

        `task` names whose label it is (default: the first served task; with a prediction_id,
        that prediction's task). `face_crop=true` learns from the largest face in the image.
        """

        async def work() -> dict:
            snapshot = self._snapshot()
            asked = self._task(task) if task is not None else None
            predicted = None
            if prediction_id is not None:
                if image or image_base64 is not None:
                    raise ApiError(400, "ambiguous_feedback", "give either prediction_id or an image, not both")
                pred = await asyncio.to_thread(self.queue.get_prediction, prediction_id)
                if pred is None or pred["task"] not in snapshot or asked not in (None, pred["task"]):
                    raise ApiError(404, "unknown_prediction_id", f"no recent prediction {prediction_id!r}"
                                   + (f" of task {asked!r}" if asked else "") + "; send the image instead")
                which = pred["task"]
                self._check_label(snapshot[which], which, label)
                embedding, backbone_version, raw, predicted = pred["embedding"], pred["backbone_version"], pred["image"], pred["label"]
            else:
                which = asked or self.default_task
                self._check_label(snapshot[which], which, label)
                region = (await asyncio.to_thread(
                    self._regions, self._one_image(image, image_base64), self._input(snapshot), "largest" if face_crop else "whole"))[0]
                raw = region.image
                embedding = (await self._embed(snapshot, region.array[None]))[which][0]
                backbone_version = snapshot[which].head.backbone_version
            feedback_id, duplicate = await asyncio.to_thread(
                self.queue.add, task=which, label=label, embedding=embedding, backbone_version=backbone_version,
                image=raw if self.settings.store_feedback_images else None, prediction_id=prediction_id,
                predicted_label=predicted, idempotency_key=idempotency_key,
            )
            depth = await asyncio.to_thread(self.queue.depth, which)
            if not duplicate:
                metrics.FEEDBACK.labels(label=label, task=which).inc()
            metrics.QUEUE_DEPTH.labels(task=which).set(depth)
            self.updaters[which].nudge(depth)
            return {"feedback_id": feedback_id, "queue_depth": depth, "duplicate": duplicate, "label": label, "task": which}

        return await self._answer(ctx, work())

    @staticmethod
    def _check_label(served: Served, task: str, label: str) -> None:
        if label not in served.classes:
            raise ApiError(422, "unknown_label", f"label {label!r} is not one of the {task} task's labels", accepted=served.classes)

    @bentoml.api(route="/admin/update")
    async def admin_update(self, ctx: bentoml.Context, force: bool = False, task: str | None = None) -> dict:
        """Run an online update of `task` (default: the first served) now.

        Needs `Authorization: Bearer $INFANTINO_ADMIN_TOKEN`.
        """

        async def work() -> dict:
            token = self.settings.admin_token
            if not token:
                raise ApiError(403, "admin_disabled", "admin endpoints are off; set INFANTINO_ADMIN_TOKEN to enable them")
            if ctx.request.headers.get("authorization", "") != f"Bearer {token}":
                raise ApiError(401, "unauthorized", "missing or wrong bearer token")
            which = self._task(task)
            report = await asyncio.to_thread(self.updaters[which].run_once, True)
            if report is None:
                raise ApiError(409, "update_not_run", f"no queued {which} feedback, or another worker holds the update lease")
            return {**report.to_dict(), "task": which}

        return await self._answer(ctx, work())
