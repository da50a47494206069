"""Run `camjobs run` on a remote Ray cluster through Ray's Jobs API (the dashboard's HTTP port).

`camjobs submit` turns its job options back into a `python -m camjobs run ...` command line and
submits it with `ray.job_submission.JobSubmissionClient`, shipping this camjobs package along
(`runtime_env.py_modules`) so the cluster needs only Ray, torch and the other dependencies.
`status`, `logs`, `stop`, `delete` and `list` talk to the same API; `list` tells camjobs' jobs
from others by the mark `submit` puts in the job's metadata.

The address is camjobs' own choice, not Ray's: --address wins over the environment, where Ray's
Jobs client lets RAY_API_SERVER_ADDRESS and RAY_ADDRESS win over the address it is given.
An https:// address is checked against the system's CAs, or the CA file of --verify (an HTTPS
proxy with a private CA).

Authentication: Ray >= 2.59 clusters use token auth. The token is sent as an
`Authorization: Bearer` header and is never printed, logged or put in the job. It is looked up the
way Ray looks it up, with --token first: RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH,
then ~/.ray/auth_token.

Ray is imported only inside the functions that talk to a cluster: the address and token helpers
are plain Python.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import shlex
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from camjobs.errors import EXIT_FAILED, UsageError

log = logging.getLogger(__name__)

SECURITY_URL = "https://docs.ray.io/en/latest/ray-security/index.html"
TOKEN_AUTH_URL = "https://docs.ray.io/en/latest/ray-security/token-auth.html"
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# The mark `submit` puts in each job's metadata (Ray keeps it with the job; values are strings).
SUBMITTED_BY = ("submitted_by", "camjobs")


class SubmitError(UsageError):
    """Talking to the cluster failed; the message says why (never with the token in it). Exit 2: the
    address, the token or the cluster's state is for the person at the command line to fix."""


# --- address ------------------------------------------------------------------------------------


def resolve_address(flag: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The Jobs API URL and where it came from: --address, then RAY_API_SERVER_ADDRESS, then RAY_ADDRESS."""
    candidates = [("--address", flag)] + [(name, environ.get(name)) for name in ADDRESS_ENV_VARS]
    source, address = next(((s, a.strip()) for s, a in candidates if a and a.strip()), ("", ""))
    if not address:
        raise SubmitError(
            "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard's HTTP address), "
            "or set RAY_API_SERVER_ADDRESS"
        )
    scheme = urlsplit(address).scheme if "://" in address else ""
    if scheme not in ("http", "https") or not urlsplit(address).hostname:
        raise SubmitError(
            f"{address!r} (from {source}) is not an http:// or https:// address: give the Ray dashboard's "
            "address, e.g. http://HEAD:8265 (a cluster address such as HEAD:6379 or ray://... is not the Jobs API)"
        )
    return address.rstrip("/"), source


def is_loopback_host(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1 literals. Names are not resolved (no DNS lookups)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_address_warning(address: str) -> str | None:
    """A warning for plain http to anything but this machine: the Jobs API runs whatever it is sent."""
    parts = urlsplit(address)
    if parts.scheme != "http" or is_loopback_host(parts.hostname or ""):
        return None
    return (
        f"{address} is plain http to another machine: the job and the auth token cross the network "
        "unencrypted, and anyone who can reach the dashboard port can submit jobs, that is run code, "
        "on the cluster. Keep the port on a private network behind a firewall, reach it through an SSH "
        f"tunnel or an authenticating HTTPS proxy, and keep token auth on; see {SECURITY_URL}"
    )


# --- token --------------------------------------------------------------------------------------


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def resolve_token(flag: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str | None, str]:
    """The auth token and a description of its source (never the token), or (None, "") when there is none.

    The order after --token is Ray 2.60's own (its AuthenticationTokenLoader): RAY_AUTH_TOKEN, then
    RAY_AUTH_TOKEN_PATH (an error when set but unreadable or empty), then ~/.ray/auth_token;
    surrounding whitespace is stripped and an empty value counts as unset.
    """
    if flag is not None:
        if not flag.strip():
            raise SubmitError("--token is empty")
        return flag.strip(), "--token"
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        token = _read_token_file(Path(token_path))
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH is set but {token_path} cannot be read or is empty")
        return token, f"RAY_AUTH_TOKEN_PATH ({token_path})"
    token = _read_token_file(default_token_path())
    if token:
        return token, str(default_token_path())
    return None, ""


def _read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


# --- TLS -----------------------------------------------------------------------------------------


def resolve_verify(ca_file: str | None) -> str | bool:
    """requests' `verify` for --verify: True (the system's CAs) without it, else the CA file's path.

    A missing file, or one without a PEM certificate, fails here naming --verify, rather than
    later as a TLS error from inside Ray's client.
    """
    if ca_file is None:
        return True
    path = Path(ca_file).expanduser()
    if not path.is_file():
        raise SubmitError(
            f"--verify {ca_file}: no such file (give the PEM file of the CA that signed the server's certificate)"
        )
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise SubmitError(f"--verify {ca_file}: not a PEM CA certificate file ({exc.reason or exc})") from None
    return str(path.resolve())


def tls_failure(exc: BaseException) -> tuple[bool, str] | None:
    """(a certificate was rejected, why) where TLS failed somewhere in `exc`'s chain, else None.

    Ray's client re-raises requests' SSLError as a bare ConnectionError, so the chain is searched.
    """
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.exceptions.SSLError | ssl.SSLError):
            rejected = re.search(r"certificate verify failed: ([^(')\"]+)", str(seen))
            if rejected:
                return True, rejected.group(1).strip()
            other = re.search(r"\[SSL: \w+\] ([^(')\"]+)", str(seen))
            return False, other.group(1).strip() if other else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


# --- the job's command line ---------------------------------------------------------------------


def run_arguments(options: Mapping[str, Any]) -> list[str]:
    """`camjobs run` flags for the given options: None and False are left out, True is a bare flag."""
    argv: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def entrypoint(options: Mapping[str, Any], python: str = "python") -> str:
    """The job's shell command: `python -m camjobs run ...`, quoted for /bin/sh."""
    return shlex.join([python, "-m", "camjobs", "run", *run_arguments(options)])


