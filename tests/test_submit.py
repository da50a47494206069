"""`camjobs submit/status/logs/stop/delete/list` against a real `ray start --head` with token auth on.

The head is a separate cluster from the in-process one of conftest's `ray_cluster`: it listens on
free ports of 127.0.0.1 only, keeps its files in its own temp dir, and at the end only the
processes that use that temp dir are stopped. `submit` runs as a subprocess of this venv's
`camjobs`, the quick commands in-process through CliRunner; both with a clean environment (no RAY_*
variables, a HOME without ~/.ray/auth_token), and no output of any command may contain the token.
`--verify` meets a real HTTPS server with a certificate from a CA made here.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

from camjobs.cli import app
from camjobs.cluster import submit as jobs

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "fixtures" / "isic2017-mini"
BIN = Path(sys.executable).parent
CLASSES = "melanoma,nevus,seborrheic_keratosis"
SMALL_JOB = ["--data", str(MINI), "--model", "resnet18", "--classes", CLASSES, "--input-size", "64"]


# --- unit tests: no cluster -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["http://10.1.2.3:8265", "http://192.168.0.7:8265", "http://head.example.org:8265", "http://[2001:db8::1]:8265"],
)
def test_plain_http_to_another_machine_warns(address):
    warning = jobs.insecure_address_warning(address)
    assert warning and jobs.SECURITY_URL in warning and "run code" in warning


@pytest.mark.parametrize(
    "address",
    [
        "http://127.0.0.1:8265",
        "http://127.3.4.5:8265",
        "http://localhost:8265",
        "http://[::1]:8265",
        "https://10.1.2.3:8265",
    ],
)
def test_loopback_or_https_does_not_warn(address):
    assert jobs.insecure_address_warning(address) is None


def test_address_flag_then_api_server_address_then_ray_address():
    env = {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:2", "RAY_ADDRESS": "http://127.0.0.1:3"}
    assert jobs.resolve_address("http://127.0.0.1:1/", env) == ("http://127.0.0.1:1", "--address")
    assert jobs.resolve_address(None, env) == ("http://127.0.0.1:2", "RAY_API_SERVER_ADDRESS")
    assert jobs.resolve_address(None, {"RAY_ADDRESS": "https://h:8265"}) == ("https://h:8265", "RAY_ADDRESS")
    with pytest.raises(jobs.SubmitError, match="no cluster address") as none:
        jobs.resolve_address(None, {})
    assert none.value.exit_code == 2
    for bad in ("127.0.0.1:6379", "auto", "ray://head:10001"):
        with pytest.raises(jobs.SubmitError, match="not an http"):
            jobs.resolve_address(None, {"RAY_ADDRESS": bad})


def test_token_lookup_follows_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    env = {"RAY_AUTH_TOKEN": " from-env ", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    assert jobs.resolve_token(" from-flag ", env) == ("from-flag", "--token")
    assert jobs.resolve_token(None, env) == ("from-env", "RAY_AUTH_TOKEN")
    assert jobs.resolve_token(None, {**env, "RAY_AUTH_TOKEN": ""}) == (
        "from-file",
        f"RAY_AUTH_TOKEN_PATH ({token_file})",
    )
    with pytest.raises(jobs.SubmitError, match="RAY_AUTH_TOKEN_PATH is set but"):
        jobs.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert jobs.resolve_token(None, {}) == (None, "")
    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-home\n")
    assert jobs.resolve_token(None, {}) == ("from-home", str(default))


def test_entrypoint_is_a_shell_safe_camjobs_run_command():
    command = jobs.entrypoint(
        {
            "data": "/data/my images",
            "output": "s3://b/o",
            "classes": "a,b",
            "threshold": 0.25,
            "actors": None,
            "follow_symlinks": True,
            "incremental": False,
            "verbose": False,
        },
        python="/opt/venv/bin/python",
    )
    assert shlex.split(command) == [
        "/opt/venv/bin/python",
        "-m",
        "camjobs",
        "run",
        "--data",
        "/data/my images",
        "--output",
        "s3://b/o",
        "--classes",
        "a,b",
        "--threshold",
        "0.25",
        "--follow-symlinks",
    ]


def test_entrypoint_passes_choice_options_as_their_values():
    from camjobs.config import DecodeOn, Layout, Method

    command = jobs.entrypoint({"method": Method.GRADCAM_PP, "layout": Layout.ISIC2017, "decode_on": DecodeOn.GPU})
    assert shlex.split(command)[4:] == ["--method", "gradcam++", "--layout", "isic2017", "--decode-on", "gpu"]


def test_submit_takes_every_run_option_but_address():
    from typer.main import get_command

    commands = get_command(app).commands
    run_options = {p.name for p in commands["run"].params}
    submit_options = {p.name for p in commands["submit"].params}
    assert run_options <= submit_options  # --address and --config are submit's own
    assert {"token", "verify", "wait", "submission_id", "python", "pip"} <= submit_options
    for name in ("status", "logs", "stop", "delete", "list"):
        assert {"address", "token", "verify"} <= {p.name for p in commands[name].params}


def test_address_precedence_is_rays_for_ray_and_the_flags_for_camjobs(monkeypatch):
    """The README's table, against Ray's own functions: its Jobs client lets the environment win
    over the address it is given, ray.init() and `ray status` let the given address win."""
    from ray._private.services import canonicalize_bootstrap_address
    from ray.dashboard.utils import get_address_for_submission_client

    env = {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:2", "RAY_ADDRESS": "http://127.0.0.1:3"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert get_address_for_submission_client("http://127.0.0.1:1") == "http://127.0.0.1:2"
    assert jobs.resolve_address("http://127.0.0.1:1") == ("http://127.0.0.1:1", "--address")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert get_address_for_submission_client("http://127.0.0.1:1") == "http://127.0.0.1:3"
    assert jobs.resolve_address(None) == ("http://127.0.0.1:3", "RAY_ADDRESS")

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert canonicalize_bootstrap_address("10.0.0.1:6379") == "10.0.0.1:6379"
    assert canonicalize_bootstrap_address(None) == "10.0.0.2:6379"
    assert canonicalize_bootstrap_address("auto") == "10.0.0.2:6379"


def test_camjobs_jobs_are_told_by_their_mark_else_their_entrypoint():
    def job(entrypoint, metadata=None, submission_id="raysubmit_1"):
        return SimpleNamespace(entrypoint=entrypoint, metadata=metadata, submission_id=submission_id)

    assert jobs.is_camjobs_job(job("echo hi", {"submitted_by": "camjobs"}))
    assert jobs.is_camjobs_job(job(jobs.entrypoint({"data": "/d e", "output": "/o"}, python="/opt/py 3/python")))
    assert not jobs.is_camjobs_job(job("python -m camjobs.other run", {}))
    assert not jobs.is_camjobs_job(job("python train.py -m camjobs run", {"submitted_by": "someone"}))
    assert not jobs.is_camjobs_job(job("python -c 'unclosed", None))
    # A driver job (a `camjobs run --address` on the cluster) was not submitted: no submission id.
    assert not jobs.is_camjobs_job(job("python -m camjobs run --data /d", {}, submission_id=None))


@pytest.mark.parametrize(
    "status, code, expected",
    [
        ("SUCCEEDED", 0, 0),
        ("FAILED", 3, 3),
        ("FAILED", 1, 1),
        ("FAILED", None, 1),
        ("FAILED", -9, 137),
        ("STOPPED", None, 1),
    ],
)
def test_exit_code_is_the_jobs_own(status, code, expected):
    assert jobs.exit_code(SimpleNamespace(status=status, driver_exit_code=code)) == expected


class RecordingServer:
    """A real HTTP server that records each request and hangs up without an answer, as a dead proxy does."""

    def __init__(self, host: str):
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append((self.path, dict(self.headers)))
                self.close_connection = True

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.address = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _non_loopback_ipv4() -> str:
    """This machine's own address on its default route (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            pytest.skip("no network interface besides loopback")
        host = probe.getsockname()[0]
    if jobs.is_loopback_host(host):
        pytest.skip("no network interface besides loopback")
    return host


