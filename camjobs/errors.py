"""Exit codes and the errors that carry them: what each failure means to a scheduler, said once.

The CLI reports any CamjobsError as one line and exits with its `exit_code` (camjobs.cli does
this in one place), so the same mistake gets the same code from every command. Plain Python,
no third-party imports: every module may import it.
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FAILED = 1  # the job (or the command's work) failed
EXIT_USAGE = 2  # bad usage or configuration: fix the command line, the config or the dataset
EXIT_ERROR_BUDGET = 3  # the job wrote everything, but more inputs failed than --max-error-fraction
# Stopped by a signal, as a shell reports it (128 + the signal's number): the run published nothing.
EXIT_INTERRUPTED = 130  # SIGINT: Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM: kill, `ray job stop`, a Kubernetes pod deleted or past its deadline


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


class Interrupted(CamjobsError):
    """A run stopped by SIGINT or SIGTERM (exit 128 + the signal's number); `run_id` names it once known.

    `published`: the signal came while the run published, which was finished first (camjobs.interrupt)."""

    def __init__(self, signum: int, run_id: str | None = None, published: bool = False):
        super().__init__(exit_code=128 + signum)
        self.signum, self.run_id, self.published = signum, run_id, published

    def __str__(self) -> str:
        run = f"run {self.run_id}" if self.run_id else "the run"
        name = signal.Signals(self.signum).name
        if self.published:
            return f"{run} was published, then stopped by {name}"
        return f"{run} interrupted by {name}: nothing was published"
