"""Where served models come from, and how every worker follows the champion.

At start-up a worker asks the MLflow registry for the champion head (and the backbone version
that head was trained on). When the registry cannot be reached or is empty, it falls back to
the models ``bentoml build`` bundled into the Bento (``infantino bundle`` copies the champions
into BentoML's model store first), and without those to the model shipped in the package
(``registry/default_model/``, served as version 0), so an outage at start never keeps a worker
down or crash-looping. While running, a :class:`ChampionWatcher` thread polls the alias and
swaps models in place, so a promotion reaches every worker of every replica without a
restart, and nothing in one process decides what the others serve.

A fresh state (plain ``bentoml serve``, a new volume) has an empty registry: the first worker
registers a first champion itself (:func:`register_initial_once`), the same thing ``infantino
bootstrap`` does, so ``bentoml serve`` needs no set-up step: the shipped model where torch is
installed to register it, else (a torch-free Bento, e.g. its container) the Bento's bundled pair,
so online updates have a registered champion to continue either way.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from backbones.runtime import torch_installed
from infantino.images import Preprocessing
from infantino.periodic import Periodic
from infantino.settings import Settings, redact
from registry.bundle import bundled_pair, register_bundled
from registry.shipped import (SHIPPED_VERSION, has_shipped, register_shipped, shipped_backbone, shipped_meta, shipped_serving_head,
                              shipped_tags)
from registry.store import (CHAMPION, LoadedBackbone, LoadedHead, ModelRegistry, RegistryError, model_names, preprocessing_from_tags,
                            preprocessing_tags, use_short_registry_timeouts)
from service.heap import freeze_long_lived
from store import Database, Lease

log = logging.getLogger(__name__)

# Registering the shipped model when the registry has no champion, in exactly one process.
#
# Why a lease, and why the registration happens before a worker serves: the API workers, the
# backbone worker and every replica start together, and each would otherwise see an empty
# registry and register its own copy. The lease in the shared store (store/lease.py, the one the
# online updater already relies on across replicas; SQLite on one host, PostgreSQL for several)
# lets one process register while the others wait for it and then find the champion. Waiting
# for the lease *before* the first MLflow client of the process also serialises the creation of
# a new SQLite registry: MLflow migrates an empty database on first use without a lock between
# processes, and concurrent migrations fail. The holder renews the lease while it works, so a
# holder that dies frees it within the TTL and the next waiter (or, later, a worker's champion
# watcher) registers instead. Serving the package files directly and registering in the
# background was the alternative; it would serve a version the registry does not know (feedback
# and updates name registered versions), so the package files are only the fallback for when
# the registry cannot be reached at all.
SHIPPED_LEASE = "register-shipped-{task}"
SHIPPED_LEASE_TTL_S = 60.0  # renewed every quarter of it while registering
SHIPPED_WAIT_S = 300.0  # how long a starting worker waits for another process's registration
SHIPPED_RETRY_S = 60.0  # how often a running worker retries when the registry is still empty


def register_initial_once(settings: Settings, task: str, wait_s: float = SHIPPED_WAIT_S, tracking_uri: str | None = None,
                          lease: Lease | None = None, always: bool = False) -> tuple[str, str] | None:
    """Register ``task``'s first champion (see :func:`initial_registration`) unless the registry has one (or ``always``),
    while holding the shared lease; returns the new (backbone, head) versions, or None when
    nothing was registered (a champion exists, or another process still holds the lease after
    ``wait_s``). Raises RegistryError when the registry does not answer."""
    db = None
    if lease is None:
        db = Database(settings.storage.database_url)
        lease = Lease(db)
    name = SHIPPED_LEASE.format(task=task)
    holder = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    try:
        deadline = time.monotonic() + wait_s
        while not lease.try_acquire(name, holder, SHIPPED_LEASE_TTL_S):
            if time.monotonic() >= deadline:
                log.warning("%s: another process is still registering the shipped model (lease %s held by %s)",
                            task, name, lease.holder(name))
                return None
            time.sleep(0.5)
        with lease.kept(name, holder, SHIPPED_LEASE_TTL_S):
            registry = ModelRegistry(settings, task, tracking_uri)
            if not always and registry.champion_if_reachable("head") is not None:
                return None
            register = initial_registration(settings, task)
            if register is None:
                return None
            what = "the shipped model" if register is register_shipped else "the bundled models"
            log.warning("%s: the registry at %s has no champion; registering %s", task, registry.display_uri, what)
            versions = register(registry)
            log.warning("%s: registered %s as champion: backbone v%s, head v%s", task, what, *versions)
            return versions
    finally:
        if db is not None:
            db.close()


def initial_registration(settings: Settings, task: str) -> Callable[[ModelRegistry], tuple[str, str]] | None:
    """How an empty registry gets ``task``'s first champion: the shipped model where torch is installed to
    register it, else the Bento's bundled pair (logged as saved, no torch needed), else nothing."""
    if has_shipped(task) and torch_installed():
        return register_shipped
    if bundled_pair(model_names(settings.storage.model_prefix, task)) is not None:
        return register_bundled
    return None


