"""Every setting in one place, read from the environment (prefix ``INFANTINO_``).

Embedded defaults keep everything under ``INFANTINO_HOME`` (``./.infantino``): the MLflow
registry as a SQLite file and its artifacts, and the feedback queue as a SQLite file.
Point ``MLFLOW_TRACKING_URI`` / ``INFANTINO_QUEUE_URL`` at shared servers to scale out.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFANTINO_", extra="ignore")

    home: Path = Field(default=Path(".infantino"), description="Local data folder for the embedded defaults.")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI; MLFLOW_TRACKING_URI also works.")
    model_prefix: str = Field(default="infantino", description="Registered models are <prefix>-<task>-backbone/-head.")
    # The tasks one service answers, each with its own models and labels (INFANTINO_TASKS=
    # expression,age_group). The first is the default: of the CLI, and of /feedback without `task`.
    tasks: Annotated[list[str], NoDecode] = ["expression"]

    # Feedback queue (online/queue.py): any SQLAlchemy URL; SQLite under home by default.
    queue_url: str | None = None
    store_feedback_images: bool = True

    # Online updates (online/updater.py)
    update_min_items: int = 32
    update_interval_s: float = 60.0
    update_replay_ratio: float = 4.0  # replayed items per new item (training embeddings and older feedback)
    update_learning_rate: float = 3e-4  # chosen by bench/online_tuning.py
    update_passes: int = 5
    update_holdout_fraction: float = 0.2
    gate_max_val_drop: float = 0.01
    gate_heldout_z: float = 1.0
    lease_ttl_s: float = 120.0
    model_poll_s: float = 1.0

    # Faces (infantino/faces.py): used by /predict?faces=true and /feedback?face_crop=true
    face_detector: str = "haar"  # haar | yunet | none
    face_model_path: str | None = None  # the YuNet ONNX file, for face_detector=yunet
    face_margin: float = 0.25
    max_faces: int = 10

    # Serving limits (service/)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_batch_images: int = 64
    max_sequence_frames: int = 64
    max_video_seconds: float = 30.0
    batch_max_size: int = 32
    batch_max_latency_ms: int = 10000  # a cap, not a wait: BentoML answers 503 to requests it cannot serve within it
    api_workers: int = 1
    torch_threads: int = 0  # 0 = let torch decide (all cores)
    # The backbone service's runtime: auto (ONNX Runtime on CPU, torch on a GPU), torch or
    # onnxruntime. On this CPU ONNX Runtime runs one image 3x faster than torch and a batch of 32
    # 1.04x faster than torch channels_last (bench/results/cpu_runtime.json).
    backbone_runtime: str = Field(default="auto", pattern="^(auto|torch|onnxruntime)$")
    admin_token: str | None = None

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_list(cls, value):
        names = [t.strip() for t in value.split(",")] if isinstance(value, str) else list(value)
        names = [t for t in names if t]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tasks must be a comma list of distinct names; got {value!r}")
        return names

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    @property
    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (self.home / "artifacts").resolve()

    @property
    def resolved_queue_url(self) -> str:
        return self.queue_url or f"sqlite:///{(self.home / 'feedback.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    return settings
