"""The public API service: POST /predict, /predict_batch, /predict_sequence, /feedback, /admin/update, /admin/rollback;
GET /model; DELETE /feedback/{id}, /predictions/{id}; and the web page at / with its data under /ui (``service.web``;
Swagger UI at /docs). Tokens and the feedback rate limit: ``service.access``.

Endpoints are thin: they read uploads (``service.inputs``), cut regions (``infantino.regions``),
embed them (in this worker, or in the backbone service: INFANTINO_BACKBONE_PLACEMENT, ``service.embedding``), build answers
(``service.answers``) and store what must survive (``store``). One service answers every
enabled task (INFANTINO_TASKS) in one response. Each worker follows every task's champion
(``service.models``) and runs every task's online updater (``online.updater``), which takes a
lease in the shared store so only one update per task runs at a time. Background work starts
in ``__init__`` and stops in the shutdown hook.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from fastapi import FastAPI, Request
from pydantic import Field
from starlette.responses import JSONResponse, Response

from infantino.faces import create_detector
from infantino.images import ImageError, Preprocessing, open_image, shared_input
from infantino.periodic import Periodic
from infantino.regions import Mode, Region, find_regions
from infantino.settings import get_settings, redact
from online.updater import UpdateReport, Updater
from registry.store import RegistryError, RegistryUnavailable, as_registry_error
from service import metrics, web
from service.access import AccessGuard
from service.answers import Served, Snapshot, build_answers
from service.backbone import BackboneService, unpack_embeddings
from service.embedding import InlineBackbones, MicroBatcher, placement
from service.errors import ApiError, answers_errors, dependency_error, registry_unavailable
from service.health import ModelHealth
from service.heap import GcPauses, freeze_long_lived, heap_report
from service.inputs import Uploads
from service.middleware import RequestGuard
from service.models import ChampionFollower
from service.process import stop_with_server
from service.recorder import PredictionRecorder
from service.shadow import ShadowChallenger
from service.schemas import (Answer, BatchAnswer, Clip, FacesAnswer, FeedbackAck, Frame, ItemError, RollbackAnswer, SequenceAnswer,
                             UpdateAnswer)
from service.sequence import SequenceError, aggregate, decode_video
from store import IdempotencyConflict, Stores, UnknownPrediction
from store.schema import DOMAIN_PATTERN, MAX_ID, MAX_KEY

log = logging.getLogger(__name__)
SETTINGS = get_settings()
PLACEMENT = placement(SETTINGS)  # where the backbone runs: "inline" in each API worker, or the "service" (service/embedding.py)
stop_with_server()  # a worker imports this module: it ends when its server does (service/process.py)
PREDICTION_RETENTION_PRUNE_S = 300.0  # how often old predictions are deleted, at most (and at least 4 times per retention period)
# Registry calls of requests (GET /model, rollback, update now) run on their own small pool, never on
# the one /predict and /feedback use: a registry that hangs can hold these threads, not the others.
REGISTRY_THREADS = 2
# Where a request or a feedback item comes from, as the client names it (e.g. "infant"): feedback naming a
# domain teaches the model that domain's class mix, used for requests naming it (heads/domain.py).
DomainName = Annotated[str | None, Field(pattern=DOMAIN_PATTERN, description="the domain the image comes from, e.g. infant")]
UPDATE_TIMEOUT_S = 600.0  # an update teaches, cross-fits and registers: longer than one registry call

# GET routes beside BentoML's POST APIs; methods of the service class get `self` (BentoML's class views).
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
web.install(app)  # the page at /, Swagger UI at /docs, static files under /web


class ServedHead(ChampionFollower):
    """One task's champion head in this worker, with the preprocessing of its backbone."""

    def __init__(self, task: str, health: ModelHealth, inline: InlineBackbones | None = None):
        self.served: Served | None = None
        self.health = health
        self.shadow = ShadowChallenger(task)  # the newest challenger, scored on live traffic (service/shadow.py)
        self.inline = inline
        super().__init__(SETTINGS, task)
        health.follow(task, self.source)

    def current_head_version(self) -> str | None:
        return self.served.head.version if self.served else None

    def aliases_seen(self, aliases: dict[str, str]) -> None:
        if SETTINGS.online.shadow_challenger:
            self.shadow.follow(aliases, self.served.head if self.served else None, self.source.load_head)

    def switch(self, head_version: str | None) -> None:
        head = self.source.load_head(head_version)
        if self.inline is not None:  # its backbone first: this worker never serves a head without it
            self.inline.prepare(self.task, self.source, head.backbone_version, fallback=head_version is None)
        self.served = Served(head, self.source.backbone_preprocessing(head.backbone_version))  # atomic swap
        metrics.SERVED_VERSION.labels(task=self.task, kind="head").set(float(head.version))
        metrics.SERVED_VERSION.labels(task=self.task, kind="backbone").set(float(head.backbone_version))
        log.info("%s: serving head v%s (backbone v%s)", self.task, head.version, head.backbone_version)
        self.health.head_switched(self.task, head, self.source.registry)  # its training label distribution, once per lineage


