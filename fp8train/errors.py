"""Errors that end a run with a one-paragraph message and no traceback.

Anything raised as an ``Fp8trainError`` is caught by ``train.py`` and the ``fp8train`` command, printed as
its message alone and turned into exit status 2. In a Hydra multirun the message names the job, the jobs after it
still run, and the sweep ends with a summary of the failed jobs and status 2. Raise it for problems the user can
fix (a config value, a data file, missing hardware support, a run that diverged); let genuine bugs raise ordinary
exceptions with their traceback.
"""


class Fp8trainError(Exception):
    """A problem the user can fix; its message says what to change."""


class ConfigError(Fp8trainError):
    """One or more invalid config values, each written in override syntax (``optim.lr=-1: must be > 0``)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"Invalid configuration ({n} problem{'s' if n != 1 else ''}):\n{lines}")


class DataError(Fp8trainError):
    """A data source or tokenizer that cannot be used as given."""


class CheckpointError(Fp8trainError):
    """A checkpoint that cannot be found, read or resumed from."""


class BackendError(Fp8trainError):
    """The requested device or library is not available on this machine."""