def test_cli_warns_about_plain_http_and_sends_the_token_only_as_a_header(monkeypatch):
    server = RecordingServer(_non_loopback_ipv4())
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # --address must win over it
    token = "unit-" + secrets.token_hex(8)
    try:
        result = CliRunner().invoke(app, ["list", "--address", server.address, "--token", token])
    finally:
        server.close()
    assert result.exit_code == 2
    assert "plain http" in result.stderr and jobs.SECURITY_URL in result.stderr
    assert f"cannot reach the Ray Jobs API at {server.address}" in result.stderr
    assert token not in result.output + result.stderr
    assert server.requests, "the client never reached the --address server"
    for path, headers in server.requests:
        assert headers.get("Authorization") == f"Bearer {token}"
        assert token not in path


def test_submit_checks_job_options_before_contacting_anything():
    server = RecordingServer("127.0.0.1")
    try:
        result = CliRunner().invoke(
            app, ["submit", "--address", server.address, "--data", "/d", "--output", "/o", "--method", "nope"]
        )
    finally:
        server.close()
    assert result.exit_code == 2 and "method" in result.stderr
    assert server.requests == []


# --- TLS: a real HTTPS server with a CA made here --------------------------------------------------


def _certificate(subject: str, key, issuer=None, issuer_key=None, ca: bool = False):
    """An X.509 certificate for `key`: a CA's own (self-signed) or, with an issuer, a server's for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        usage = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
                **usage,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem_files(folder: Path) -> SimpleNamespace:
    """A private CA (ca.pem) and a server certificate it signed (server.pem, server.key); another CA (other-ca.pem)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("camjobs test CA", ca_key, ca=True)
    files = SimpleNamespace(
        ca=folder / "ca.pem", other_ca=folder / "other-ca.pem", cert=folder / "server.pem", key=folder / "server.key"
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    other = _certificate("another CA", other_key, ca=True)
    files.other_ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    server = _certificate("127.0.0.1", server_key, issuer=ca, issuer_key=ca_key)
    files.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


class HttpsServer:
    """A real HTTPS server on 127.0.0.1, as an HTTPS proxy in front of the Jobs API would be.

    With `upstream` it forwards every request there (a reverse proxy); without, it answers the
    Jobs API's version endpoint and an empty job list itself. It records the paths it was asked for.
    """

    def __init__(self, pem: SimpleNamespace, upstream: str | None = None):
        import ray

        paths = self.paths = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if upstream:
                    status, data = _forward(upstream, self.command, self.path, dict(self.headers), body)
                elif self.path == "/api/version":
                    status, data = 200, json.dumps({"version": "4", "ray_version": ray.__version__}).encode()
                elif self.path.startswith("/api/jobs"):
                    status, data = 200, b"[]"
                else:
                    status, data = 404, b"not found"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_DELETE = do_GET

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem.cert, pem.key)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.address = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _forward(upstream: str, method: str, path: str, headers: dict, body: bytes | None) -> tuple[int, bytes]:
    host, port = upstream.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    sent = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
    connection.request(method, path, body, sent)
    response = connection.getresponse()
    return response.status, response.read()


