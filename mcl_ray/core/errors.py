"""One error family for everything a user can fix. Each class carries the exit code the CLI
uses, so a command never decides it case by case:

    2  the config or the environment must change (a key, a missing model, a stage not run yet)
    1  the data or a run failed (bad rows under policy fail, a sweep with no usable trial)

The message says what is wrong and what to do; the CLI prints it without a traceback.
"""

from __future__ import annotations


class McrError(Exception):
    """Base of mcl-ray's user-facing errors."""

    exit_code = 1


class ConfigError(McrError, ValueError):
    """A config file, override or option that cannot be used; the message names the key path."""

    exit_code = 2


class SetupError(McrError, RuntimeError):
    """Something the config asks for is missing (MLflow, embeddings, synthetic rows, a model folder)."""

    exit_code = 2


class DataError(McrError, ValueError):
    """Input data that cannot be used as it is (names the table, file, column and rows)."""

    exit_code = 1


class RunError(McrError, RuntimeError):
    """A stage ran and failed (e.g. every trial of a sweep errored); the message says where to look."""

    exit_code = 1
