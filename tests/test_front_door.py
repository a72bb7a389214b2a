"""The coordinator's front door (nginx) against a real SuperLink on loopback: what a party that reaches
the silos' listener with the public CA certificate can do (only what a SuperNode does), and what the
operator listener gives to the operator's certificate and to nobody else."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedshop.deploy.pki import make_node_keys, make_tls
from fedshop.deploy.processes import Control, DeploymentError, LocalFederation, Silo

# The coordinator's front door runs nginx: without it these tests are skipped (conftest `nginx`).
pytestmark = pytest.mark.usefixtures("nginx")

PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A SuperLink (TLS, node authentication) on loopback behind its front door; no silo."""
    folder = tmp_path_factory.mktemp("coordinator")
    silo = Silo(0, folder / "none.npz", folder / "state")
    with LocalFederation(folder / "fed", [silo]) as federation:
        federation.start_superlink()
        yield federation
    assert not _nginx_left(folder)


def _nginx_left(folder: Path) -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if "nginx" in line and str(folder) in line]


def _post(
    federation: LocalFederation, port: int, path: str, client: tuple[Path, Path] | None = None
) -> tuple[int, bytes]:
    """An empty protobuf POST to `path`, sent as written (no normalisation), over TLS that trusts
    the deployment CA and presents `client` (certificate, key) if given."""
    context = ssl.create_default_context(cafile=str(federation.tls_files.ca))
    if client is not None:
        context.load_cert_chain(*map(str, client))
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        connection.request("POST", path, body=b"", headers=PROTOBUF)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _registered(federation: LocalFederation) -> int:
    listed = federation.control.flwr("supernode", "ls", "fedshop", "--format", "json").stdout
    return len(json.loads(listed[listed.index("{") :])["nodes"])


def test_the_silos_listener_forwards_the_fleet_api_and_nothing_else(coordinator):
    operator = (coordinator.tls_files.operator_certificate, coordinator.tls_files.operator_key)
    # On loopback (the coordinator's own processes) the Control API answers this request.
    assert _post(coordinator, coordinator.port, "/v1/control/list-nodes")[0] == 200
    for path in [
        "/v1/control/list-nodes", "/v1/control/register-node", "/v1/control/start-run",
        "/v1/runtime/acquire-task", "/v1/runtime/pull-messages", "/docs", "/openapi.json",
        "/health", "/v1/fleet/../control/list-nodes", "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/..%2fcontrol/register-node", "//v1/control/list-nodes",
    ]:  # fmt: skip
        assert _post(coordinator, coordinator.public_port, path)[0] == 404, path
        # Not even with the operator's certificate: the silos' listener has no operator door.
        assert _post(coordinator, coordinator.public_port, path, operator)[0] == 404, path
    # The Fleet API reaches the SuperLink, which answers as it does on loopback (this node did not
    # sign in).
    direct = _post(coordinator, coordinator.port, "/v1/fleet/get-run")
    assert direct[0] == 401
    assert _post(coordinator, coordinator.public_port, "/v1/fleet/get-run") == direct


def test_an_outsider_with_the_ca_can_neither_register_a_node_nor_submit_an_app(
    coordinator, tmp_path
):
    _, public_key = make_node_keys(tmp_path / "keys", "outsider")
    before = _registered(coordinator)
    for port in (coordinator.public_port, coordinator.operator_port):
        outsider = Control(tmp_path / f"home-{port}", f"127.0.0.1:{port}", coordinator.tls_files.ca)
        with pytest.raises(DeploymentError, match="registering"):
            outsider.register(public_key)
        with pytest.raises(DeploymentError, match="flwr run failed"):
            outsider.submit({"silos": 1}, tmp_path / f"app-{port}")
    assert _registered(coordinator) == before
    runs = coordinator.control.flwr("ls", "fedshop", "--format", "json").stdout
    assert json.loads(runs[runs.index("{") :])["runs"] == []