def test_verify_names_the_flag_for_a_missing_or_bad_file_before_contacting_anything(tmp_path):
    server = RecordingServer("127.0.0.1")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    try:
        for bad, reason in ((tmp_path / "missing.pem", "no such file"), (garbage, "not a PEM CA certificate")):
            result = CliRunner().invoke(app, ["list", "--address", server.address, "--verify", str(bad)])
            assert result.exit_code == 2, result.output
            assert f"--verify {bad}: {reason}" in result.stderr
        assert server.requests == []

        # https:// to a plain http server: TLS fails, and the message says so in a few words.
        https = server.address.replace("http://", "https://")
        result = CliRunner().invoke(app, ["list", "--address", https])
        assert result.exit_code == 2
        assert f"TLS with {https} failed (wrong version number): is it an https:// endpoint?" in result.stderr
    finally:
        server.close()


def test_verify_trusts_a_private_ca_and_without_it_the_certificate_is_refused(tmp_path):
    pem = _pem_files(tmp_path / "tls")
    server = HttpsServer(pem)
    try:
        trusted = CliRunner().invoke(app, ["list", "--address", server.address, "--verify", str(pem.ca), "--all"])
        assert trusted.exit_code == 0, trusted.output
        assert trusted.stdout.startswith("SUBMISSION ID")  # the server's (empty) job list, past TLS
        assert "/api/jobs/" in server.paths
        reached = len(server.paths)

        refused = CliRunner().invoke(app, ["list", "--address", server.address])
        assert refused.exit_code == 2
        assert f"the TLS certificate of {server.address} could not be verified" in refused.stderr
        assert "certificate" in refused.stderr.split("(", 1)[1] and "--verify CA_FILE" in refused.stderr

        other = CliRunner().invoke(
            app, ["status", "raysubmit_x", "--address", server.address, "--verify", str(pem.other_ca)]
        )
        assert other.exit_code == 2
        assert f"is not signed by the CA in --verify {pem.other_ca}" in other.stderr
        assert len(server.paths) == reached  # neither request got past the handshake
    finally:
        server.close()


