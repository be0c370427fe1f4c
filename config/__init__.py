from config.errors import FerryError
from config.registry import Registry
from config.settings import ModelEntry, Settings, load_settings

__all__ = ["FerryError", "ModelEntry", "Registry", "Settings", "load_settings"]
