"""The MLflow model registry as InfantinO uses it: two registered models per task (backbone, head), aliases champion/challenger."""

from registry.store import LoadedBackbone, LoadedHead, ModelRegistry, RegistryError

__all__ = ["ModelRegistry", "RegistryError", "LoadedBackbone", "LoadedHead"]