# --- a real head node -----------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _cluster_pids(root: str) -> set[int]:
    """Live processes of the cluster kept in `root`: those naming it or holding a file under it."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if root.encode() in f.read():
                    found.add(int(entry))
                    continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(root):
                        found.add(int(entry))
                        break
                except OSError:
                    pass
        except OSError:
            pass
    return found


def _stop_cluster(root: str) -> None:
    # Not `ray stop`: that stops every Ray process on the machine, other clusters' too.
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in _cluster_pids(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline and _cluster_pids(root):
            time.sleep(0.2)
        if not _cluster_pids(root):
            return


def _start_head(root: str, token: str) -> str:
    port, dashboard, client, agent, agent_grpc, env_agent, metrics, objects, nodes = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # Bind to 127.0.0.1, not the machine's network address (Ray swaps loopback for it otherwise).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Jobs run `python`: make it this venv's, as on a cluster started from an activated venv.
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(env_agent),
        "--metrics-export-port",
        str(metrics),
        "--object-manager-port",
        str(objects),
        "--node-manager-port",
        str(nodes),
        "--temp-dir",
        root,
        "--disable-usage-stats",
    ]
    import ray._private.utils

    if ray._private.utils.get_ray_client_dependency_error() is None:
        command += ["--ray-client-server-port", str(client)]  # else it would take 10001
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return f"http://127.0.0.1:{dashboard}"


@pytest.fixture(scope="module")
def head():
    import ray._private.utils

    missing = ray._private.utils.get_dashboard_dependency_error()
    if missing:
        pytest.skip(f"the Ray Jobs API needs ray[default] (the dashboard): {missing}")
    token = "cjtok-" + secrets.token_hex(20)
    root = tempfile.mkdtemp(prefix="cjray-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        for attempt in range(2):  # a free port can be taken between picking and binding it
            try:
                address = _start_head(root, token)
                break
            except RuntimeError:
                _stop_cluster(root)
                if attempt:
                    raise
        deadline = time.time() + 90
        while True:
            try:
                jobs.list_jobs(jobs.connect(address, token, "--token"))
                break
            except jobs.SubmitError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield SimpleNamespace(address=address, token=token, root=root)
    finally:
        _stop_cluster(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A HOME without ~/.ray/auth_token, so the token comes only from what a test gives."""
    return tmp_path_factory.mktemp("home")


def _clean_env(home, env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**clean, "HOME": str(home), **(env or {})}


def camjobs(head, home, *args, env=None, timeout=300):
    """`camjobs ARGS` as a subprocess in a clean environment; its output must not hold the token."""
    exe = [str(BIN / "camjobs")] if (BIN / "camjobs").exists() else [sys.executable, "-m", "camjobs"]
    result = subprocess.run(
        exe + list(args), env=_clean_env(home, env), capture_output=True, text=True, timeout=timeout
    )
    assert head.token not in result.stdout + result.stderr
    return SimpleNamespace(returncode=result.returncode, stdout=result.stdout, stderr=result.stderr)