def runtime_env(pip: list[str] | None = None) -> dict[str, Any]:
    """Ship this camjobs package with the job; install pip packages only when asked."""
    import camjobs

    env: dict[str, Any] = {"py_modules": [str(Path(camjobs.__file__).resolve().parent)]}
    if pip:
        env["pip"] = list(pip)
    return env


# --- talking to the cluster ---------------------------------------------------------------------


@dataclass
class Cluster:
    """A connected JobSubmissionClient, with what the error messages need to know about it."""

    client: Any
    address: str
    token_source: str
    verify: str | bool = True


@contextmanager
def _address_env(address: str) -> Iterator[None]:
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS and RAY_ADDRESS override the address it is
    # given; pin it to ours while the client is built, so --address always wins.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def connect(
    address: str,
    token: str | None,
    token_source: str = "",
    warn: Callable[[str], None] = log.warning,
    verify: str | bool = True,
) -> Cluster:
    """Connect to the Jobs API at `address` (checking that it answers, its TLS certificate where it
    is https, and that the token is accepted)."""
    warning = insecure_address_warning(address)
    if warning:
        warn(warning)
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with _address_env(address), translate_errors(address, token_source, verify=verify):
        client = JobSubmissionClient(address, headers=headers, verify=verify)
    if token is None and not is_loopback_host(urlsplit(address).hostname or ""):
        warn(
            f"the cluster at {address} answered without an auth token: its token authentication is off, "
            f"so anyone who can reach it can run code on it; see {TOKEN_AUTH_URL}"
        )
    return Cluster(client, address, token_source, verify)


@contextmanager
def translate_errors(
    address: str, token_source: str, job_id: str | None = None, verify: str | bool = True
) -> Iterator[None]:
    """Turn the Jobs API's exceptions into SubmitErrors with messages a person can act on."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        if str(exc).startswith("Authentication required"):
            raise SubmitError(
                f"authentication required: the cluster at {address} uses token authentication and no token "
                "was sent. Pass --token, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the token in "
                f"~/.ray/auth_token; see {TOKEN_AUTH_URL}"
            ) from None
        raise SubmitError(
            f"authentication failed: the cluster at {address} rejected the auth token from "
            f"{token_source or 'the environment'}; check that it is this cluster's token "
            f"(ray get-auth-token on the head node); see {TOKEN_AUTH_URL}"
        ) from None
    except (ConnectionError, requests.exceptions.RequestException) as exc:
        _raise_tls_failure(exc, address, verify)
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address}: is the cluster up, and is this its dashboard "
            f"address (port 8265 by default)? ({type(exc).__name__})"
        ) from None
    except RuntimeError as exc:
        message = str(exc)
        if job_id is not None and re.search(r"status code 404\b", message):
            raise SubmitError(
                f"no job {job_id!r} on the cluster at {address} (camjobs list --all shows its jobs)"
            ) from None
        raise SubmitError(f"the Ray Jobs API at {address} refused the request: {message}") from None


def _raise_tls_failure(exc: BaseException, address: str, verify: str | bool) -> None:
    """A SubmitError saying what to do where `exc` is a TLS failure; nothing otherwise."""
    failure = tls_failure(exc)
    if failure is None:
        return
    rejected, why = failure
    if not rejected:
        raise SubmitError(f"TLS with {address} failed ({why}): is it an https:// endpoint?") from None
    if isinstance(verify, str):
        raise SubmitError(
            f"the TLS certificate of {address} is not signed by the CA in --verify {verify} ({why})"
        ) from None
    raise SubmitError(
        f"the TLS certificate of {address} could not be verified against the system's CAs ({why}): "
        "if a private CA signed it (an HTTPS proxy's own), pass that CA's PEM file as --verify CA_FILE"
    ) from None


def _errors(cluster: Cluster, job_id: str | None = None):
    return translate_errors(cluster.address, cluster.token_source, job_id, cluster.verify)


def submit(cluster: Cluster, command: str, env: dict[str, Any], submission_id: str | None = None) -> str:
    from camjobs import __version__

    with _errors(cluster):
        return cluster.client.submit_job(
            entrypoint=command,
            runtime_env=env,
            submission_id=submission_id,
            metadata={SUBMITTED_BY[0]: SUBMITTED_BY[1], "camjobs_version": __version__},
        )


def job_info(cluster: Cluster, job_id: str):
    with _errors(cluster, job_id):
        return cluster.client.get_job_info(job_id)


def job_logs(cluster: Cluster, job_id: str) -> str:
    with _errors(cluster, job_id):
        return cluster.client.get_job_logs(job_id)


def stop(cluster: Cluster, job_id: str) -> bool:
    with _errors(cluster, job_id):
        return cluster.client.stop_job(job_id)


def delete(cluster: Cluster, job_id: str) -> None:
    """Delete a finished job's record from the cluster (Ray's delete_job): its status, metadata and
    the API's access to its logs. A job still going is refused first, with what to do about it."""
    info = job_info(cluster, job_id)
    if not info.status.is_terminal():
        raise SubmitError(
            f"job {job_id} is {info.status}: only a finished job can be deleted (camjobs stop {job_id} first)"
        )
    with _errors(cluster, job_id):
        deleted = cluster.client.delete_job(job_id)
    if not deleted:
        raise SubmitError(f"the cluster at {cluster.address} did not delete job {job_id}")


