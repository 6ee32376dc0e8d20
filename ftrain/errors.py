"""ftrain's exceptions, one hierarchy.

    FtrainError                 anything ftrain refuses, with a one-line message
     ├── UsageError             bad command line (a --set with no '=', a missing script)
     ├── PolicyError            a policy file that does not validate (file, line, key)
     ├── ConfigError            a config file that cannot be read or overridden
     └── RunDirError            a run folder that is not one, is locked, or is finished

The CLI catches only ``FtrainError``, prints its message on one line and exits 2.
Lower-level errors (OSError, yaml.YAMLError) are translated where they enter.
"""

from __future__ import annotations


class FtrainError(Exception):
    """Base of every error ftrain reports to a user."""


class UsageError(FtrainError):
    """The command line asks for something that cannot be done."""


class PolicyError(FtrainError):
    """A policy file is invalid. ``errors`` holds every problem found, one line each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class ConfigError(FtrainError):
    """A config file cannot be read, parsed, or overridden as asked."""


class RunDirError(FtrainError):
    """A run folder cannot be used: not a run folder, locked, finished, or too new."""
