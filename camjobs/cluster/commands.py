"""The cluster commands of the CLI: submit a run to a Ray cluster's Jobs API, then status, logs, stop,
delete, list.

They register on `camjobs.cli.app` when camjobs.cli is imported; the client itself is
camjobs.cluster.submit, imported when a command runs (so `camjobs --help` loads no Ray).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from camjobs.cli import _setup_logging, app, load_run_config, run
from camjobs.errors import EXIT_INTERRUPTED

# --- Ray Jobs API: run the job on a remote cluster -------------------------------------------------

AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray Jobs API (dashboard) URL, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS).",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help=(
            "Cluster auth token (default: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else "
            "~/.ray/auth_token). Never printed."
        ),
        show_default=False,
    ),
]
VerifyOption = Annotated[
    str | None,
    typer.Option(
        "--verify",
        metavar="CA_FILE",
        help=(
            "PEM file of the CA that signed an https:// address's certificate (an HTTPS proxy with a "
            "private CA); default: the system's CAs."
        ),
        show_default=False,
    ),
]
# `run` options that `submit` declares itself: its --address is the Jobs API's URL (the job joins
# the cluster it runs on), and its --config is a path on the cluster, not checked for here.
NOT_PASSED_THROUGH = ("address", "config")


def with_run_options(func):
    """Give a command every option of `run` (but --address and --config) ahead of its own.

    The command takes them as **job_options, so an option added to `run` is submitted too.
    """
    shared = [
        param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for param in inspect.signature(run, eval_str=True).parameters.values()
        if param.name not in NOT_PASSED_THROUGH
    ]
    own = [
        param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for param in inspect.signature(func, eval_str=True).parameters.values()
        if param.kind is not param.VAR_KEYWORD
    ]
    func.__signature__ = inspect.Signature(shared + own)
    return func


def _cluster(address: str | None, token: str | None, verify: str | None):
    """Connect to the Jobs API; a SubmitError (exit 2) says why not."""
    from camjobs.cluster import submit as jobs

    url, _ = jobs.resolve_address(address)
    secret, source = jobs.resolve_token(token)
    ca = jobs.resolve_verify(verify)
    return jobs.connect(
        url, secret, source, warn=lambda message: typer.echo(f"camjobs: warning: {message}", err=True), verify=ca
    )


def _check_job_options(config: str | None, flags: dict[str, Any]) -> None:
    """Validate the job options here, so a mistake fails now rather than on the cluster (skipped
    when --config names a file that exists only there)."""
    if config is not None and not Path(config).is_file():
        return
    load_run_config(Path(config) if config else None, flags)


@app.command()
@with_run_options
def submit(
    config: str | None = typer.Option(
        None, "--config", help="YAML file of job options, read on the cluster; flags override it."
    ),
    address: AddressOption = None,
    token: TokenOption = None,
    verify: VerifyOption = None,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Stream the job's logs and exit with its exit code."),
    submission_id: str | None = typer.Option(
        None, help="Submission id to use (unique per cluster; default: Ray picks one)."
    ),
    python: str = typer.Option("python", help="The cluster's Python interpreter for the job's command."),
    pip: list[str] | None = typer.Option(
        None,
        "--pip",
        help=(
            "Have Ray pip-install this requirement for the job (repeatable; needs the cluster to reach a package "
            "index)."
        ),
    ),
    **job_options: Any,
) -> None:
    """Run `camjobs run` on a Ray cluster through its Jobs API; prints the submission id last.

    Takes every option of `run` but --address, as `python -m camjobs run ...` on the cluster, with
    this camjobs package shipped along. Paths (--data, --output, --checkpoint, --config) are read
    by the job on the cluster: they must exist there, and relative ones are relative to the job's
    working directory there.
    """
    from camjobs.cluster import submit as jobs

    _setup_logging(bool(job_options.get("verbose")))
    _check_job_options(config, {k: v for k, v in job_options.items() if k != "verbose"})
    cluster = _cluster(address, token, verify)
    command = jobs.entrypoint({"config": config, **job_options}, python=python)
    job_id = jobs.submit(cluster, command, jobs.runtime_env(pip), submission_id)
    typer.echo(f"camjobs: submitted {job_id} to {cluster.address}", err=True)
    if not wait:
        typer.echo(job_id)
        return
    try:
        info = jobs.follow(cluster, job_id, write=lambda text: typer.echo(text, nl=False))
    except jobs.SubmitError as exc:
        typer.echo(job_id)
        raise jobs.SubmitError(
            f"{exc} (job {job_id} may still be running: camjobs status {job_id})", exc.exit_code
        ) from exc
    except KeyboardInterrupt:
        typer.echo(f"camjobs: stopped following; job {job_id} goes on (camjobs stop {job_id} stops it)", err=True)
        typer.echo(job_id)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    code = jobs.exit_code(info)
    exit_note = f", exit code {info.driver_exit_code}" if getattr(info, "driver_exit_code", None) is not None else ""
    typer.echo(f"camjobs: job {job_id} {info.status}{exit_note}", err=True)
    typer.echo(job_id)
    if code:
        raise typer.Exit(code)


@app.command()
def status(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: AddressOption = None,
    token: TokenOption = None,
    verify: VerifyOption = None,
    as_json: bool = typer.Option(False, "--json", help="Print Ray's whole job record as JSON."),
) -> None:
    """Show a submitted job's status and, once it ended, its exit code."""
    import json

    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token, verify)
    info = jobs.job_info(cluster, job_id)
    if as_json:
        typer.echo(json.dumps(jobs.info_dict(info), indent=2))
        return
    for name, value in jobs.summary_lines(info):
        typer.echo(f"{name}: {value}")


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: AddressOption = None,
    token: TokenOption = None,
    verify: VerifyOption = None,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """Print a submitted job's logs (its driver's stdout and stderr)."""
    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token, verify)
    if follow:
        jobs.follow(cluster, job_id, write=lambda text: typer.echo(text, nl=False))
    else:
        typer.echo(jobs.job_logs(cluster, job_id), nl=False)


