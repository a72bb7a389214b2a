"""The parties' processes: a whole federation on this machine, one process per party, as it would
run across hosts.

`LocalFederation` starts one SuperLink (TLS, SuperNode authentication on) on loopback, its front door
(nginx, front_door.py: the silos reach the Fleet API through it, nothing else) and one SuperNode per
silo, each in its own process group with its own Flower home folder, registers every silo's key,
submits the FedShop app with `flwr run`, waits for the run and stops every process it started, also
on failure or Ctrl-C. `commands()` prints the same steps for separate hosts.

Each silo is two processes (party_runtime.py): its SuperNode (`--isolation process`, its Runtime API
on 127.0.0.1 only, task hand-out guarded by an owner-only secret) and FedShop's long-lived executor,
which has PyTorch and FedShop imported once and runs each message in a fork of itself. The executor
is supervised: while the federation waits for a run, a dead one is started again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedshop.deploy.front_door import (
    Address,
    nginx_command,
    write_front_door,
    write_operator_bridge,
)
from fedshop.deploy.identities import NODES_FILE, SiloNodes
from fedshop.deploy.pki import TlsFiles, make_audit_keys, make_node_keys, make_tls
from fedshop.errors import FedShopError
from fedshop.storage.private_files import (
    create_private_once,
    open_private_append,
    private_dir,
    write_private,
)

APP_DIR = Path(__file__).parent / "flower_app"
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr come with flwr
# What Flower's processes write (the SuperLink's database of messages, installed apps, their homes)
# is their owner's only, as is everything FedShop writes (`storage/private_files.py`).
UMASK = 0o077


class DeploymentError(FedShopError):
    """A party did not start, the run failed, or it did not finish in time."""


@dataclass
class Silo:
    index: int
    data: Path
    state: Path
    private_key: Path | None = None
    public_key: Path | None = None
    extra_config: dict[str, str] = field(default_factory=dict)  # more of its --node-config


@dataclass
class LocalFederation:
    folder: Path  # everything of the deployment: certs, keys, logs, each party's home
    silos: list[Silo]
    tls: bool = True
    authenticate: bool = True
    port: int = 0  # the SuperLink's, on loopback; 0: a free one
    public_port: int = 0  # the front door's listener for the silos; 0: a free one
    operator_port: int = 0  # the front door's listener for the operator (client certificate)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    tls_files: TlsFiles | None = None
    nodes: SiloNodes = field(default_factory=SiloNodes)  # silo → its registered node
    runtimes: dict[int, tuple[int, Path]] = field(default_factory=dict)  # its Runtime API, secret

    @property
    def nodes_file(self) -> Path:
        return self.folder / NODES_FILE

    def __post_init__(self) -> None:
        if self.authenticate and not self.tls:
            raise DeploymentError("SuperNode authentication needs TLS")
        if not self.tls:
            raise DeploymentError("the front door serves TLS only")
        self.folder = self.folder.resolve()
        private_dir(self.folder / "logs")
        self.port = self.port or free_port()
        self.public_port = self.public_port or free_port()
        self.operator_port = self.operator_port or free_port()
        self.env = flower_environment()
        if self.tls:
            self.tls_files = make_tls(self.folder / "certs", ["127.0.0.1", "localhost"])
        if self.authenticate:
            for silo in self.silos:
                silo.private_key, silo.public_key = make_node_keys(
                    self.folder / "keys", f"silo-{silo.index}"
                )
        for silo in self.silos:  # each silo's audit key: it signs the models it receives
            if "audit-key" not in silo.extra_config:
                audit_key, _ = make_audit_keys(self.folder / "keys", f"silo-{silo.index}")
                silo.extra_config["audit-key"] = str(audit_key)
        self.control = Control(
            self.folder / "home" / "cli",
            f"127.0.0.1:{self.port}",
            self.tls_files.ca if self.tls_files else None,
            self.env,
        )

    # -- parties -------------------------------------------------------------------------------

    def start(self) -> None:
        self.start_superlink()
        for silo in self.silos:
            if self.authenticate:
                self.register(silo)
            self.start_silo(silo)

    def start_superlink(self) -> None:
        command = [
            str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--disable-runtime-dependency-installation",
            # On disk, so that a restarted SuperLink still knows the registered nodes.
            "--database", str(self.folder / "superlink.db"),
        ]  # fmt: skip
        if self.tls_files:
            command += [
                "--ssl-ca-certfile", str(self.tls_files.ca),
                "--ssl-certfile", str(self.tls_files.certificate),
                "--ssl-keyfile", str(self.tls_files.key),
            ]  # fmt: skip
        else:
            command += ["--insecure"]
        if self.authenticate:
            command += ["--enable-supernode-auth"]
        self._wait_listening(self._spawn("superlink", command), "superlink", [self.port])
        front_door = self.processes.get("front-door")
        if front_door is None or front_door.poll() is not None:  # a restarted SuperLink keeps it
            self.start_front_door()

    def start_front_door(self) -> None:
        """nginx on the public and operator ports, in front of the SuperLink on loopback."""
        assert self.tls_files is not None
        config = write_front_door(
            self.folder / "front-door", self.port, self.tls_files.ca,
            self.tls_files.certificate, self.tls_files.key,
            public=Address("127.0.0.1", self.public_port),
            operator=Address("127.0.0.1", self.operator_port),
        )  # fmt: skip
        process = self._spawn("front-door", nginx_command(config))
        self._wait_listening(process, "front-door", [self.public_port, self.operator_port])

    def _wait_listening(self, process: subprocess.Popen, name: str, ports: list[int]) -> None:
        deadline = time.monotonic() + 60
        while not all(_listening(port) for port in ports):
            if process.poll() is not None or time.monotonic() > deadline:
                raise DeploymentError(f"the {name} did not start:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def register(self, silo: Silo) -> None:
        """Register the silo's key and write down which node serves it (`identities.py`)."""
        assert silo.public_key is not None
        self.nodes.add(silo.index, self.control.register(silo.public_key))
        self.nodes.write(self.nodes_file)

    def start_silo(self, silo: Silo, private_key: Path | None = None) -> subprocess.Popen:
        node_config = f'silo-data="{silo.data}" state-dir="{silo.state}"'
        node_config += "".join(f' {k}="{v}"' for k, v in silo.extra_config.items())
        # The Runtime API on loopback; only a holder of the silo's secret is handed its tasks.
        port = free_port()
        secret = self.folder / "keys" / f"silo-{silo.index}-executor.secret"
        create_private_once(secret, os.urandom(32))
        self.runtimes[silo.index] = (port, secret)
        command = [
            sys.executable, "-m", "fedshop.deploy.party_runtime", "supernode",
            "--superlink", f"127.0.0.1:{self.public_port}", "--isolation", "process",
            "--host", "127.0.0.1", "--port", str(port),
            "--superexec-auth-secret-file", str(secret), "--node-config", node_config,
        ]  # fmt: skip
        command += (
            ["--root-certificates", str(self.tls_files.ca)] if self.tls_files else ["--insecure"]
        )
        key = private_key or silo.private_key
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        # The silos share this machine's cores: as many threads each as would not oversubscribe
        # them (spinning OpenMP threads of several processes on one core slow all of them ~5×).
        threads = max(1, (os.cpu_count() or 1) // max(1, len(self.silos)))
        self.threads = {"OMP_NUM_THREADS": str(threads)}
        supernode = self._spawn(f"silo-{silo.index}", command, self.threads)
        self.start_executor(silo.index)
        return supernode

    def start_executor(self, index: int) -> subprocess.Popen:
        """The silo's long-lived executor (party_runtime.py), next to its SuperNode: its own
        process group, the silo's Flower home and log."""
        port, secret = self.runtimes[index]
        name = f"silo-{index}"
        command = [
            sys.executable, "-m", "fedshop.deploy.party_runtime", "executor",
            "--runtime-api-address", f"127.0.0.1:{port}",
            "--superexec-auth-secret-file", str(secret),
            "--parent-pid", str(self.processes[name].pid),
        ]  # fmt: skip
        return self._spawn(f"{name}-executor", command, self.threads, home=name)

    def supervise(self) -> None:
        """Start again the executor of any silo whose SuperNode runs and whose executor died."""
        for index in self.runtimes:
            supernode = self.processes.get(f"silo-{index}")
            executor = self.processes.get(f"silo-{index}-executor")
            if supernode is None or executor is None or supernode.poll() is not None:
                continue
            if executor.poll() is not None:
                with open_private_append(self.folder / "logs" / f"silo-{index}.log") as log:
                    log.write(f"fedshop: the executor exited ({executor.returncode}); "
                              "starting it again\n".encode())  # fmt: skip
                self.start_executor(index)

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one party (and what it started: a silo's executor too); for trials of failures."""
        names = [name, *([f"{name}-executor"] if f"{name}-executor" in self.processes else [])]
        for each in names:
            _signal_tree(self.processes[each].pid, sig)
        for each in names:
            self.processes[each].wait(timeout=30)

    # -- runs ----------------------------------------------------------------------------------

    def submit(self, run_config: dict[str, object]) -> int:
        return self.control.submit(run_config, self.folder / "app")

    def wait(self, run_id: int, timeout: float, on_poll=None) -> None:
        def check() -> None:
            self.supervise()
            if on_poll is not None:
                on_poll()
            if self.processes["superlink"].poll() is not None:
                raise DeploymentError(f"the SuperLink stopped:\n{self.log_tail('superlink')}")

        # Every status check is a fresh `flwr` process (about a second of CPU): every 5 s, not
        # every second, so that it does not take the parties' cores (rounds are timed by the
        # server, not by this loop).
        self.control.wait(run_id, timeout, check, interval=5.0)

    def _spawn(
        self, name: str, command: list[str], env: dict | None = None, home: str | None = None
    ) -> subprocess.Popen:
        """Start a party's process `name`; `home`: whose Flower home and log it shares."""
        folder = private_dir(self.folder / "home" / (home or name))
        environment = {**self.env, **(env or {}), "FLWR_HOME": str(folder)}
        # A party's log may quote its private data in an error: owner-only, as its files.
        with open_private_append(self.folder / "logs" / f"{home or name}.log") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, umask=UMASK,
                start_new_session=True,  # its own process group: stopped as a whole
            )  # fmt: skip
        self.processes[name] = process
        return process

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.folder / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """Stop every process this federation started and everything they started, and wait
        until none is left (SIGKILL for any that outlives a grace period)."""
        # Everyone first (before any exits and its children are re-parented), then the signals.
        family: set[int] = set(_started_under(self.folder / "home"))
        for process in self.processes.values():
            family |= {process.pid, *_descendants(process.pid)}
        _signal(family, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal({pid for pid in family if _alive(pid)}, signal.SIGKILL)
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Control:
    """The `flwr` command line against one SuperLink: register nodes, submit and watch runs."""

    def __init__(self, home: Path, address: str, ca: Path | None, env: dict | None = None) -> None:
        self.home, self.address, self.ca = home, address, ca
        self.env = env or flower_environment()
        self._write_cli_config()

    def register(self, public_key: Path) -> int:
        """Let the SuperNode with this key join; the node id the SuperLink gave it."""
        result = self.flwr("supernode", "register", str(public_key), "fedshop", "--format", "json")
        reply = _json_in(result.stdout)
        if result.returncode != 0 or not reply.get("success") or "node-id" not in reply:
            raise DeploymentError(
                f"registering {public_key} failed: {result.stdout}{result.stderr}"
            )
        return int(reply["node-id"])

    def submit(self, run_config: dict[str, object], app: Path) -> int:
        """Submit FedShop's Flower app (copied to `app`) with `run_config`; the run's id."""
        if not app.exists():
            copy_app(app)
        settings = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        result = self.flwr("run", str(app), "fedshop", "--run-config", settings, "--format", "json")
        reply = _json_in(result.stdout)
        # flwr exits 0 with --format json even when the run was refused: read "success".
        if not reply.get("success"):
            raise DeploymentError(f"flwr run failed: {result.stdout}{result.stderr}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> tuple[str, str]:
        result = self.flwr("ls", "fedshop", "--run-id", str(run_id), "--format", "json")
        reply = _json_in(result.stdout)
        if not reply.get("success") or not reply.get("runs"):
            raise DeploymentError(f"flwr ls failed: {result.stdout}{result.stderr}")
        run = reply["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))

    def wait(self, run_id: int, timeout: float, on_poll=None, interval: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status, details = self.status(run_id)
            if on_poll is not None:
                on_poll()
            if status == "finished:completed":
                return
            if status.startswith("finished"):
                raise DeploymentError(
                    f"the run ended {status.split(':')[1]}: {details}\n{self.server_log(run_id)}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(f"the run did not finish within {timeout:.0f} s")
            time.sleep(interval)

    def server_log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), "fedshop", "--show").stdout[-4000:]

    # -- plumbing ------------------------------------------------------------------------------

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        env = {**self.env, "FLWR_HOME": str(self.home)}
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=120,
            umask=UMASK,
        )  # fmt: skip

    def _write_cli_config(self) -> None:
        private_dir(self.home)
        lines = ["[superlink]", 'default = "fedshop"', "", "[superlink.fedshop]"]
        lines.append(f'address = "{self.address}"')
        if self.ca is not None:
            lines.append(f'root-certificates = "{Path(self.ca).resolve()}"')
        else:
            lines.append("insecure = true")
        write_private(self.home / "config.toml", "\n".join(lines) + "\n")


def copy_app(target: Path) -> None:
    """FedShop's Flower app (its entry points) into `target`, owner-only as the rest."""
    for source in APP_DIR.rglob("*"):
        if source.is_file() and "__pycache__" not in source.parts:
            write_private(target / source.relative_to(APP_DIR), source.read_bytes())


@contextlib.contextmanager
def operator_control(
    home: Path, superlink: str, ca: Path, operator: tuple[Path, Path] | None = None
) -> Iterator[Control]:
    """The flwr CLI against a SuperLink's Control API: on this host's loopback directly; elsewhere
    only through the coordinator's operator listener, with the operator's certificate and key
    (`operator`), which a local nginx presents for the CLI (see front_door.py)."""
    address = Address.parse(superlink)
    if operator is None:
        if not address.loopback:
            raise DeploymentError(
                f"{address} is not this host: the SuperLink's Control API (registering nodes, "
                "submitting runs) is open on the coordinator's loopback only, or from elsewhere "
                "through its operator listener with the operator's credential: add "
                "--operator-cert operator.crt --operator-key operator.key (from fedshop deploy "
                "certs), or run this on the coordinator against 127.0.0.1:PORT"
            )
        yield Control(home, str(address), ca)
        return
    for path in operator:
        if not Path(path).is_file():
            raise DeploymentError(f"operator credential {path} does not exist")
    port = free_port()
    config = write_operator_bridge(home / "operator-bridge", address, port, ca, *operator)
    with (config.parent / "nginx.log").open("ab") as log:
        bridge = subprocess.Popen(
            nginx_command(config), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port):
            if bridge.poll() is not None or time.monotonic() > deadline:
                log_text = (config.parent / "nginx.log").read_text(errors="replace")[-2000:]
                raise DeploymentError(
                    f"the local nginx to the operator listener failed:\n{log_text}"
                )
            time.sleep(0.1)
        # Plain HTTP on loopback to the bridge, which speaks TLS (with the certificate) onwards.
        yield Control(home / "flwr", f"127.0.0.1:{port}", None)
    finally:
        _signal_tree(bridge.pid, signal.SIGTERM)
        try:
            bridge.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_tree(bridge.pid, signal.SIGKILL)
            bridge.wait(timeout=10)


def flower_environment() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # No internet on a silo host is normal: no telemetry, no update check.
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a quoted string, as --run-config wants
    return str(value).lower() if isinstance(value, bool) else str(value)


def _json_in(text: str) -> dict:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _processes(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, contents of /proc/pid/`name`) for every process that can be read."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/{name}").read_bytes()
            except OSError:
                continue


def _stat_fields(stat: bytes) -> list[bytes]:
    # /proc/pid/stat after the command name (which may hold spaces): state, parent, group, …
    return stat.rsplit(b")", 1)[1].split()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child, stat in _processes("stat"):
        children.setdefault(int(_stat_fields(stat)[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _started_under(home: Path) -> list[int]:
    """Processes whose Flower home lies in `home`: every party started here and all they started,
    also those orphaned when a parent exited (the environment is inherited)."""
    marker = f"FLWR_HOME={home}".encode()
    return [
        pid
        for pid, environ in _processes("environ")
        if any(item.startswith(marker) for item in environ.split(b"\0"))
    ]


def _alive(pid: int) -> bool:
    """Running (a zombie, already exited and waiting to be reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return _stat_fields(stat)[0] != b"Z"


def _signal(pids: set[int] | list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _signal_tree(pid: int, sig: int) -> None:
    # The SuperLink starts its executor in a session of its own: killing the group is not enough,
    # so every descendant is found first (before any of them exits and is re-parented).
    _signal([*_descendants(pid), pid], sig)


def commands(silos: int, superlink_host: str) -> str:
    """The same deployment by hand on separate hosts (printed by `fedshop deploy local`)."""
    host = shlex.quote(superlink_host)
    lines = [
        "# 1. The coordinator: keys and certificates, the SuperLink (on loopback only), its front door",
        "#    (the SuperLink and the front door run in the foreground: a terminal or service each)",
        f"fedshop deploy certs --host {host} --silos {silos} --out deployment",
        "flower-superlink --host 127.0.0.1 --port 9091 --database deployment/superlink.db \\",
        "  --ssl-ca-certfile deployment/certs/ca.crt --ssl-certfile deployment/certs/superlink.crt \\",
        "  --ssl-keyfile deployment/certs/superlink.key --enable-supernode-auth \\",
        "  --disable-runtime-dependency-installation",
        "fedshop deploy front-door --certs deployment/certs --superlink-port 9091 --port 9092 \\",
        "  --operator-port 9093 --out deployment/front-door   # nginx: silos 9092, operator 9093",
        "fedshop deploy register --superlink 127.0.0.1:9091 --ca deployment/certs/ca.crt "
        "--nodes deployment/node-silos.json deployment/keys/silo-*.pub",
        "",
        "# 2. Each silo's host i: its own data file, ca.crt and its private key silo-i only",
        "fedshop deploy silo-data --config run.toml --out silos   # or each silo exports its own",
        f"flower-supernode --superlink {host}:9092 --root-certificates ca.crt \\",
        "  --auth-supernode-private-key silo-i --port 9094 \\",
        '  --node-config \'silo-data="silo-i.npz" state-dir="fedshop-state"\'',
        "",
        "# 3. The coordinator: submit the run and wait (run it again to resume after a failure)",
        "fedshop deploy run --superlink 127.0.0.1:9091 --ca deployment/certs/ca.crt --config run.toml "
        f"--nodes deployment/node-silos.json --silos {silos} --out run",
        "# From elsewhere, only the operator listener, with the operator's credential:",
        f"fedshop deploy register --superlink {host}:9093 --ca ca.crt --operator-cert operator.crt \\",
        "  --operator-key operator.key --nodes node-silos.json silo-5.pub",
    ]
    return "\n".join(lines)
