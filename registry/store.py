"""Log, load, list, promote and roll back InfantinO models in the MLflow model registry.

Each task (``expression`` by default) has two registered models:

- ``<prefix>-<task>-backbone``: the timm EmbeddingNet (pytorch flavour), images -> 64-d;
- ``<prefix>-<task>-head``: a head (heads/; sklearn flavour, skops format), 64-d -> classes.

A head version names the backbone version whose embeddings it reads (tag ``backbone_version``),
so whoever loads the champion head loads the matching backbone. The alias ``champion`` marks
what is served, ``challenger`` a candidate the gate refused. Every promotion is appended to the
registered model's ``champion_history`` tag, which is what rollback walks back.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from heads import trusted_types
from infantino.embeddings import EmbeddingSet
from infantino.images import Preprocessing
from infantino.settings import Settings, get_settings, has_secret, protect_logs, redact

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
EMBEDDINGS_DIR, REPLAY_FILE, VALIDATION_FILE = "embeddings", "replay.npz", "validation.npz"
# A backbone version's ONNX export is a run artifact at the path its ``onnx_artifact`` tag names:
# what a server without torch runs (service/backbone.py, registry/bundle.py).
ONNX_DIR, ONNX_TAG = "onnx", "onnx_artifact"


class RegistryError(RuntimeError):
    """The registry has no such model/version/alias, or cannot do what was asked."""


class RegistryUnavailable(RegistryError):
    """The registry did not answer (down, unreachable, timed out): retrying later may work."""


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the registry did not answer, rather than that it answered "no"."""
    import requests
    import sqlalchemy.exc

    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, sqlalchemy.exc.OperationalError,
                        ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, MlflowException):
        # MLflow's REST client wraps a refused connection or a timeout (after its retries) so.
        message = str(exc.message)
        return (message.startswith("API request to") and " failed with " in message) or exc.error_code == "TEMPORARILY_UNAVAILABLE"
    return False