@app.command()
def stop(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: AddressOption = None,
    token: TokenOption = None,
    verify: VerifyOption = None,
) -> None:
    """Stop a submitted job (SIGTERM, then SIGKILL after Ray's grace period)."""
    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token, verify)
    stopped = jobs.stop(cluster, job_id)
    state = "" if stopped else jobs.job_info(cluster, job_id).status
    typer.echo(f"stopping {job_id}" if stopped else f"{job_id} is not running ({state})")


@app.command()
def delete(
    job_id: str = typer.Argument(..., help="Submission id."),
    address: AddressOption = None,
    token: TokenOption = None,
    verify: VerifyOption = None,
) -> None:
    """Delete a finished job's record (status, metadata, logs through the API) from the cluster.

    A job that has not finished is refused (exit 2): stop it first. As with `ray job delete`, the
    driver's log file stays on the head node's disk.
    """
    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token, verify)
    jobs.delete(cluster, job_id)
    typer.echo(f"deleted {job_id}")


@app.command("list")
def list_(
    address: AddressOption = None,
    token: TokenOption = None,
    verify: VerifyOption = None,
    every: bool = typer.Option(False, "--all", help="List every job on the cluster, not only camjobs' own."),
    as_json: bool = typer.Option(False, "--json", help="Print Ray's job records as JSON."),
) -> None:
    """List the cluster's jobs that camjobs submitted (--all: every job), oldest first."""
    import json

    from camjobs.cluster import submit as jobs

    cluster = _cluster(address, token, verify)
    everything = jobs.list_jobs(cluster)
    found = everything if every else [info for info in everything if jobs.is_camjobs_job(info)]
    if len(found) < len(everything):
        typer.echo(f"camjobs: {len(everything) - len(found)} other jobs not shown (--all lists them)", err=True)
    if as_json:
        typer.echo(json.dumps([jobs.info_dict(info) for info in found], indent=2))
        return
    typer.echo(f"{'SUBMISSION ID':<30} {'STATUS':<10} {'EXIT':>4}  {'STARTED':<20}  ENTRYPOINT")
    for info in found:
        fields = dict(jobs.summary_lines(info))
        entry = fields["entrypoint"] if len(fields["entrypoint"]) <= 70 else fields["entrypoint"][:67] + "..."
        typer.echo(
            f"{fields['submission_id']:<30} {fields['status']:<10} {fields['exit_code']:>4}  "
            f"{fields['start_time']:<20}  {entry}"
        )
