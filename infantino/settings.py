"""Every setting, grouped by concern, read from the environment (``INFANTINO_<NAME>``).

Each group is its own small settings class, so code asks for the concern it needs
(``settings.online.update_min_items``) and the README's configuration table is generated
from the descriptions here (``infantino settings`` prints it; a test keeps the README equal
to it). Env names stay flat: the group is for readers, not for typing.

Embedded defaults keep state under ``INFANTINO_HOME`` (``./.infantino``): the MLflow registry
as a SQLite file with its artifacts, and the feedback store as a SQLite file. Point
``MLFLOW_TRACKING_URI`` and ``INFANTINO_QUEUE_URL`` at shared servers to scale out.
Reading settings has no side effects: folders are created by whoever writes into them.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "INFANTINO_"


class _Group(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")


class StorageSettings(_Group):
    """Where state lives: the model registry and the feedback store."""

    home: Path = Field(Path(".infantino"), description="local folder of the embedded defaults (SQLite registry, artifacts, feedback store)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; `MLFLOW_TRACKING_URI` also works (default: SQLite under the home)")
    queue_url: str | None = Field(None, description="feedback store: any SQLAlchemy URL, e.g. `postgresql://user@host/db` (default: SQLite under the home)")
    model_prefix: str = Field("infantino", description="registered models are named `<prefix>-<task>-backbone` and `-head`")
    registry_timeout_s: float = Field(10.0, gt=0, description="serving: seconds an MLflow tracking server may take to answer one call (MLflow's own default is 120)")
    registry_retries: int = Field(1, ge=0, description="serving: retries of a failed MLflow call (MLflow's own default is 7, with backoff)")

    @property
    def registry_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (self.home / "artifacts").resolve()

    @property
    def database_url(self) -> str:
        return self.queue_url or f"sqlite:///{(self.home / 'feedback.db').resolve()}"


class ModelSettings(_Group):
    """What is served, and how each worker follows the registry."""

    # NoDecode: a comma list in the environment, not JSON.
    tasks: Annotated[list[str], NoDecode] = Field(["expression"], description="comma list of the tasks served, each with its own models and labels; the first is the default")
    model_poll_s: float = Field(1.0, description="how often every worker checks the champion alias")
    backbone_runtime: str = Field("auto", pattern="^(auto|torch|onnxruntime|openvino)$",
                                  description="`auto` (on a CPU the ONNX export on OpenVINO when installed, else ONNX Runtime; torch on a GPU), `torch`, `onnxruntime` or `openvino` (bfloat16 where the CPU has it; see README \"Serving\")")
    tta: str = Field("none", pattern="^(none|flip|flip\\+shift)$",
                     description="test-time augmentation: each embedding the mean over `flip` (2 views) or `flip+shift` (10 views); see bench/tta.py for its gain and cost")

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> list[str]:
        names = [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)
        names = [t for t in names if t]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks must be a comma list of distinct names; got {value!r}")
        return names

    @property
    def default_task(self) -> str:
        return self.tasks[0]


class FaceSettings(_Group):
    """Face detection and framing (faces=true, face_crop=true, train --crop-faces)."""

    face_detector: str = Field("haar+cnn", description="face detector: haar+cnn (Haar, then dlib's CNN where Haar finds nothing), haar, cnn, hog, yunet, none")
    face_model_path: str | None = Field(None, description="the YuNet ONNX file, for face_detector=yunet")
    face_margin: float | None = Field(None, ge=-0.4, description="override of the crop margin (a fraction of the face box's side, each way; negative cuts into the box); by default each model's own framing (stored with it) is used")
    max_faces: int = Field(10, ge=1, description="faces classified per image at most")


class LimitSettings(_Group):
    """Input limits: anything larger is refused with a 413 naming the limit."""

    max_image_bytes: int = Field(10 * 1024 * 1024, description="bytes per image")
    max_image_pixels: int = Field(40_000_000, description="pixels per image (checked before decoding: decompression bombs)")
    max_batch_images: int = Field(64, description="images per /predict_batch call")
    max_sequence_frames: int = Field(64, description="frames per /predict_sequence call")
    max_video_seconds: float = Field(30.0, description="length of a video sent to /predict_sequence")


class ServingSettings(_Group):
    """Processes, threads and adaptive batching."""

    api_workers: int = Field(1, ge=1, description="API worker processes")
    backbone_placement: str = Field("auto", pattern="^(auto|inline|service)$",
                                    description="where the backbone runs: `inline` in each API worker (no inter-service hop; concurrent requests share one model call), `service` in the batched backbone service (for GPUs and large models); `auto`: inline on a CPU, the service where a GPU may be present or with `INFANTINO_BACKBONE_RUNTIME=torch`")
    inline_batch_wait_ms: float = Field(0.0, ge=0, description="inline placement: how long a model call that is free waits for more requests to join it (a busy model batches whatever arrived meanwhile anyway)")
    torch_threads: int = Field(0, ge=0, description="threads of the backbone runtime (0: the runtime's default, all cores)")
    batch_max_size: int = Field(32, ge=1, description="adaptive batching: largest batch")
    # A cap, not a wait: BentoML answers 503 to requests it cannot serve within it.
    batch_max_latency_ms: int = Field(10000, ge=1, description="adaptive batching: the most a request may wait (BentoML refuses, 503, what it cannot serve within it)")


class OnlineSettings(_Group):
    """Online updates and the evaluation gate (online/)."""

    update_min_items: int = Field(32, ge=1, description="queued feedback items that trigger an update")
    update_interval_s: float = Field(60.0, gt=0, description="an update also runs when one item has waited this long")
    update_feedback_weight: float = Field(1.0, gt=0, description="feedback head: weight of a feedback item against a replayed training item (chosen by bench/online_tuning.py)")
    update_domain_priors: bool = Field(False, description="feedback head: feedback that names its domain teaches that domain's class mix, and answers to requests naming it move to that mix (heads/domain.py; off: on the held-out infant half it did not help, see README)")
    update_domain_memory: float = Field(0.85, ge=0, le=1, description="feedback head: feedback that names its domain is remembered (its served rows), and answers to requests naming it are blended with the memory's own answer at this weight (heads/domain.py; 0: off). Chosen on the infant feedback half (4-fold CV, bench/domain_memory_features.py, the best mean after 48 items and after all) with the two settings below: 0.85 on the stage features at C 0.03, 62.3% against 51.9% as it is, see README")
    update_domain_memory_kind: str = Field("logistic", pattern="^(logistic|prototype)$", description="feedback head: how a domain's memory answers: `logistic`, a logistic regression fitted on the domain's feedback alone; `prototype`, a softmax over the cosine similarity to each class's mean (infant feedback half, margin 0: +2.2 against +1.3 to +3.4, bench/feature_adaptation.py), see README")
    update_domain_memory_features: str = Field("stages", pattern="^(stages|embedding)$", description="feedback head: what a domain's memory reads: `stages`, the backbone's pooled last two stages, served after the embedding (backbones/model.py); `embedding`, the 64-d embedding the head reads. Chosen on the infant feedback half (bench/domain_memory_features.py), see README")
    update_domain_memory_c: float = Field(0.03, gt=0, description="feedback head: the logistic memory's inverse L2 strength, on standardised features (chosen with update_domain_memory_features)")
    update_replay_targets: str = Field("base", pattern="^(labels|base)$", description="feedback head: what the adapter learns on the replayed training items: their labels, or the offline-trained head's answers for them (soft targets: with no feedback it answers as that head). Chosen on the infant feedback half (bench/online_tuning.py): base is ahead for both models measured (+1.7 points on the shipped model where every labels update was refused; on the earlier model none promoted, where labels lost 0.9), see README")
    update_learning_rate: float = Field(3e-4, gt=0, description="mlp head: step size of the online partial_fit")
    update_passes: int = Field(5, ge=1, description="mlp head: passes over the new items per update")
    gate_max_val_drop: float = Field(0.01, ge=0, description="validation accuracy a candidate may lose against the lineage's offline-trained head")
    gate_alpha: float = Field(0.05, gt=0, le=1, description="the gate promotes only when a one-sided test on cross-fitted feedback finds a gain at this level")
    gate_worse_alpha: float = Field(0.5, gt=0, le=0.5, description="a candidate that wins fewer feedback items than it loses (cross-fitted, against the offline-trained head) is refused when an exact test finds it worse at this level (0.5: whenever it loses more)")
    gate_folds: int = Field(5, ge=2, description="folds of the gate's cross-fitting over all feedback")
    gate_min_items: int = Field(20, ge=2, description="feedback items the gate needs before it can promote anything")
    shadow_challenger: bool = Field(True, description="score the newest challenger (a refused candidate) on live traffic without serving it: its agreement with the champion and with feedback in /metrics and /health/detail")
    gate_max_unproven_promotions: int = Field(3, ge=0, description="promotions in a row allowed without a gain over the champion on items it was not taught (then the gate waits for one)")
    lease_ttl_s: float = Field(20.0, gt=0, description="how long an update lease lasts without renewal (the updater renews it every quarter of this while it works): a killed worker blocks updates this long at most")


class PrivacySettings(_Group):
    """What is kept, and for how long."""

    store_feedback_images: bool = Field(True, description="keep image bytes with feedback and predictions (off: embeddings only; no re-embedding after a backbone change)")
    prediction_retention_s: float = Field(86400.0, gt=0, description="predictions (and their images) are deleted this long after they were made; feedback on older ones must send the image")


class SecuritySettings(_Group):
    """Who may change the model."""

    admin_token: str | None = Field(None, description="bearer token for the admin endpoints: update, rollback, review, deletion (unset: they are off)")
    feedback_token: str | None = Field(None, description="bearer token POST /feedback requires (the admin token also works; unset: feedback is open)")
    predict_token: str | None = Field(None, description="bearer token the /predict endpoints require (the feedback and admin tokens also work; unset: open)")
    feedback_rate_per_min: int = Field(120, ge=0, description="POST /feedback per client (IP address) and minute, in bursts of up to as many, per API worker; more get a 429 with Retry-After (0: no limit)")


GROUPS: dict[str, type[_Group]] = {
    "storage": StorageSettings, "models": ModelSettings, "faces": FaceSettings, "limits": LimitSettings,
    "serving": ServingSettings, "online": OnlineSettings, "privacy": PrivacySettings, "security": SecuritySettings,
}


class Settings(BaseModel):
    """All groups. ``Settings(home=..., update_min_items=3)`` routes flat names to their group."""

    storage: StorageSettings = Field(default_factory=StorageSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    faces: FaceSettings = Field(default_factory=FaceSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    online: OnlineSettings = Field(default_factory=OnlineSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    @model_validator(mode="before")
    @classmethod
    def _route_flat_names(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        grouped: dict[str, Any] = {k: v for k, v in values.items() if k in GROUPS}
        flat = {k: v for k, v in values.items() if k not in GROUPS}
        for name, value in flat.items():
            group = next((g for g, model in GROUPS.items() if name in model.model_fields), None)
            if group is None:
                raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(all_names()))}")
            grouped.setdefault(group, {})[name] = value
        return {g: (GROUPS[g](**v) if isinstance(v, dict) else v) for g, v in grouped.items()}


def all_names() -> list[str]:
    return [name for model in GROUPS.values() for name in model.model_fields]


def markdown_table() -> str:
    """The README's configuration table, one row per setting, grouped by concern."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for model in GROUPS.values():
        rows.append(f"| **{(model.__doc__ or '').strip()}** | | |")
        for name, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = ",".join(default) if isinstance(default, list) else ("unset" if default is None else default)
            rows.append(f"| `{ENV_PREFIX}{name.upper()}` | `{shown}` | {field.description} |")
    return "\n".join(rows)