def list_jobs(cluster: Cluster) -> list:
    with _errors(cluster):
        return sorted(cluster.client.list_jobs(), key=lambda job: job.start_time or 0)


def is_camjobs_job(info) -> bool:
    """Whether `camjobs submit` submitted this job: the mark in its metadata, else (for jobs
    submitted without the mark) an entrypoint that is `<python> -m camjobs run ...`. Driver jobs
    (a script's ray.init, `camjobs run --address`) were not submitted: they have no submission id."""
    if not info.submission_id:
        return False
    if (info.metadata or {}).get(SUBMITTED_BY[0]) == SUBMITTED_BY[1]:
        return True
    try:
        words = shlex.split(info.entrypoint or "")
    except ValueError:  # not a shell command line we could have built
        return False
    return words[1:4] == ["-m", "camjobs", "run"]


def follow(cluster: Cluster, job_id: str, write: Callable[[str], None], poll_s: float = 1.0):
    """Write the job's logs as they come until it ends; return its final JobDetails.

    Streams with the Jobs API's websocket (`tail_job_logs`); where that fails (a proxy that does not
    pass websockets, a dropped connection) it goes on by polling the whole log and writing what is new.
    """
    job_info(cluster, job_id)  # an unknown id fails here, with a clear message
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in cluster.client.tail_job_logs(job_id):
            write(chunk)
            written += len(chunk)

    streamed = False
    try:
        asyncio.run(tail())
        streamed = True
    except Exception as exc:  # noqa: BLE001 - any websocket failure: fall back to polling
        log.debug("log stream from %s ended (%s: %s); polling instead", cluster.address, type(exc).__name__, exc)
    while True:
        info = job_info(cluster, job_id)
        if streamed and info.status.is_terminal():
            return info
        streamed = False  # the stream closed early (a proxy's idle timeout): poll to the end
        logs = job_logs(cluster, job_id)
        if len(logs) > written:
            write(logs[written:])
            written = len(logs)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


def exit_code(info) -> int:
    """The exit status for a finished job: 0 if it succeeded, else the driver's own code where Ray has it.

    Ray 2.60 reports `driver_exit_code` for jobs whose entrypoint ran and exited; a job that was
    stopped, or that failed before its entrypoint ran (runtime env setup), has none: 1.
    """
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if status == "FAILED" and isinstance(code, int) and code != 0:
        return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
    return EXIT_FAILED


def summary_lines(info) -> list[tuple[str, str]]:
    """The fields `camjobs status` prints, with only the first line of Ray's message (it embeds log tails)."""
    message = (info.message or "").splitlines()
    return [
        ("submission_id", info.submission_id or info.job_id or ""),
        ("status", str(info.status)),
        ("exit_code", "" if getattr(info, "driver_exit_code", None) is None else str(info.driver_exit_code)),
        ("message", message[0] if message else ""),
        ("start_time", format_time(info.start_time)),
        ("end_time", format_time(info.end_time)),
        ("entrypoint", info.entrypoint or ""),
    ]


def format_time(millis: int | None) -> str:
    if not millis:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(millis / 1000))


def info_dict(info) -> dict[str, Any]:
    """JobDetails as JSON-ready data."""
    dump = getattr(info, "model_dump", None)
    return dump(mode="json") if dump else info.dict()
