"""User-facing errors: each carries one line that the CLI prints as is."""

from __future__ import annotations


class OnnxPruneError(Exception):
    """A problem with the user's input or environment (bad model, bad option, unwritable path).

    The CLI prints ``str(error)`` on one line and exits with status 2; anything else is a bug.
    """


class ModelLoadError(OnnxPruneError):
    """The model file is missing, unreadable or not a valid ONNX model."""


class ConfigError(OnnxPruneError):
    """An option is out of range or inconsistent with the model."""


class NothingToPruneError(OnnxPruneError):
    """The model has no channel group that can be pruned (all blocked or excluded)."""


class VerificationError(OnnxPruneError):
    """A rewritten model failed a check it must pass (checker, ORT run, unchanged interface).

    This is a bug in onnxprune, reported as a clear line rather than a broken output file.
    """


class TargetUnreachableError(OnnxPruneError):
    """A speed target that the model cannot reach, under ``--strict`` (nothing is written)."""
