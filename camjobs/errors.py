"""Exit codes and the errors that carry them: what each failure means to a scheduler, said once.

The CLI reports any CamjobsError as one line and exits with its `exit_code` (camjobs.cli does
this in one place), so the same mistake gets the same code from every command. Plain Python,
no third-party imports: every module may import it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the job (or the command's work) failed
EXIT_USAGE = 2  # bad usage or configuration: fix the command line, the config or the dataset
EXIT_ERROR_BUDGET = 3  # the job wrote everything, but more inputs failed than --max-error-fraction
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT (128 + 2)


class CamjobsError(Exception):
    """An error the CLI reports as its message alone and exits with `exit_code`.

    A subclass fixes the code; `exit_code=` overrides it for one error (a job's own code).
    """

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CamjobsError):
    """Bad usage or configuration: an option, a config file, a dataset that is not what was asked for."""

    exit_code = EXIT_USAGE


class JobError(CamjobsError):
    """The job, or the command's work, failed."""

    exit_code = EXIT_FAILED