def as_registry_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a registry that did not answer raised as RegistryUnavailable."""
    try:
        return fn(*args, **kwargs)
    except RegistryError:
        raise
    except Exception as exc:
        if is_unreachable(exc):
            raise RegistryUnavailable(f"the registry did not answer: {redact(exc)[:300]}") from exc
        raise


# A serving process must notice a registry outage in seconds: MLflow's own defaults (a 120 s
# timeout, 7 retries with exponential backoff) hold a caller for minutes. Explicit MLFLOW_*
# variables still win.
def use_short_registry_timeouts(settings: Settings) -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(settings.storage.registry_timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.storage.registry_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


@dataclass
class LoadedBackbone:
    model: Any  # backbones.model.EmbeddingNet, in eval mode on the CPU; None when loaded as ONNX only
    version: str
    preprocessing: Preprocessing
    classes: list[str]
    tags: dict[str, str]
    onnx: bytes | None = None  # its ONNX export (backbones.runtime), when loaded without torch


@dataclass
class LoadedHead:
    model: Any  # a heads.Head
    version: str
    backbone_version: str
    classes: list[str]
    tags: dict[str, str]
    run_id: str

    @property
    def embeddings_run_id(self) -> str:
        return self.tags.get("embeddings_run_id", self.run_id)


def _pip(*names: str) -> list[str]:
    from importlib.metadata import version

    return [f"{n}=={version(n).split('+')[0]}" for n in names]


class ModelRegistry:
    """InfantinO's view of an MLflow tracking server / registry (any tracking URI)."""

    def __init__(self, settings: Settings | None = None, task: str | None = None, tracking_uri: str | None = None):
        self.settings = settings or get_settings()
        self.task = task or self.settings.models.default_task
        self.tracking_uri = tracking_uri or self.settings.storage.registry_uri
        self.display_uri = redact(self.tracking_uri)  # for logs, errors and answers: never a password
        if has_secret(self.tracking_uri):
            # MLflow prints run links from the URI it was given and names it in its request errors:
            # no links, and every log record of this process redacted.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
            protect_logs()
        if self.tracking_uri.startswith("sqlite:///"):  # the embedded default: its folder is ours to create
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.tracking_uri)
        # MLflow also exports the URI to the environment, where child processes (a `bentoml
        # serve`, the CLI) and later Settings would take it as *their* registry: keep the
        # environment as the user set it.
        if user_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri
        if self.tracking_uri.startswith("sqlite:///"):
            self.client = _open_sqlite_registry(self.tracking_uri, Path(self.tracking_uri.removeprefix("sqlite:///")))
        else:
            self.client = MlflowClient(self.tracking_uri)
        prefix = self.settings.storage.model_prefix
        self.names = model_names(prefix, self.task)
        self.experiment_name = f"{prefix}-{self.task}"

    def _did_not_answer(self, exc: BaseException) -> RegistryUnavailable:
        return RegistryUnavailable(f"the registry at {self.display_uri} did not answer: {redact(exc)[:300]}")

    # ---- runs -------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:") or self.tracking_uri.startswith("file:"):
            self.settings.storage.artifact_root.mkdir(parents=True, exist_ok=True)
            location = self.settings.storage.artifact_root.as_uri()
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=location)
        except MlflowException:  # another process created it first
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    def start_run(self, run_name: str, tags: dict[str, str] | None = None):
        return mlflow.start_run(experiment_id=self.experiment_id(), run_name=run_name, tags=tags)

    # ---- logging ----------------------------------------------------------------------------
    def log_backbone(self, model, preprocessing: Preprocessing, classes: list[str], tags: dict[str, str]) -> str:
        """Log and register the backbone in the active run; returns the new version."""
        import torch
        from mlflow.models import infer_signature

        example = np.zeros((1, 3, preprocessing.input_size, preprocessing.input_size), np.float32)
        with torch.inference_mode():
            out = model.eval()(torch.from_numpy(example)).numpy()
        version_tags = {**tags, **preprocessing_tags(preprocessing), "label_set": ",".join(classes), "task": self.task}
        info = mlflow.pytorch.log_model(
            model, name="backbone", registered_model_name=self.names["backbone"],
            signature=infer_signature(example, out), input_example=example,
            pip_requirements=_pip("torch", "timm", "numpy"),
            # pickle, not MLflow 3's default torch.export: export fixes the batch size to the example's.
            serialization_format="pickle",
            # The pickled module's class lives in backbones/: ship that code with the model.
            code_paths=[str(Path(__file__).resolve().parents[1] / "backbones")],
        )
        version = str(info.registered_model_version)
        onnx_path = self._log_backbone_onnx(model, preprocessing, version)
        if onnx_path:
            version_tags[ONNX_TAG] = onnx_path
        self.tag_version("backbone", version, version_tags)
        return version

    def register_saved(self, kind: str, model_dir: Path, tags: dict[str, str]) -> str:
        """Log an MLflow model already saved in ``model_dir`` (e.g. one a Bento bundled) in the active
        run and register it as a new ``kind`` version with ``tags``; nothing is loaded, so no torch is needed."""
        mlflow.log_artifacts(str(model_dir), kind)
        info = mlflow.register_model(f"runs:/{mlflow.active_run().info.run_id}/{kind}", self.names[kind])
        version = str(info.version)
        self.tag_version(kind, version, {**tags, "task": self.task})
        return version

    def tag_version(self, kind: str, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.names[kind], version, k, str(v))

    def _log_backbone_onnx(self, model, preprocessing: Preprocessing, version: str) -> str | None:
        """Log the backbone's ONNX export in the active run; returns its artifact path (None if
        the export failed: that version then serves with torch only)."""
        import torch

        from backbones.runtime import export_onnx

        try:
            with torch.inference_mode(False):
                onnx = export_onnx(model, preprocessing.input_size)
        except Exception:
            log.warning("could not export backbone v%s to ONNX; it will serve with torch only", version, exc_info=True)
            return None
        return self.log_onnx(onnx, version)

    def log_onnx(self, onnx: bytes, version: str) -> str:
        """Log backbone ``version``'s ONNX export in the active run; returns its artifact path (the ONNX_TAG value)."""
        name = f"backbone-v{version}.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(onnx)
            mlflow.log_artifact(str(Path(tmp) / name), ONNX_DIR)
        return f"{ONNX_DIR}/{name}"

    def log_head(
        self, head, classes: list[str], backbone_version: str, tags: dict[str, str],
        replay: EmbeddingSet | None = None, validation: EmbeddingSet | None = None,
    ) -> str:
        """Log and register a head in the active run; returns the new version.

        ``replay``/``validation`` embeddings are stored with a freshly trained head; heads
        continued online point at them through ``embeddings_run_id`` instead of copying.
        """
        from mlflow.models import infer_signature

        if replay is not None and validation is not None:
            tags = {**tags, "embeddings_run_id": self.log_embeddings(replay, validation)}
        example = np.zeros((1, head.n_features_in_), np.float32)
        info = mlflow.sklearn.log_model(
            head, name="head", registered_model_name=self.names["head"],
            serialization_format="skops", skops_trusted_types=trusted_types(),
            signature=infer_signature(example, head.predict_proba(example)), input_example=example,
            pip_requirements=_pip("scikit-learn", "skops", "numpy"), pyfunc_predict_fn="predict_proba",
        )
        version = str(info.registered_model_version)
        self.tag_version("head", version, {**tags, "label_set": ",".join(classes), "backbone_version": backbone_version, "task": self.task})
        return version

    def log_embeddings(self, replay: EmbeddingSet, validation: EmbeddingSet) -> str:
        """Log a head's replay and validation embeddings in the active run; returns the run id (its
        ``embeddings_run_id`` tag: heads continued online point at them instead of copying)."""
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(replay.save(Path(tmp) / REPLAY_FILE)), EMBEDDINGS_DIR)
            mlflow.log_artifact(str(validation.save(Path(tmp) / VALIDATION_FILE)), EMBEDDINGS_DIR)
        return mlflow.active_run().info.run_id

    # ---- aliases ----------------------------------------------------------------------------
    def _name(self, kind: str) -> str:
        if kind not in self.names:
            raise RegistryError(f"unknown model kind {kind!r}; accepted: {sorted(self.names)}")
        return self.names[kind]

    def _history(self, name: str) -> list[str]:
        try:
            return json.loads(self.client.get_registered_model(name).tags.get("champion_history", "[]"))
        except MlflowException as exc:
            raise RegistryError(f"no registered model {name!r} at {self.display_uri}") from exc

    def promote(self, kind: str, version: str | int, alias: str = CHAMPION) -> None:
        """Point ``alias`` at ``version``; for champion, also record it for rollback."""
        name, version = self._name(kind), str(version)
        self.version_info(kind, version)  # raises if missing
        self.client.set_registered_model_alias(name, alias, version)
        if alias == CHAMPION:
            history = self._history(name)
            if not history or history[-1] != version:
                history.append(version)
            self.client.set_registered_model_tag(name, "champion_history", json.dumps(history[-100:]))
            if kind == "head":
                self._align_backbone(version)
        log.info("%s v%s is now %s", name, version, alias)

    def rollback(self, kind: str = "head") -> str:
        """Move champion back to the previous champion; returns the version now champion.

        The backbone is served as the champion head's backbone, so rolling back the head
        moves the backbone too; a backbone alone cannot roll back under a head that needs it.
        """
        name = self._name(kind)
        history = self._history(name)
        if len(history) < 2:
            raise RegistryError(f"{name} has no earlier champion to roll back to (history: {history})")
        history.pop()
        previous = history[-1]
        if kind == "backbone" and self.has_champion():
            needed = self.version_info("head", CHAMPION).tags.get("backbone_version")
            if needed != previous:
                raise RegistryError(f"the champion head reads backbone v{needed}; roll back the head instead (infantino rollback)")
        self.client.set_registered_model_alias(name, CHAMPION, previous)
        self.client.set_registered_model_tag(name, "champion_history", json.dumps(history))
        if kind == "head":
            self._align_backbone(previous)
        return previous

    def _align_backbone(self, head_version: str) -> None:
        """The backbone champion follows the head champion's lineage (they are served as a pair)."""
        backbone_version = self.version_info("head", head_version).tags.get("backbone_version")
        if backbone_version and self.champion_version("backbone") != backbone_version:
            # The alias only: the backbone's own promotion history stays as promoted.
            self.client.set_registered_model_alias(self._name("backbone"), CHAMPION, backbone_version)

    def champion_version(self, kind: str, alias: str = CHAMPION) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self._name(kind), alias).version)
        except MlflowException as exc:
            if is_unreachable(exc):
                raise self._did_not_answer(exc) from exc
            return None

    def champion_if_reachable(self, kind: str = "head") -> str | None:
        """The champion version, None when there is none; unlike ``champion_version``, an
        unreachable registry raises RegistryError instead of looking empty."""
        try:
            model = self.client.get_registered_model(self._name(kind))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise self._did_not_answer(exc) from exc
        except Exception as exc:  # a connection error that MLflow did not wrap
            raise self._did_not_answer(exc) from exc
        version = model.aliases.get(CHAMPION)
        return None if version is None else str(version)

    def version_info(self, kind: str, version_or_alias: str | int):
        name = self._name(kind)
        ref = str(version_or_alias)
        try:
            if ref.isdigit():
                return self.client.get_model_version(name, ref)
            return self.client.get_model_version_by_alias(name, ref)
        except MlflowException as exc:
            if is_unreachable(exc):
                raise self._did_not_answer(exc) from exc
            raise RegistryError(f"{name} has no version or alias {ref!r}") from exc

    def list_versions(self, kind: str) -> list[dict]:
        name = self._name(kind)
        try:
            versions = self.client.search_model_versions(f"name='{name}'")
            aliases = self.client.get_registered_model(name).aliases
        except MlflowException as exc:
            if is_unreachable(exc):
                raise self._did_not_answer(exc) from exc
            return []
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        rows = []
        for mv in sorted(versions, key=lambda m: int(m.version)):
            rows.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                         "created": mv.creation_timestamp, "run_id": mv.run_id, "tags": dict(mv.tags)})
        return rows

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    def run_tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    # ---- loading ----------------------------------------------------------------------------
    def load_head(self, version_or_alias: str | int = CHAMPION) -> LoadedHead:
        mv = self.version_info("head", version_or_alias)
        model = mlflow.sklearn.load_model(f"models:/{self.names['head']}/{mv.version}")
        return LoadedHead(model, str(mv.version), mv.tags.get("backbone_version", ""), mv.tags["label_set"].split(","), dict(mv.tags), mv.run_id)

    def load_backbone(self, version_or_alias: str | int = CHAMPION) -> LoadedBackbone:
        mv = self.version_info("backbone", version_or_alias)
        model = mlflow.pytorch.load_model(f"models:/{self.names['backbone']}/{mv.version}", map_location="cpu").eval()
        return LoadedBackbone(model, str(mv.version), preprocessing_from_tags(mv.tags), mv.tags["label_set"].split(","), dict(mv.tags))

    def load_backbone_onnx(self, version_or_alias: str | int = CHAMPION) -> LoadedBackbone | None:
        """The backbone as its ONNX export (``model`` None, ``onnx`` the bytes), without torch;
        None for a version logged without one (before exports were logged, or a failed export)."""
        mv = self.version_info("backbone", version_or_alias)
        path = mv.tags.get(ONNX_TAG)
        if not path or not mv.run_id:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=path, dst_path=tmp,
                                                     tracking_uri=self.tracking_uri)
            onnx = Path(local).read_bytes()
        return LoadedBackbone(None, str(mv.version), preprocessing_from_tags(mv.tags), mv.tags["label_set"].split(","),
                              dict(mv.tags), onnx=onnx)

    def load_embeddings(self, head: LoadedHead) -> tuple[EmbeddingSet, EmbeddingSet]:
        """The replay and validation embeddings that travel with a head's lineage."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=head.embeddings_run_id, artifact_path=EMBEDDINGS_DIR, dst_path=tmp))
            return EmbeddingSet.load(folder / REPLAY_FILE), EmbeddingSet.load(folder / VALIDATION_FILE)

    def has_champion(self) -> bool:
        return self.champion_version("head") is not None


def _open_sqlite_registry(uri: str, path: Path) -> MlflowClient:
    """Open (and on first use create and migrate) the embedded SQLite registry, one process at a time.

    MLflow creates and migrates a new SQLite database on its first use with no lock between
    processes: the API and backbone workers of a server starting on a fresh home would run the
    same migrations at once, and one of them fails ("duplicate column name"). An OS file lock
    beside the database lines them up; afterwards MLflow keeps the opened store for the process.
    """
    import fcntl

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
            return client
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def model_names(prefix: str, task: str) -> dict[str, str]:
    """The registered model names of ``task``'s backbone and head."""
    return {"backbone": f"{prefix}-{task}-backbone", "head": f"{prefix}-{task}-head"}


def preprocessing_tags(p: Preprocessing) -> dict[str, str]:
    return {f"preprocessing.{k}": str(v) for k, v in p.to_dict().items()} | {"input_size": str(p.input_size)}


def preprocessing_from_tags(tags: dict[str, str]) -> Preprocessing:
    return Preprocessing.from_dict({k.split(".", 1)[1]: v for k, v in tags.items() if k.startswith("preprocessing.")})