def cli(head, home, *args, env=None):
    """The same in this process (CliRunner: no interpreter start, for the quick commands)."""
    unset = {k: None for k in os.environ if k.startswith("RAY_")}
    result = CliRunner().invoke(app, list(args), env={**unset, "HOME": str(home), **(env or {})})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert head.token not in result.stdout + result.stderr
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def wait_for(head, home, job_id, statuses, timeout=240) -> dict:
    deadline = time.time() + timeout
    while True:
        result = cli(head, home, "status", job_id, "--json", "--address", head.address, "--token", head.token)
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        if info["status"] in statuses:
            return info
        assert time.time() < deadline, f"{job_id} still {info['status']}"
        time.sleep(1)


@pytest.mark.slow
def test_submit_wait_runs_the_job_and_exits_with_its_code(head, home, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(head.token + "\n")
    closed_port = _free_ports(1)[0]
    result = camjobs(
        head,
        home,
        "submit",
        *SMALL_JOB,
        "--output",
        str(tmp_path / "out"),
        "--address",
        head.address,
        env={"RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_ADDRESS": f"http://127.0.0.1:{closed_port}"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    assert "6 processed, 0 errors" in result.stdout  # the job's own output, streamed
    assert f"job {job_id} SUCCEEDED" in result.stderr
    assert "python -m camjobs run --data" in result.stdout  # Ray logs the entrypoint it ran
    assert len(pd.read_parquet(tmp_path / "out" / "cams")) == 6


@pytest.mark.slow
def test_submit_no_wait_then_status_logs_and_list(head, home, tmp_path):
    result = camjobs(
        head,
        home,
        "submit",
        *SMALL_JOB,
        "--output",
        str(tmp_path / "out"),
        "--no-wait",
        "--token",
        head.token,
        env={"RAY_API_SERVER_ADDRESS": head.address},
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[-1]
    assert result.stdout.strip() == job_id
    info = wait_for(head, home, job_id, {"SUCCEEDED", "FAILED", "STOPPED"})
    assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0

    logs = cli(head, home, "logs", job_id, "--address", head.address, "--token", head.token)
    assert logs.returncode == 0 and "6 processed, 0 errors" in logs.stdout
    status = cli(head, home, "status", job_id, "--address", head.address, "--token", head.token)
    assert "status: SUCCEEDED" in status.stdout and "exit_code: 0" in status.stdout
    listed = cli(head, home, "list", env={"RAY_ADDRESS": head.address, "RAY_AUTH_TOKEN": head.token})
    assert listed.returncode == 0 and job_id in listed.stdout
    assert len(pd.read_parquet(tmp_path / "out" / "cams")) == 6


@pytest.mark.slow
def test_stop_a_running_job(head, home):
    cluster = jobs.connect(head.address, head.token, "--token")
    job_id = jobs.submit(cluster, "python -c 'import time; time.sleep(600)'", {})
    wait_for(head, home, job_id, {"RUNNING"}, timeout=60)

    stopped = cli(head, home, "stop", job_id, "--address", head.address, "--token", head.token)
    assert stopped.returncode == 0 and f"stopping {job_id}" in stopped.stdout
    info = wait_for(head, home, job_id, {"STOPPED", "SUCCEEDED", "FAILED"}, timeout=60)
    assert info["status"] == "STOPPED"
    assert jobs.exit_code(jobs.job_info(cluster, job_id)) == 1
    again = cli(head, home, "stop", job_id, "--address", head.address, "--token", head.token)
    assert again.returncode == 0 and "is not running (STOPPED)" in again.stdout


@pytest.mark.slow
def test_failed_jobs_exit_with_their_own_code(head, home, tmp_path):
    # A checkpoint that does not exist: the job's `camjobs run` exits 2 (a configuration mistake).
    missing = camjobs(
        head,
        home,
        "submit",
        "--data",
        str(MINI),
        "--output",
        str(tmp_path / "out1"),
        "--checkpoint",
        str(tmp_path / "missing.pt"),
        "--address",
        head.address,
        "--token",
        head.token,
    )
    assert missing.returncode == 2, missing.stderr
    assert "--checkpoint" in missing.stdout and "no such file" in missing.stdout
    assert "FAILED, exit code 2" in missing.stderr
    job_id = missing.stdout.splitlines()[-1]
    status = cli(head, home, "status", job_id, "--address", head.address, "--token", head.token)
    assert "status: FAILED" in status.stdout and "exit_code: 2" in status.stdout

    # Over the error budget (one image of two is empty): the run writes everything and exits 3.
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(next((MINI / "ISIC-2017_Training_Data").glob("*.jpg")), data / "good.jpg")
    (data / "empty.jpg").write_bytes(b"")
    over = camjobs(
        head,
        home,
        "submit",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "out2"),
        "--model",
        "resnet18",
        "--classes",
        CLASSES,
        "--input-size",
        "64",
        "--address",
        head.address,
        "--token",
        head.token,
    )
    assert over.returncode == 3, over.stdout[-3000:] + over.stderr[-3000:]
    assert "1 processed, 1 errors" in over.stdout and "FAILED, exit code 3" in over.stderr


@pytest.mark.slow
def test_wrong_or_missing_token_is_a_clear_error(head, home, tmp_path):
    wrong = "wrong-" + secrets.token_hex(12)
    result = cli(head, home, "list", "--address", head.address, "--token", wrong)
    assert result.returncode == 2
    assert "authentication failed" in result.stderr and "rejected the auth token from --token" in result.stderr
    assert wrong not in result.stdout + result.stderr

    before = len(jobs.list_jobs(jobs.connect(head.address, head.token)))
    result = camjobs(
        head,
        home,
        "submit",
        *SMALL_JOB,
        "--output",
        str(tmp_path / "out"),
        "--no-wait",
        "--address",
        head.address,
        env={"RAY_AUTH_TOKEN": wrong},
    )
    assert result.returncode == 2 and "authentication failed" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
    assert wrong not in result.stdout + result.stderr
    assert len(jobs.list_jobs(jobs.connect(head.address, head.token))) == before  # nothing was submitted

    # A fresh process: Ray caches the token of a cluster this test process may have joined.
    result = camjobs(head, home, "status", "raysubmit_x", "--address", head.address)  # no token anywhere
    assert result.returncode == 2 and "authentication required" in result.stderr and "--token" in result.stderr


@pytest.mark.slow
def test_unknown_job_unreachable_and_missing_address(head, home):
    auth = ["--address", head.address, "--token", head.token]
    for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        result = cli(head, home, *command, "raysubmit_doesnotexist", *auth)
        assert result.returncode == 2, (command, result.stderr)
        assert "no job 'raysubmit_doesnotexist'" in result.stderr

    closed_port = _free_ports(1)[0]
    result = cli(head, home, "list", "--address", f"http://127.0.0.1:{closed_port}", "--token", head.token)
    assert result.returncode == 2 and "cannot reach the Ray Jobs API" in result.stderr

    result = cli(head, home, "list", "--token", head.token)
    assert result.returncode == 2 and "no cluster address" in result.stderr


@pytest.mark.slow
def test_delete_a_finished_job_refuse_a_running_or_unknown_one(head, home):
    auth = ["--address", head.address, "--token", head.token]
    cluster = jobs.connect(head.address, head.token, "--token")
    finished = jobs.submit(cluster, "python -c 'print(\"to be deleted\")'", {})
    running = jobs.submit(cluster, "python -c 'import time; time.sleep(600)'", {})
    wait_for(head, home, finished, {"SUCCEEDED"}, timeout=120)
    wait_for(head, home, running, {"RUNNING"}, timeout=60)
    try:
        refused = cli(head, home, "delete", running, *auth)
        assert refused.returncode == 2
        assert f"job {running} is RUNNING: only a finished job can be deleted (camjobs stop {running} first)" in (
            refused.stderr
        )
        with pytest.raises(RuntimeError, match="non-terminal state"):  # what Ray itself does
            cluster.client.delete_job(running)
        assert jobs.job_info(cluster, running).status == "RUNNING"

        log_file = Path(head.root) / "session_latest" / "logs" / f"job-driver-{finished}.log"
        assert "to be deleted" in log_file.read_text()
        deleted = cli(head, home, "delete", finished, *auth)
        assert deleted.returncode == 0 and deleted.stdout.strip() == f"deleted {finished}"
        for command in ("status", "logs", "delete"):
            gone = cli(head, home, command, finished, *auth)
            assert gone.returncode == 2 and f"no job {finished!r}" in gone.stderr, (command, gone.stderr)
        assert finished not in cli(head, home, "list", "--all", *auth).stdout
        assert log_file.exists()  # Ray's delete leaves the driver's log file on the head's disk

        unknown = cli(head, home, "delete", "raysubmit_doesnotexist", *auth)
        assert unknown.returncode == 2 and "no job 'raysubmit_doesnotexist'" in unknown.stderr
    finally:
        jobs.stop(cluster, running)


@pytest.mark.slow
def test_list_shows_camjobs_jobs_unless_all(head, home):
    auth = ["--address", head.address, "--token", head.token]
    cluster = jobs.connect(head.address, head.token, "--token")
    marked = jobs.submit(cluster, "python -c 'print(1)'", {})  # submit's metadata mark, any entrypoint
    # Submitted by Ray's client without the mark: a camjobs run entrypoint (as before the mark), and another job.
    unmarked = cluster.client.submit_job(entrypoint="python -m camjobs run --help")
    foreign = cluster.client.submit_job(entrypoint="python -c 'print(2)'")
    for job_id in (marked, unmarked, foreign):
        wait_for(head, home, job_id, {"SUCCEEDED", "FAILED"}, timeout=120)
    ours = {marked, unmarked}

    listed = cli(head, home, "list", *auth)
    assert listed.returncode == 0
    assert all(job_id in listed.stdout for job_id in ours) and foreign not in listed.stdout
    assert "other jobs not shown (--all lists them)" in listed.stderr
    everything = cli(head, home, "list", "--all", *auth)
    assert all(job_id in everything.stdout for job_id in (marked, unmarked, foreign))
    assert "not shown" not in everything.stderr

    as_json = json.loads(cli(head, home, "list", "--json", *auth).stdout)
    all_json = json.loads(cli(head, home, "list", "--all", "--json", *auth).stdout)
    assert ours <= {job["submission_id"] for job in as_json} and foreign not in {j["submission_id"] for j in as_json}
    assert {job["submission_id"] for job in all_json} == {job.submission_id for job in cluster.client.list_jobs()}


@pytest.mark.slow
def test_address_flag_wins_over_the_environment_where_rays_cli_does_not(head, home):
    closed = f"http://127.0.0.1:{_free_ports(1)[0]}"
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        ours = cli(head, home, "list", "--all", "--address", head.address, "--token", head.token, env={name: closed})
        assert ours.returncode == 0, ours.stderr

    def ray_job_list(env):
        env = {**_clean_env(home, env), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
        command = [str(BIN / "ray"), "job", "list", "--address", head.address]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert ray_job_list({}).returncode == 0
    theirs = ray_job_list({"RAY_API_SERVER_ADDRESS": closed})
    assert theirs.returncode != 0 and closed in theirs.stdout + theirs.stderr


@pytest.mark.slow
def test_verify_through_an_https_proxy_to_the_cluster(head, home, tmp_path):
    pem = _pem_files(tmp_path / "tls")
    proxy = HttpsServer(pem, upstream=head.address)
    try:
        auth = ["--token", head.token, "--all", "--json"]
        direct = cli(head, home, "list", "--address", head.address, *auth)
        proxied = cli(head, home, "list", "--address", proxy.address, "--verify", str(pem.ca), *auth)
        assert proxied.returncode == 0, proxied.stderr
        assert [j["submission_id"] for j in json.loads(proxied.stdout)] == [
            j["submission_id"] for j in json.loads(direct.stdout)
        ]
        refused = cli(head, home, "list", "--address", proxy.address, *auth)
        assert refused.returncode == 2 and "could not be verified" in refused.stderr
    finally:
        proxy.close()
