"""Typed errors: each message tells the user what to do next.

Callers (CLI, flows) catch `PulseError` to record a failure without crashing a batch; the
subclasses say whose fault it is: the input, the model file, storage, or the configuration.
"""

from __future__ import annotations


class PulseError(Exception):
    """Base of every error this project raises on purpose."""


class InputError(PulseError):
    """An input image cannot be used (unreadable, too large, wrong size...)."""


class ModelFileError(PulseError):
    """A generator file is missing, corrupt, of an unknown format or fails its checksum."""


class StorageError(PulseError):
    """Reading or writing a source or destination failed."""


class ConfigError(PulseError, ValueError):
    """A parameter value is invalid (unknown loss term, operator, optimiser...)."""
