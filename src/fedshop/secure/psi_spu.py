"""One party's side of a SecretFlow (spu 0.9.5) PSI session over spu's own link (brpc).

`spu`'s package `__init__` imports jax, which FedShop does not install (spu 0.9.5 also declares
numpy<2). Its two native extension modules, `libspu` (the link) and `libpsi` (the protocols), need
neither: they are loaded here straight from their files, without running the package's `__init__`.

Every session runs in a child process of its own (`python -m fedshop.secure.psi_spu CONFIG`):
brpc keeps process-wide state, and a session started in a process where an earlier one had failed
(a peer refused for its certificate, say) can abort the whole process in a brpc check. A child also
gets what spu needs without touching the caller's process: a umask of 077 and $TMPDIR pointing at
the party's owner-only folder (spu keeps hash buckets of the inputs there), and stdout/stderr in a
log file there (the native libraries log every step to the console, with no switch to turn it off),
which errors quote.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fedshop.errors import FedShopError

PARTY_NAMES = ("label", "feature")  # rank 0 (PSI receiver) and rank 1 (sender)
# spu's ECDH curve. Measured at 100k × 100k on 2 cores (benchmarks/psi.py, which times both):
# Curve25519 3.6 s, FourQ 7.2 s end to end; this build's FourQ is the slower of the two here.
ECDH_CURVE = "CURVE_25519"
CONNECT_INTERVAL_MS = 200
SESSION_LIMIT_FACTOR = 3  # a session process still running after 3× its timeout (+60 s) is killed

_modules: dict[str, ModuleType] = {}


def spu_folder() -> Path | None:
    """The installed `spu` package's folder, found without importing it (`find_spec` of a
    top-level package does not run its `__init__`)."""
    spec = importlib.util.find_spec("spu")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def library_path(name: str) -> Path:
    """The file of `libspu` or `libpsi`; FedShopError, saying how to install spu, without it."""
    folder = spu_folder()
    suffixes = (*importlib.machinery.EXTENSION_SUFFIXES, ".so")
    files = [] if folder is None else [folder / f"{name}{suffix}" for suffix in suffixes]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise FedShopError(
            "spu PSI needs SecretFlow's spu 0.9.5: python -m pip install --no-deps spu==0.9.5 "
            "(--no-deps: spu declares numpy<2 and jax, which FedShop's numpy 2 and torch "
            "environment cannot take; FedShop loads only spu's native PSI and link modules, "
            "which need neither)"
        )
    return path


def load(name: str) -> ModuleType:
    """`libspu` or `libpsi`, loaded from its file (in the session's child process only)."""
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(name, library_path(name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


def available() -> bool:
    """Whether spu's native modules are installed (found, not loaded: they are loaded by each
    session's child process)."""
    try:
        library_path("libspu")
        library_path("libpsi")
    except FedShopError:
        return False
    return True


def native_errors(log: Path, limit: int = 2) -> str:
    """The last error lines the native libraries logged (brpc's `E…` lines, spdlog's `[error]`)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [
        line.strip()
        for line in lines
        if re.match(r"^E\d{4} ", line) or "[error]" in line or "SSL" in line
    ]
    unique = list(dict.fromkeys(e.split("] ", 1)[-1][:200] for e in errors))
    return "; ".join(unique[-limit:])


# ---- one session ----


@dataclass(frozen=True)
class TlsPaths:
    ca: str
    certificate: str
    key: str


@dataclass
class SpuOutcome:
    keys: list[str] | None  # the intersection's keys, or None for a party that learns nothing
    peer_size: int
    seconds: float


def run_party(
    rank: int,
    keys: list[str],
    *,
    protocol: str,
    self_address: str,
    peer_address: str,
    broadcast: bool,
    tls: TlsPaths | None,
    timeout: float,
    workdir: Path,
) -> SpuOutcome:
    """Run the PSI of `keys` (CSV-safe strings, unique) as party `rank` (0 receives the result), in
    a child process, with its files in `workdir` (owner-only, the caller's to remove)."""
    library_path("libspu"), library_path("libpsi")  # a missing spu: said here, not in the child
    write_keys(workdir / "ids.csv", keys)
    config = {
        "rank": rank,
        "size": len(keys),
        "protocol": protocol,
        "curve": ECDH_CURVE,
        "self_address": self_address,
        "peer_address": peer_address,
        "broadcast": broadcast,
        "tls": None if tls is None else [tls.ca, tls.certificate, tls.key],
        "timeout": timeout,
    }
    write_private_text(workdir / "config.json", json.dumps(config))
    log = workdir / "native.log"
    environment = dict(os.environ, TMPDIR=str(workdir))
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding fedshop/
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p
    )
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "fedshop.secure.psi_spu", str(workdir)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=environment,
            cwd=workdir,
        )
    try:
        # The child's own timeouts (connecting, each message) end a stuck session long before.
        code = child.wait(timeout=SESSION_LIMIT_FACTOR * timeout + 60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise FedShopError(
            f"PSI: the session ran past {SESSION_LIMIT_FACTOR}× its timeout"
        ) from None
    finally:
        if child.poll() is None:  # interrupted: the session must not outlive its caller
            child.kill()
            child.wait()
    peer = PARTY_NAMES[1 - rank]
    result_path = workdir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if result is not None and "error" in result:
        raise FedShopError(result["error"])
    # A result saved means the PSI finished; the process may still have died closing the link.
    if result is None:
        raise FedShopError(
            f"PSI with the {peer} holder failed: its session process ended without a result "
            f"(exit status {code}) [{native_errors(log) or 'nothing logged'}]"
        )
    return SpuOutcome(
        keys=read_keys(workdir / "intersection.csv") if result["learns"] else None,
        peer_size=result["peer_size"],
        seconds=result["seconds"],
    )


def _session(workdir: Path) -> dict:
    """The child's side: one session as configured in `workdir/config.json`."""
    config = json.loads((workdir / "config.json").read_text())
    rank, timeout = config["rank"], config["timeout"]
    peer, peer_address = PARTY_NAMES[1 - rank], config["peer_address"]
    libspu, libpsi = load("libspu"), load("libpsi")
    link = libspu.link
    desc = link.Desc()
    desc.id = "fedshop-psi"
    own = config["self_address"]
    for name, address in zip(PARTY_NAMES, [own, peer_address][:: 1 - 2 * rank], strict=True):
        desc.add_party(name, address)
    # Connect: one try every CONNECT_INTERVAL_MS for about `timeout` seconds, each try without
    # brpc's own retries (whose backoff would stretch a failure far past the timeout).
    desc.connect_retry_interval_ms = CONNECT_INTERVAL_MS
    desc.connect_retry_times = max(1, int(timeout * 1000 / CONNECT_INTERVAL_MS))
    desc.http_timeout_ms = 5000  # one request (a chunk of at most 1 MB)
    desc.retry_opts.max_retry = 0
    desc.retry_opts.aggressive_retry = False
    desc.recv_timeout_ms = int(timeout * 1000)
    if config["tls"] is not None:
        ca, certificate, key = config["tls"]
        desc.enable_ssl = True
        for options in (desc.client_ssl_opts, desc.server_ssl_opts):
            options.cert.certificate_path = certificate
            options.cert.private_key_path = key
            # Depth > 0 turns verification on, both ways: the server asks for the client's
            # certificate and the client checks the server's, each against the CA.
            options.verify.verify_depth = 1
            options.verify.ca_file_path = ca
    execute = libpsi.PsiExecuteConfig(
        protocol_conf=protocol_config(
            libpsi, config["protocol"], config["broadcast"], config["curve"]
        ),
        input_params=libpsi.InputParams(
            path=str(workdir / "ids.csv"), selected_keys=["id"], keys_unique=True
        ),
        output_params=libpsi.OutputParams(
            path=str(workdir / "intersection.csv"), disable_alignment=True
        ),
    )
    try:
        context = link.create_brpc(desc, rank)
    except RuntimeError as error:
        return {
            "error": f"PSI: could not connect to the {peer} holder at {peer_address} within "
            f"{timeout:g} s (is it running, with TLS on both sides and a certificate signed by "
            f"the shared CA?) [{native_errors(workdir / 'native.log') or first_line(error)}]"
        }
    started = time.perf_counter()  # the protocol's own time, not the wait for the peer
    try:
        # The protocols already reveal each side's set size to the other (spu exchanges them
        # while bucketing, and each party logs both); sent openly here to record it.
        sizes = [int(s) for s in context.all_gather(str(config["size"]))]
        libpsi.psi_execute(execute, context)
        result = {
            "learns": rank == 0 or config["broadcast"],
            "peer_size": sizes[1 - rank],
            "seconds": time.perf_counter() - started,
        }
    except RuntimeError as error:
        details = native_errors(workdir / "native.log")
        result = {
            "error": f"PSI with the {peer} holder failed: {first_line(error)}"
            + (f" [{details}]" if details else "")
        }
    # Saved before the link closes: if anything below fails, the PSI's result stands.
    _write_result(workdir, result)
    with contextlib.suppress(RuntimeError):
        if "error" in result:
            context.stop_link()
        else:
            farewell(context, rank)
    return result


def farewell(context, rank: int) -> None:
    """Leave once neither side has anything in flight; the process's exit then closes the link.

    Not stop_link(): under TLS brpc often aborts the process as the peer's connection ends (a
    failed check in its controller, "error_code is 0"). Not barrier() either: a side that passes
    it may exit before its own barrier message is delivered, leaving the other waiting for its
    receive timeout. Here each side's last message is a `send`, which returns once the peer's
    server has acknowledged it; the side that receives last has sent nothing after.
    """
    if rank == 0:
        context.send(1, "done")
        context.recv(1)
    else:
        context.recv(0)
        context.send(0, "done")


def _write_result(workdir: Path, result: dict) -> None:
    write_private_text(workdir / "result.json", json.dumps(result))


def _child_main(workdir: str) -> None:
    os.umask(0o077)
    folder = Path(workdir)
    try:
        result = _session(folder)
    except FedShopError as error:
        result = {"error": str(error)}
    except Exception as error:  # spu failing to load or run, for a reason of its own
        result = {"error": f"PSI: spu failed ({type(error).__name__}: {error})"}
    _write_result(folder, result)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Skip interpreter teardown: brpc's threads and static state do not always survive it, and
    # the result is written.
    os._exit(0 if "error" not in result else 1)


def protocol_config(libpsi: ModuleType, protocol: str, broadcast: bool, curve: str):
    config = libpsi.PsiProtocolConfig(
        protocol=getattr(libpsi.PsiProtocol, f"PROTOCOL_{protocol.upper()}"),
        receiver_rank=0,
        broadcast_result=broadcast,
    )
    if protocol == "ecdh":
        config.ecdh_params = libpsi.EcdhParams(curve=getattr(libpsi.EllipticCurveType, curve))
    return config


def write_keys(path: Path, keys: list[str]) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii", newline="\n") as f:
        f.write("id\n")
        f.write("\n".join(keys))
        f.write("\n")


def write_private_text(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(text)


def read_keys(path: Path) -> list[str]:
    if not path.exists():
        return []
    with open(path, encoding="ascii") as f:
        lines = f.read().splitlines()
    return [line.strip('"') for line in lines[1:] if line]


def first_line(error: BaseException) -> str:
    text = str(error).replace("what:", "").strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


if __name__ == "__main__":
    _child_main(sys.argv[1])
