from pulse_core.errors import ConfigError, InputError, ModelFileError, PulseError, StorageError

__all__ = ["ConfigError", "InputError", "ModelFileError", "PulseError", "StorageError"]
