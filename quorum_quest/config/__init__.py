"""Settings: models (`settings`) and how they are found and loaded (`loader`)."""

from quorum_quest.config.loader import find_config_file, load_settings
from quorum_quest.config.settings import Settings

__all__ = ["Settings", "find_config_file", "load_settings"]