@bentoml.service(name="infantino", workers=SETTINGS.serving.api_workers, traffic={"timeout": 60})
@bentoml.asgi_app(app, path="/")
class InfantinO:
    if PLACEMENT == "service":  # a separate process; inline, none is started
        backbone = bentoml.depends(BackboneService)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.default_task = SETTINGS.models.default_task
        self.stores = Stores.open(SETTINGS.storage.database_url)
        self.uploads = Uploads(SETTINGS.limits)
        self.detector = create_detector(SETTINGS.faces.face_detector, SETTINGS.faces.face_model_path)
        self.health = ModelHealth(SETTINGS.models.tasks, self.stores.db.ping, SETTINGS.models.model_poll_s)
        self.inline = InlineBackbones(SETTINGS) if PLACEMENT == "inline" else None
        self.batcher = None if self.inline is None else MicroBatcher(
            lambda key, images: self.inline.embed(dict(key), images), SETTINGS.serving.batch_max_size,
            SETTINGS.serving.inline_batch_wait_ms / 1000, on_batch=metrics.INLINE_BATCH.observe)
        self.heads = {task: ServedHead(task, self.health, self.inline) for task in SETTINGS.models.tasks}
        self.recorder = PredictionRecorder(self.stores.predictions)
        self.registry_calls = ThreadPoolExecutor(REGISTRY_THREADS, thread_name_prefix="registry-call")
        self.updaters = {
            task: Updater(SETTINGS.online, heads.source.registry, self.stores.feedback, self.stores.lease,
                          embed=functools.partial(self._embed_stored, task), on_report=self._on_update)
            for task, heads in self.heads.items()
        }
        retention = SETTINGS.privacy.prediction_retention_s
        self.pruner = Periodic(lambda: self.stores.predictions.prune(retention), min(PREDICTION_RETENTION_PRUNE_S, retention / 4),
                               "prediction-pruner")
        # Background work of this worker, started here and stopped by the shutdown hook.
        self.background = [self.health, *self.heads.values(), self.recorder, *self.updaters.values(), self.pruner]
        for part in self.background:
            part.start()
        freeze_long_lived()  # the modules and models loaded so far: no full GC pass walks them again
        # The collector's pauses from here on (the one above is start-up's).
        self.background.append(GcPauses(lambda generation, seconds: metrics.GC_PAUSE.labels(generation=str(generation)).observe(seconds)).start())

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        for part in reversed(self.background):
            part.stop()
        if self.batcher is not None:
            self.batcher.stop()
        self.registry_calls.shutdown(wait=False, cancel_futures=True)
        self.stores.db.close()

    async def _on_registry(self, fn, *args, timeout_s: float | None = None):
        """``fn(*args)`` on the registry pool, given up after the registry's own timeouts (a 503
        registry_unavailable); connection failures become RegistryUnavailable."""
        storage = self.settings.storage
        timeout_s = timeout_s or storage.registry_timeout_s * (storage.registry_retries + 1) * 3
        future = asyncio.get_running_loop().run_in_executor(self.registry_calls, functools.partial(as_registry_error, fn, *args))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise registry_unavailable() from None

    def __is_ready__(self) -> bool:
        return all(h.served is not None for h in self.heads.values())

    # ---- models -------------------------------------------------------------------------------
    def _snapshot(self) -> Snapshot:
        snapshot = {task: heads.served for task, heads in self.heads.items()}
        missing = [task for task, served in snapshot.items() if served is None]
        if missing:
            raise ApiError(503, "not_ready", f"models of {', '.join(missing)} are not loaded yet; retry shortly")
        return snapshot

    def _task(self, task: str | None) -> str:
        if task is None:
            return self.default_task
        if task not in self.heads:
            raise ApiError(422, "unknown_task", "that task is not served here", accepted=list(self.heads))
        return task

    def _input(self, snapshot: Snapshot) -> Preprocessing:
        """The array every task's backbone can take its input from (see infantino.images.shared_input),
        framed as the default task's model expects."""
        return shared_input([served.preprocessing for served in snapshot.values()])

    def _on_update(self, report: UpdateReport) -> None:
        self.health.updated(report)
        if report.promoted:
            self.heads[report.task].watcher.check_now()

    # ---- the pipeline: bytes -> regions -> embeddings -> answers --------------------------------
    def _regions(self, raw: bytes, prep: Preprocessing, mode: Mode, field: str = "image") -> list[Region]:
        try:
            # Whole images only go to the model size: decode JPEGs at reduced scale. Face search needs the detail.
            img = open_image(raw, self.settings.limits.max_image_bytes, self.settings.limits.max_image_pixels,
                             reduce_to=prep.input_size if mode == "whole" else None)
        except ImageError as exc:
            raise ApiError.from_image_error(exc, field) from None
        return self._regions_of(img, prep, mode, original=raw)

    def _regions_of(self, img, prep: Preprocessing, mode: Mode, original: bytes | None = None) -> list[Region]:
        return find_regions(img, prep, mode, self.detector, original=original, keep_images=self.settings.privacy.store_feedback_images,
                            max_faces=self.settings.faces.max_faces, margin=self.settings.faces.face_margin)

    async def _embed(self, snapshot: Snapshot, arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Each task's embeddings of ``arrays``, made by the backbone its served head was trained on."""
        step = self.settings.serving.batch_max_size  # larger calls would be refused by the runner's dispatcher
        if self.batcher is not None:  # inline: the versions the snapshot's heads name, shared with concurrent requests
            key = tuple((task, served.head.backbone_version) for task, served in snapshot.items())
            parts = await asyncio.gather(*(self.batcher(key, arrays[i : i + step]) for i in range(0, len(arrays), step)))
            return parts[0] if len(parts) == 1 else {task: np.concatenate([p[task] for p in parts]) for task in snapshot}

        async def call(chunk: np.ndarray):
            try:
                return await self.backbone.to_async.embed(chunk)
            except aiohttp.ClientConnectionError:  # a recycled connection: the call is safe to repeat once
                return await self.backbone.to_async.embed(chunk)

        try:
            parts = await asyncio.gather(*(call(arrays[i : i + step]) for i in range(0, len(arrays), step)))
        except (bentoml.exceptions.ServiceUnavailable, aiohttp.ClientConnectionError):
            raise ApiError(503, "overloaded", "the backbone runner is overloaded or restarting; retry shortly") from None
        unpacked = unpack_embeddings(np.concatenate([np.asarray(p) for p in parts]), list(snapshot))
        out = {}
        for task, (embeddings, made_by) in unpacked.items():
            wanted = snapshot[task].head.backbone_version
            if made_by != {wanted}:
                raise ApiError(503, "model_swap", f"the {task} backbone is switching versions ({sorted(made_by)} -> v{wanted}); retry")
            out[task] = embeddings
        return out

    def _embed_stored(self, task: str, images: list[bytes], backbone_version: str) -> np.ndarray:
        """For ``task``'s updater (a background thread): stored images -> embeddings by ``backbone_version``."""
        prep = self._snapshot()[task].preprocessing
        arrays = np.stack([self._regions_of(open_image(img, reduce_to=prep.input_size), prep, "whole")[0].array for img in images])
        if self.inline is not None:
            return self.inline.embed({task: backbone_version}, arrays)[task]
        unpacked = unpack_embeddings(np.asarray(self.backbone.embed(arrays)), list(self.heads))
        embeddings, made_by = unpacked[task]
        if made_by != {backbone_version}:
            raise RuntimeError(f"the backbone service serves {sorted(made_by)}, not v{backbone_version}, yet; retry later")
        return embeddings

    async def _classify(self, snapshot: Snapshot, regions: list[Region], domain: str | None = None) -> list[Answer]:
        """Answers for ``regions``, returned once every prediction is committed (so /feedback can name it anywhere)."""
        if not regions:
            return []
        with metrics.stage_timer("embed"):
            embeddings = await self._embed(snapshot, np.stack([r.array for r in regions]))
        with metrics.stage_timer("answer"):
            answers, records = await asyncio.to_thread(build_answers, snapshot, embeddings, regions, self.default_task, domain)
        self.health.predicted(records)
        for task, served in snapshot.items():
            if self.heads[task].shadow.head is not None:
                await asyncio.to_thread(self.heads[task].shadow.scored, embeddings[task], [r["label"] for r in records if r["task"] == task],
                                        served.head.backbone_version)
        try:
            with metrics.stage_timer("record"):
                await self.recorder.record(records)
        except Exception as exc:
            if dependency_error(exc) is None:
                raise
            # The database is down: the answer still stands, but nothing can name it later.
            metrics.UNRECORDED.inc(len(records))
            for answer in answers:
                answer.prediction_id = None
                for prediction in answer.tasks.values():
                    prediction.prediction_id = None
        return answers

    async def _predict(self, raws: list[bytes | ApiError], faces: bool, whole_image_if_no_face: bool,
                       domain: str | None = None) -> list[Answer | FacesAnswer | ApiError]:
        """One answer per upload: a prediction, or (faces=True) every face found with its box; an
        upload that cannot be read answers its ApiError, and the others are answered all the same."""
        snapshot = self._snapshot()
        prep = self._input(snapshot)

        async def regions_of(raw: bytes | ApiError) -> list[Region] | ApiError:
            if isinstance(raw, ApiError):
                return raw
            try:
                regions = await asyncio.to_thread(self._regions, raw, prep, "all" if faces else "whole")
                if faces and whole_image_if_no_face and not regions:
                    regions = await asyncio.to_thread(self._regions, raw, prep, "whole")
                return regions
            except ApiError as exc:
                return exc

        with metrics.stage_timer("regions"):
            per_image = await asyncio.gather(*(regions_of(r) for r in raws))
        answers = await self._classify(snapshot, [region for regions in per_image if not isinstance(regions, ApiError) for region in regions],
                                       domain)
        out: list[Answer | FacesAnswer | ApiError] = []
        i = 0
        for regions in per_image:
            if isinstance(regions, ApiError):
                out.append(regions)
                continue
            mine, i = answers[i : i + len(regions)], i + len(regions)
            if not faces:
                out.append(mine[0])
                continue
            found = [a for a, r in zip(mine, regions) if r.face is not None]
            whole = next((a for a, r in zip(mine, regions) if r.face is None), None)
            out.append(FacesAnswer(face_count=len(found), faces=found, whole_image=whole,
                                   message=None if found else "no face found" + ("; classified the whole image" if whole else "")))
        return out

    # ---- endpoints ------------------------------------------------------------------------------
    # File inputs are typed list[Path] (empty when absent): BentoML 1.4 cannot parse an
    # optional multipart file (`Path | None` skips its file handling; Optional[Path] fails on 3.11).
    @bentoml.api
    @answers_errors
    async def predict(self, image: list[Path] = [], image_base64: str | None = None, faces: bool = False,
                      whole_image_if_no_face: bool = True, domain: DomainName = None) -> Answer | FacesAnswer:
        """Classify one image (multipart field `image`, or JSON `image_base64`) for every served task.

        With `faces=true`, every face found is classified, each with its box; when none is
        found the answer says so (and classifies the whole image unless told not to).
        `domain` names where the image comes from (e.g. `infant`): answered with what feedback
        naming that domain taught the model of its class mix.
        """
        answer = (await self._predict([self.uploads.one(image, image_base64)], faces, whole_image_if_no_face, domain))[0]
        if isinstance(answer, ApiError):
            raise answer
        return answer

    @bentoml.api
    @answers_errors
    async def predict_batch(self, images: list[Path] = [], images_base64: list[str] | None = None, faces: bool = False,
                            whole_image_if_no_face: bool = True, domain: DomainName = None) -> BatchAnswer:
        """Classify several images in one call (multipart `images`, or JSON `images_base64`).

        Answers per item: an image that cannot be read gets its error (with its `index`), the others their predictions.
        """
        raws = self.uploads.many(images, images_base64, "images", self.settings.limits.max_batch_images, per_item=True)
        answers = await self._predict(raws, faces, whole_image_if_no_face, domain)
        return BatchAnswer(predictions=[ItemError(**a.body.model_dump(), index=i) if isinstance(a, ApiError) else a
                                        for i, a in enumerate(answers)])

    @bentoml.api
    @answers_errors
    async def predict_sequence(self, frames: list[Path] = [], frames_base64: list[str] | None = None, video: list[Path] = [],
                               video_base64: str | None = None, faces: bool = False, ema_alpha: float = 0.5,
                               domain: DomainName = None) -> SequenceAnswer:
        """Several frames (images) or one short video: per-frame scores and the clip's aggregate.

        With `faces=true` each frame is read from its largest face (the whole frame if none).
        """
        snapshot = self._snapshot()
        prep = self._input(snapshot)
        if not 0 < ema_alpha <= 1:
            raise ApiError(422, "invalid_ema_alpha", f"ema_alpha must be in (0, 1]; got {ema_alpha}")
        mode: Mode = "largest" if faces else "whole"
        given_frames = len(frames) + len(frames_base64 or [])
        given_video = len(video) + (video_base64 is not None)
        if bool(given_frames) == bool(given_video) or given_video > 1:
            raise ApiError(400, "bad_sequence", "send either frames (`frames` / `frames_base64`, one or more images) or one `video` / `video_base64`")
        limits = self.settings.limits
        if given_frames:
            raws = self.uploads.many(frames, frames_base64, "frames", limits.max_sequence_frames, what="frames")
            regions = await asyncio.gather(*(asyncio.to_thread(self._regions, r, prep, mode, "frames") for r in raws))
            stamps = [{"index": i} for i in range(len(raws))]
        else:
            data = self.uploads.one(video, video_base64, "video")
            try:
                decoded = await asyncio.to_thread(decode_video, data, limits.max_sequence_frames, limits.max_video_seconds)
            except SequenceError as exc:
                raise ApiError({"video_too_long": 413, "not_a_video": 415}.get(exc.code, 400), exc.code, str(exc)) from None
            regions = await asyncio.gather(*(asyncio.to_thread(self._regions_of, img, prep, mode) for _, img in decoded))
            stamps = [{"time_s": t} for t, _ in decoded]
        answers = await self._classify(snapshot, [r[0] for r in regions], domain)
        clips = {}
        for task, served in snapshot.items():
            probs = np.array([[a.tasks[task].probabilities[c] for c in served.classes] for a in answers])
            clips[task] = Clip(aggregate=aggregate(probs, served.classes, ema_alpha), task=task,
                               backbone_version=served.head.backbone_version, head_version=served.head.version)
        frames_out = [Frame(**a.model_dump(exclude={"tasks"}), tasks=a.tasks, **stamp) for a, stamp in zip(answers, stamps)]
        return SequenceAnswer(**clips[self.default_task].model_dump(), frame_count=len(answers), frames=frames_out, tasks=clips)

    @bentoml.api
    @answers_errors
    async def feedback(self, label: str, image: list[Path] = [], image_base64: str | None = None,
                       prediction_id: Annotated[str | None, Field(max_length=MAX_ID)] = None,
                       idempotency_key: Annotated[str | None, Field(max_length=MAX_KEY)] = None,
                       face_crop: bool = False, task: str | None = None, domain: DomainName = None) -> FeedbackAck:
        """Tell the model the true label of an image, or of an earlier prediction (prediction_id).

        `task` names whose label it is (default: the first served task; with a prediction_id,
        that prediction's task). `face_crop=true` learns from the largest face in the image.
        `domain` names where the image comes from (default: with a prediction_id, the domain that
        prediction named): the model learns that domain's class mix for requests naming it.
        """
        snapshot = self._snapshot()
        asked = self._task(task) if task is not None else None
        feedback = self.stores.feedback
        keep_images = self.settings.privacy.store_feedback_images
        try:
            if prediction_id is not None:
                if image or image_base64 is not None:
                    raise ApiError(400, "ambiguous_feedback", "give either prediction_id or an image, not both")
                # task, label, head version (and the embedding, when a challenger is scored in shadow)
                answered = await asyncio.to_thread(self.stores.predictions.answered, prediction_id,
                                                   with_embedding=any(h.shadow.head is not None for h in self.heads.values()))
                which = answered["task"] if answered else None
                if which is None or which not in snapshot or asked not in (None, which):
                    raise UnknownPrediction(prediction_id)
                self._check_label(snapshot[which], which, label)
                feedback_id, duplicate = await asyncio.to_thread(
                    feedback.add_from_prediction, prediction_id, label=label, task=which, keep_image=keep_images,
                    idempotency_key=idempotency_key, domain=domain)
            else:
                which = asked or self.default_task
                self._check_label(snapshot[which], which, label)
                raw = self.uploads.one(image, image_base64)
                region = (await asyncio.to_thread(self._regions, raw, self._input(snapshot), "largest" if face_crop else "whole"))[0]
                embedding = (await self._embed(snapshot, region.array[None]))[which][0]
                feedback_id, duplicate = await asyncio.to_thread(
                    feedback.add, task=which, label=label, embedding=embedding, backbone_version=snapshot[which].head.backbone_version,
                    image=region.image if keep_images else None, idempotency_key=idempotency_key, domain=domain)
        except UnknownPrediction:
            raise ApiError(404, "unknown_prediction_id", "no recent prediction with that id" + (f" of task {asked!r}" if asked else "")
                           + "; send the image instead") from None
        except IdempotencyConflict as exc:
            raise ApiError(409, "idempotency_conflict", f"{exc}; use a new key for new feedback") from None
        depth = await asyncio.to_thread(feedback.depth, which)
        if not duplicate:
            metrics.FEEDBACK.labels(label=label, task=which).inc()
            if prediction_id is not None:
                self.health.feedback_on(which, label, answered)  # live accuracy: did it agree with the prediction?
                self.heads[which].shadow.feedback_on(label, answered.get("embedding"), answered.get("backbone_version"))
        metrics.QUEUE_DEPTH.labels(task=which).set(depth)
        self.updaters[which].nudge(depth)
        return FeedbackAck(feedback_id=feedback_id, queue_depth=depth, duplicate=duplicate, label=label, task=which)

    @staticmethod
    def _check_label(served: Served, task: str, label: str) -> None:
        if label not in served.classes:
            raise ApiError(422, "unknown_label", f"that label is not one of the {task} task's labels", accepted=served.classes)

    @bentoml.api(route="/admin/update")
    @answers_errors
    async def admin_update(self, ctx: bentoml.Context, force: bool = False, task: str | None = None) -> UpdateAnswer:
        """Run an online update of `task` (default: the first served) now.

        Needs `Authorization: Bearer $INFANTINO_ADMIN_TOKEN`.
        """
        web.require_admin(self.settings.security.admin_token, ctx.request.headers.get("authorization"))
        which = self._task(task)
        try:
            report = await self._on_registry(self.updaters[which].run_once, True, timeout_s=UPDATE_TIMEOUT_S)
        except RegistryUnavailable:
            raise registry_unavailable() from None
        except RegistryError as exc:  # e.g. an empty registry: no champion to teach
            raise ApiError(409, "update_not_possible", redact(exc)[:300]) from None
        if report is None:
            raise ApiError(409, "update_not_run", f"no queued {which} feedback, or another worker holds the update lease")
        return UpdateAnswer(**report.to_dict())

    # ---- GET routes -----------------------------------------------------------------------------
    @app.get("/health/detail")
    async def health_detail(self) -> JSONResponse:
        """What /readyz does not say: served versions, the registry and database as this worker last found them
        (no network call is made to answer), and the label drift; `status` ok, degraded (a dependency down) or not_ready."""
        served = {task: None if h.served is None else {"head_version": h.served.head.version,
                                                        "backbone_version": h.served.head.backbone_version}
                  for task, h in self.heads.items()}
        detail = self.health.detail(served)
        for task, h in self.heads.items():
            detail["tasks"][task]["shadow"] = h.shadow.report()
        detail["heap"] = heap_report()  # this worker's (service/heap.py)
        return JSONResponse(detail, status_code=200 if detail["ready"] else 503)

    @app.get("/model")
    @answers_errors
    async def model_info(self) -> JSONResponse:
        """Served versions, labels, preprocessing and queue of every task; the default task's at the top level.
        What the registry says of them (tags, metrics) is added when it answers in time."""
        snapshot = self._snapshot()
        tasks = {}
        for task, served in snapshot.items():
            out = {"task": task, "labels": served.classes, "preprocessing": served.preprocessing.to_dict(),
                   "queue": await asyncio.to_thread(self.stores.feedback.counts, task),
                   "tracking_uri": self.heads[task].source.registry.display_uri}
            for kind, version in (("head", served.head.version), ("backbone", served.head.backbone_version)):
                entry = {"name": self.heads[task].source.registry.names[kind], "version": version}
                try:
                    entry.update(await self._on_registry(self._registered, task, kind, version))
                except ApiError as exc:  # registry down: still describe what is served
                    entry["registry_error"] = exc.body.message
                except Exception as exc:
                    entry["registry_error"] = redact(exc)[:300]  # MLflow's errors quote the tracking URI
                out[kind] = entry
            tasks[task] = out
        return JSONResponse({**tasks[self.default_task], "tasks": tasks})

    def _registered(self, task: str, kind: str, version: str) -> dict:
        reg = self.heads[task].source.registry
        mv = reg.version_info(kind, version)
        return {"tags": dict(mv.tags), "metrics": reg.run_metrics(mv.run_id) if mv.run_id else {}}

    # ---- the web page's data (service/web.py) ---------------------------------------------------
    @bentoml.api(route="/admin/rollback")
    @answers_errors
    async def admin_rollback(self, ctx: bentoml.Context, task: str | None = None) -> RollbackAnswer:
        """Make the previous champion head of `task` (default: the first served) champion again.

        Needs `Authorization: Bearer $INFANTINO_ADMIN_TOKEN`.
        """
        web.require_admin(self.settings.security.admin_token, ctx.request.headers.get("authorization"))
        which = self._task(task)
        registry = self.heads[which].source.registry
        try:
            before = await self._on_registry(registry.champion_version, "head")
            now = await self._on_registry(registry.rollback, "head")
        except RegistryUnavailable:
            raise registry_unavailable() from None
        except RegistryError as exc:
            raise ApiError(409, "rollback_not_possible", str(exc)) from None
        await self._on_registry(self.heads[which].watcher.check_now)
        return RollbackAnswer(task=which, head_version=now, rolled_back_version=before or "")

    def _web_status(self) -> dict:
        return web.status({task: heads.served for task, heads in self.heads.items()}, self.stores.feedback, self.settings)

    @app.get("/ui/status")
    @answers_errors
    async def ui_status(self) -> JSONResponse:
        """Served versions, labels and queue of every task, and what the page may offer (images kept, admin on)."""
        return JSONResponse(await asyncio.to_thread(self._web_status))

    @app.get("/ui/events", include_in_schema=False)
    async def ui_events(self) -> Response:
        """/ui/status as server-sent events, sent whenever it changes (a new champion, a longer queue)."""
        return web.event_stream(self._web_status)

    @app.get("/ui/review")
    @answers_errors
    async def ui_review(self, request: Request, task: str | None = None, order: str = "margin", limit: int = 24,
                        within_s: float | None = None) -> JSONResponse:
        """The recent predictions the model was least sure of, not yet labelled, with their crops. Admin token."""
        web.require_admin(self.settings.security.admin_token, request.headers.get("authorization"))
        which = self._task(task)
        served = self._snapshot()[which]
        return JSONResponse(await asyncio.to_thread(web.review, self.stores.predictions, which, served.classes, self.settings,
                                                    limit, order, within_s))

    @app.get("/ui/history")
    @answers_errors
    async def ui_history(self, task: str | None = None) -> JSONResponse:
        """Every head version of `task`: origin, parent, gate verdict and reason, accuracies, aliases."""
        which = self._task(task)
        return JSONResponse(await self._on_registry(web.history, self.heads[which].source.registry))

    # ---- deletion (admin token) ---------------------------------------------------------------------
    # What a registered head learned from an item stays in that head (and its lineage names the item's id).
    @app.delete("/feedback/{feedback_id}")
    @answers_errors
    async def delete_feedback(self, feedback_id: str, request: Request) -> JSONResponse:
        """Delete one feedback item with its image and embedding: `{"deleted": 1}`, or 404. Admin token."""
        web.require_admin(self.settings.security.admin_token, request.headers.get("authorization"))
        deleted = len(feedback_id) <= MAX_ID and await asyncio.to_thread(self.stores.feedback.delete, feedback_id)
        if not deleted:
            raise ApiError(404, "unknown_feedback_id", "no feedback item with that id")
        return JSONResponse({"deleted": 1, "feedback": 1, "predictions": 0})

    @app.delete("/predictions/{prediction_id}")
    @answers_errors
    async def delete_prediction(self, prediction_id: str, request: Request) -> JSONResponse:
        """Delete a prediction with its image, and every feedback item made from it: `{"deleted": n}`, or 404. Admin token."""
        web.require_admin(self.settings.security.admin_token, request.headers.get("authorization"))
        if len(prediction_id) > MAX_ID:
            raise ApiError(404, "unknown_prediction_id", "no prediction or feedback with that prediction id")
        # The prediction first: once it is gone no new feedback can be made from it.
        predictions = int(await asyncio.to_thread(self.stores.predictions.delete, prediction_id))
        feedback = await asyncio.to_thread(self.stores.feedback.delete_for_prediction, prediction_id)
        if not predictions + feedback:
            raise ApiError(404, "unknown_prediction_id", "no prediction or feedback with that prediction id")
        return JSONResponse({"deleted": predictions + feedback, "feedback": feedback, "predictions": predictions})


# Tokens and the feedback rate limit, checked before any body is read (service/access.py); outside RequestGuard.
InfantinO.add_asgi_middleware(AccessGuard, security=SETTINGS.security)
# BentoML reads each API's input before the endpoint runs and answers its own failures there:
# RequestGuard gives those requests the service's 4xx error shape (see service/middleware.py).
InfantinO.add_asgi_middleware(RequestGuard, service=InfantinO)
# BentoML labels its request metrics by path: these routes (and the APIs') by name, any other path as one (service/metrics.py).
metrics.label_requests_by_route([*app.openapi()["paths"], "/", "/docs", "/docs.json", "/livez", "/readyz", "/healthz", "/metrics"])
# BentoML 1.4 works out an answer's media type from its output model's JSON schema, generated anew for every
# response unless the model names it (py-spy, 16 clients: 14% of the API worker's samples). Every API here answers JSON.
for _method in InfantinO.apis.values():
    _method.output_spec.media_type = _method.output_spec.media_type or "application/json"