_USERINFO = re.compile(r"//[^/@\s]*@")
_SECRET_PARAMS = re.compile(r"\b(password|passwd|pwd|token|access_token|secret)=[^&\s'\"]*", re.IGNORECASE)


def redact(url: object) -> str:
    """A URL (or any text naming URLs) fit for logs, errors and answers: any user:password@ part
    replaced by ***@, and password=/token= query parameters by ***."""
    return _SECRET_PARAMS.sub(r"\1=***", _USERINFO.sub("//***@", str(url)))


def has_secret(url: object) -> bool:
    """Whether ``url`` carries credentials that :func:`redact` would hide."""
    return redact(url) != str(url)


_logs_protected = False


def protect_logs() -> None:
    """From now on, every log record of this process is redacted (message and traceback).

    Called by whoever opens a URL with credentials (the registry, the database): libraries log
    and raise with the URLs they were given (MLflow's request errors name the tracking URI).
    Idempotent; a process that never opens such a URL pays nothing.
    """
    global _logs_protected
    if _logs_protected:
        return
    import logging
    import traceback

    make = logging.getLogRecordFactory()

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, as it was
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")  # as logging.Formatter writes it
            if has_secret(text):
                record.exc_text = redact(text)
        return record

    logging.setLogRecordFactory(redacted_record)
    _logs_protected = True


@lru_cache
def get_settings() -> Settings:
    return Settings()