class ModelSource:
    """Loads backbones and heads from the registry, or from the Bento's bundled copies."""

    def __init__(self, settings: Settings, task: str | None = None):
        self.settings = settings
        use_short_registry_timeouts(settings)  # a serving process: an outage must show in seconds
        self.registry = ModelRegistry(settings, task=task)
        # What the champion polls found (for health reports, without asking the registry again):
        # when one last answered (epoch s), when one last failed, and why (redacted).
        self.last_ok: float | None = None
        self.last_failure: float | None = None
        self.last_error: str | None = None

    def head_aliases(self) -> dict[str, str] | None:
        """Every alias of the head model -> its version, in one registry call: {} when there is no
        such model yet, None when the registry does not answer (then the current models stay)."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = {alias: str(v) for alias, v in self.registry.client.get_registered_model(self.registry.names["head"]).aliases.items()}
        except Exception as exc:
            answered = isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            if not answered:  # registry outage: keep serving what we have
                self.last_failure, self.last_error = time.time(), redact(exc)[:300]
                log.warning("registry unreachable (%s); keeping the current models", self.last_error)
                return None
            aliases = {}  # it answered: no such model yet
        self.last_ok = time.time()
        return aliases

    # What the registry says is champion right now (None when unreachable or empty).
    def champion_head_version(self) -> str | None:
        return (self.head_aliases() or {}).get(CHAMPION)

    def head_backbone_version(self, head_version: str) -> str:
        return self.registry.version_info("head", head_version).tags["backbone_version"]

    def backbone_preprocessing(self, backbone_version: str) -> Preprocessing:
        """The preprocessing a backbone version expects, read from its tags (no weights loaded)."""
        if backbone_version == SHIPPED_VERSION and self._has_shipped():
            return Preprocessing.from_dict(shipped_meta()["preprocessing"])
        try:
            return preprocessing_from_tags(self.registry.version_info("backbone", backbone_version).tags)
        except RegistryError:
            return preprocessing_from_tags(self._bundled("backbone").info.metadata["tags"])

    def load_head(self, version: str | None = None) -> LoadedHead:
        version = version or self.champion_head_version()
        if version is not None:
            return self.registry.load_head(version)
        try:
            return self._bundled_head()
        except RegistryError:
            if not self._has_shipped():
                raise
            return self._shipped_head()

    def load_backbone(self, version: str | None = None) -> LoadedBackbone:
        if version is None:
            head_version = self.champion_head_version()
            if head_version is None:
                try:
                    return self._bundled_backbone()
                except RegistryError:
                    if not self._has_shipped():
                        raise
                    return self._shipped_backbone()
            version = self.head_backbone_version(head_version)
        return self.registry.load_backbone(version)

    def load_backbone_onnx(self, version: str | None = None) -> LoadedBackbone | None:
        """Like ``load_backbone``, as its ONNX export (``model`` None): no torch needed. None when
        that backbone has no ONNX export (then ``load_backbone`` loads it with torch)."""
        if version is None:
            head_version = self.champion_head_version()
            if head_version is None:
                try:
                    return self._bundled_backbone_onnx()
                except RegistryError:
                    return None
            version = self.head_backbone_version(head_version)
        return self.registry.load_backbone_onnx(version)

    # ---- the package's shipped model (see registry/shipped.py), served as version 0 ----------
    def _has_shipped(self) -> bool:
        return has_shipped(self.registry.task)

    def _shipped_head(self) -> LoadedHead:
        meta = shipped_meta()
        log.warning("%s: no champion in the registry at %s and no bundled model: serving the shipped model (v%s)",
                    self.registry.task, self.registry.display_uri, SHIPPED_VERSION)
        tags = {**shipped_tags(), "label_set": ",".join(meta["classes"]), "backbone_version": SHIPPED_VERSION,
                "task": self.registry.task}
        return LoadedHead(shipped_serving_head(), SHIPPED_VERSION, SHIPPED_VERSION, list(meta["classes"]), tags, "")

    def _shipped_backbone(self) -> LoadedBackbone:
        meta = shipped_meta()
        prep = Preprocessing.from_dict(meta["preprocessing"])
        tags = {**shipped_tags(), **preprocessing_tags(prep), "label_set": ",".join(meta["classes"]), "task": self.registry.task}
        return LoadedBackbone(shipped_backbone(), SHIPPED_VERSION, prep, list(meta["classes"]), tags)

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

    def _bundled_backbone_onnx(self) -> LoadedBackbone | None:
        from registry.bundle import BUNDLED_ONNX

        bm = self._bundled("backbone")
        onnx = Path(bm.path) / BUNDLED_ONNX
        if not onnx.exists():
            return None
        tags = dict(bm.info.metadata["tags"])
        return LoadedBackbone(None, bm.info.metadata["version"], preprocessing_from_tags(tags), tags["label_set"].split(","), tags,
                              onnx=onnx.read_bytes())

    def _bundled_backbone(self) -> LoadedBackbone:
        import mlflow

        bm = self._bundled("backbone")
        tags = dict(bm.info.metadata["tags"])
        model = mlflow.pytorch.load_model(str(Path(bm.path) / "mlflow_model"), map_location="cpu").eval()
        return LoadedBackbone(model, bm.info.metadata["version"], preprocessing_from_tags(tags), tags["label_set"].split(","), tags)


class ChampionWatcher:
    """Polls the head's aliases and calls ``on_change(new_head_version)`` when the champion moves,
    and ``on_aliases(aliases)`` after every poll the registry answered (e.g. to follow the challenger).

    A failed load is logged and retried at the next poll; the old model keeps serving.
    """

    def __init__(self, source: ModelSource, current: Callable[[], str | None], on_change: Callable[[str], None], interval_s: float,
                 on_missing: Callable[[], object] | None = None, on_aliases: Callable[[dict[str, str]], object] | None = None):
        self.source, self.current, self.on_change, self.on_missing, self.on_aliases = source, current, on_change, on_missing, on_aliases
        self.loop = Periodic(self.check_now, interval_s, f"champion-watcher-{source.registry.task}")

    def check_now(self) -> bool:
        aliases = self.source.head_aliases()
        if aliases is not None and CHAMPION not in aliases and self.on_missing is not None and self.on_missing():  # the registry was filled
            aliases = self.source.head_aliases()
        wanted = None if aliases is None else aliases.get(CHAMPION)
        switched = False
        if wanted is not None and wanted != self.current():
            try:
                self.on_change(wanted)
                switched = True
                freeze_long_lived()  # the new model's objects join the frozen heap (service/heap.py)
            except Exception:
                log.exception("could not switch to head v%s; still serving v%s", wanted, self.current())
        if aliases is not None and self.on_aliases is not None:
            try:
                self.on_aliases(aliases)
            except Exception:
                log.exception("could not follow the aliases %s", aliases)
        return switched


class ChampionFollower:
    """One task's models in one worker: loaded now if the registry has a champion, then, once
    started, kept current by a :class:`ChampionWatcher`. Subclasses say what a switch loads."""

    def __init__(self, settings: Settings, task: str):
        self.task, self.settings = task, settings
        self._lease_db: Database | None = None
        self._next_register_try = 0.0
        use_short_registry_timeouts(settings)
        try:  # before this process's first registry client: see register_initial_once
            if initial_registration(settings, task) is not None:
                register_initial_once(settings, task)
        except RegistryError as exc:
            log.warning("%s: %s; the champion watcher retries", task, exc)
        except Exception:
            log.exception("%s: could not register the shipped model now; the champion watcher retries", task)
        self.source = ModelSource(settings, task)
        try:
            self.switch(self.source.champion_head_version())
        except Exception:
            log.exception("%s: no model loaded yet; not ready until the registry has a champion", task)
        self.watcher = ChampionWatcher(self.source, self.current_head_version, self.switch, settings.models.model_poll_s,
                                       on_missing=self._register_if_empty, on_aliases=self.aliases_seen)

    def _register_if_empty(self) -> bool:
        """The registry answers but has no champion (it was down at start, or a registering
        process died): register the shipped model, at most once a minute per worker."""
        if initial_registration(self.settings, self.task) is None or time.monotonic() < self._next_register_try:
            return False
        self._next_register_try = time.monotonic() + SHIPPED_RETRY_S
        try:
            if self.source.registry.champion_if_reachable("head") is not None:
                return True
        except RegistryError:
            return False  # an outage: keep serving what we have
        if self._lease_db is None:
            self._lease_db = Database(self.settings.storage.database_url)
        return register_initial_once(self.settings, self.task, wait_s=0, lease=Lease(self._lease_db)) is not None

    def start(self) -> "ChampionFollower":
        self.watcher.loop.start()
        return self

    def stop(self) -> None:
        self.watcher.loop.stop()
        if self._lease_db is not None:
            self._lease_db.close()

    def switch(self, head_version: str | None) -> None:
        raise NotImplementedError

    def aliases_seen(self, aliases: dict[str, str]) -> None:
        """Every answered poll's aliases (champion, challenger, ...); nothing to do by default."""

    def current_head_version(self) -> str | None:
        raise NotImplementedError
