"""Where served models come from, and how every worker follows the champion.

At start-up a worker asks the MLflow registry for the champion head (and the backbone version
that head was trained on). When the registry cannot be reached or is empty, it falls back to
the models ``bentoml build`` bundled into the Bento (``infantino bundle`` copies the champions
into BentoML's model store first). While running, a :class:`ChampionWatcher` thread polls the
alias and swaps models in place, so a promotion reaches every worker of every replica without
a restart, and nothing in one process decides what the others serve.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from infantino.periodic import Periodic
from infantino.settings import Settings
from registry.store import CHAMPION, LoadedBackbone, LoadedHead, ModelRegistry, RegistryError, preprocessing_from_tags

log = logging.getLogger(__name__)


class ModelSource:
    """Loads backbones and heads from the registry, or from the Bento's bundled copies."""

    def __init__(self, settings: Settings, task: str | None = None):
        self.settings = settings
        self.registry = ModelRegistry(settings, task=task)

    # What the registry says is champion right now (None when unreachable or empty).
    def champion_head_version(self) -> str | None:
        try:
            return self.registry.champion_version("head", CHAMPION)
        except Exception as exc:  # registry outage: keep serving what we have
            log.warning("registry unreachable (%s); keeping the current models", exc)
            return None

    def head_backbone_version(self, head_version: str) -> str:
        return self.registry.version_info("head", head_version).tags["backbone_version"]

    def backbone_preprocessing(self, backbone_version: str):
        """The preprocessing a backbone version expects, read from its tags (no weights loaded)."""
        try:
            return preprocessing_from_tags(self.registry.version_info("backbone", backbone_version).tags)
        except RegistryError:
            return preprocessing_from_tags(self._bundled("backbone").info.metadata["tags"])

    def load_head(self, version: str | None = None) -> LoadedHead:
        version = version or self.champion_head_version()
        if version is not None:
            return self.registry.load_head(version)
        return self._bundled_head()

    def load_backbone(self, version: str | None = None) -> LoadedBackbone:
        if version is None:
            head_version = self.champion_head_version()
            if head_version is None:
                return self._bundled_backbone()
            version = self.head_backbone_version(head_version)
        return self.registry.load_backbone(version)

    # ---- the Bento's bundled copies (see registry/bundle.py) ---------------------------------
    def _bundled(self, kind: str):
        import bentoml

        try:
            return bentoml.models.get(f"{self.registry.names[kind]}:latest")
        except Exception as exc:
            raise RegistryError(
                f"no champion in the registry at {self.registry.display_uri} and no bundled {self.registry.names[kind]} "
                "model: run `infantino bootstrap` (registers the shipped model) or train one"
            ) from exc

    def _bundled_head(self) -> LoadedHead:
        import mlflow

        bm = self._bundled("head")
        tags = dict(bm.info.metadata["tags"])
        model = mlflow.sklearn.load_model(str(Path(bm.path) / "mlflow_model"))
        return LoadedHead(model, bm.info.metadata["version"], tags["backbone_version"], tags["label_set"].split(","), tags, "")

    def _bundled_backbone(self) -> LoadedBackbone:
        import mlflow

        bm = self._bundled("backbone")
        tags = dict(bm.info.metadata["tags"])
        model = mlflow.pytorch.load_model(str(Path(bm.path) / "mlflow_model"), map_location="cpu").eval()
        return LoadedBackbone(model, bm.info.metadata["version"], preprocessing_from_tags(tags), tags["label_set"].split(","), tags)


class ChampionWatcher:
    """Polls the champion alias and calls ``on_change(new_head_version)`` when it moves.

    A failed load is logged and retried at the next poll; the old model keeps serving.
    """

    def __init__(self, source: ModelSource, current: Callable[[], str | None], on_change: Callable[[str], None], interval_s: float):
        self.source, self.current, self.on_change = source, current, on_change
        self.loop = Periodic(self.check_now, interval_s, f"champion-watcher-{source.registry.task}")

    def check_now(self) -> bool:
        wanted = self.source.champion_head_version()
        if wanted is not None and wanted != self.current():
            try:
                self.on_change(wanted)
                return True
            except Exception:
                log.exception("could not switch to head v%s; still serving v%s", wanted, self.current())
        return False


class ChampionFollower:
    """One task's models in one worker: loaded now if the registry has a champion, then, once
    started, kept current by a :class:`ChampionWatcher`. Subclasses say what a switch loads."""

    def __init__(self, settings: Settings, task: str):
        self.task = task
        self.source = ModelSource(settings, task)
        try:
            self.switch(self.source.champion_head_version())
        except Exception:
            log.exception("%s: no model loaded yet; not ready until the registry has a champion", task)
        self.watcher = ChampionWatcher(self.source, self.current_head_version, self.switch, settings.models.model_poll_s)

    def start(self) -> "ChampionFollower":
        self.watcher.loop.start()
        return self

    def stop(self) -> None:
        self.watcher.loop.stop()

    def switch(self, head_version: str | None) -> None:
        raise NotImplementedError

    def current_head_version(self) -> str | None:
        raise NotImplementedError