def test_the_operator_listener_opens_the_control_api_to_the_operator_certificate_only(
    coordinator, tmp_path
):
    tls = coordinator.tls_files
    port = coordinator.operator_port
    credential = (tls.operator_certificate, tls.operator_key)
    assert _post(coordinator, port, "/v1/control/list-nodes", credential)[0] == 200
    # No certificate, the SuperLink's own (signed by the CA, for servers only), an operator
    # certificate from another deployment's CA: refused by nginx before anything is forwarded.
    other = make_tls(tmp_path / "other", ["localhost"])
    for client in [
        None,
        (tls.certificate, tls.key),
        (other.operator_certificate, other.operator_key),
    ]:
        try:
            status = _post(coordinator, port, "/v1/control/list-nodes", client)[0]
        except (ssl.SSLError, ConnectionError):
            continue  # refused in the TLS handshake
        assert status == 400, client  # nginx: "No required SSL certificate was sent" / invalid
    # With the certificate, only the Control API: not the Fleet or Runtime API.
    for path in ["/v1/fleet/get-run", "/v1/runtime/acquire-task", "/docs"]:
        assert _post(coordinator, port, path, credential)[0] == 404


def _fedshop(*args: object) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fedshop", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_deploy_register_from_elsewhere_needs_the_operator_credential(coordinator, tmp_path):
    tls = coordinator.tls_files
    _, public_key = make_node_keys(tmp_path / "keys", "silo-5")
    nodes = tmp_path / "node-silos.json"
    before = _registered(coordinator)
    # A SuperLink that is not on this host, without the credential: refused before any connection.
    refused = _fedshop(
        "deploy", "register", "--superlink", "superlink.example.com:9093", "--ca", tls.ca,
        "--nodes", nodes, public_key,
    )  # fmt: skip
    assert refused.returncode == 2 and "--operator-cert" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The operator listener with the credential: the key is registered.
    done = _fedshop(
        "deploy", "register", "--superlink", f"localhost:{coordinator.operator_port}",
        "--ca", tls.ca, "--operator-cert", tls.operator_certificate,
        "--operator-key", tls.operator_key, "--nodes", nodes, public_key,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert _registered(coordinator) == before + 1
    # The operator keeps which node the key got, for the server to tell silo 5 by its node.
    assert list(json.loads(nodes.read_text())) == ["5"]


def test_the_recipes_front_door_command_serves_the_same_two_listeners(coordinator, tmp_path):
    """`fedshop deploy front-door`, as the separate-host recipe runs it, in front of a SuperLink."""
    from fedshop.deploy.processes import _listening, free_port

    tls = coordinator.tls_files
    public, operator = free_port(), free_port()
    command = [
        sys.executable, "-m", "fedshop", "deploy", "front-door", "--certs", tls.ca.parent,
        "--superlink-port", coordinator.port, "--port", public, "--operator-port", operator,
        "--listen", "127.0.0.1", "--out", tmp_path / "front-door",
    ]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (_listening(public) and _listening(operator)):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert _post(coordinator, public, "/v1/control/register-node")[0] == 404
        assert _post(coordinator, public, "/v1/fleet/get-run")[0] == 401  # the SuperLink's answer
        credential = (tls.operator_certificate, tls.operator_key)
        assert _post(coordinator, operator, "/v1/control/list-nodes", credential)[0] == 200
        config = tmp_path / "front-door" / "nginx.conf"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    finally:
        process.terminate()  # nginx itself (the command execs it): a fast shutdown
        process.wait(timeout=30)
    assert not _listening(public)


def test_a_missing_nginx_is_one_line_that_says_how_to_install_it(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "fedshop", "deploy", "local", "--silos", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FEDSHOP_NGINX": str(tmp_path / "no-nginx")},
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "apt-get install nginx" in done.stderr and "FEDSHOP_NGINX" in done.stderr
    assert not out.exists()


def test_the_front_door_refuses_a_certificate_not_valid_for_localhost(tmp_path):
    """nginx checks the SuperLink's certificate on loopback under "localhost": a certificate made for
    the public name alone would fail every silo's request; the command says so instead."""
    certs = make_tls(tmp_path / "certs", ["superlink.example.com"])
    done = _fedshop(
        "deploy", "front-door", "--certs", certs.ca.parent, "--out", tmp_path / "front-door",
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not valid for localhost" in done.stderr and "fedshop deploy certs" in done.stderr


def test_deploy_certs_makes_a_superlink_certificate_for_loopback_and_an_operator_credential(
    tmp_path,
):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    done = _fedshop(
        "deploy", "certs", "--host", "superlink.example.com", "--silos", "1", "--out", tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    certs = tmp_path / "certs"
    server = x509.load_pem_x509_certificate((certs / "superlink.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.com", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    operator = x509.load_pem_x509_certificate((certs / "operator.crt").read_bytes())
    usage = operator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert stat.S_IMODE((certs / "operator.key").stat().st_mode) == 0o600
