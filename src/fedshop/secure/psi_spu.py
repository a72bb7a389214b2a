"""One party's side of a SecretFlow (spu 0.9.5) PSI session over spu's own link (brpc).

`spu`'s package `__init__` imports jax, which FedShop does not install (spu 0.9.5 also declares
numpy<2). Its two native extension modules, `libspu` (the link) and `libpsi` (the protocols), need
neither: they are loaded here straight from their files, without running the package's `__init__`.

spu reads and writes CSV files, and keeps its own scratch files (hash buckets of the inputs) under
$TMPDIR. While a session runs in this process, $TMPDIR points at an owner-only folder made for the
session, and the native libraries' console output (they log to stdout, and brpc to stderr, with no
switch to turn it off) goes to a log file there, so that failures can quote it; both are restored,
and the folder removed, when the last session of the process ends.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fedshop.errors import FedShopError

PARTY_NAMES = ("label", "feature")  # rank 0 (PSI receiver) and rank 1 (sender)
# spu's ECDH curve. Measured at 100k × 100k on 2 cores (benchmarks/psi.py, which times both):
# Curve25519 2.4 s, FourQ 4.6 s; this build's FourQ is the slower of the two here.
ECDH_CURVE = "CURVE_25519"
CONNECT_INTERVAL_MS = 200

_modules: dict[str, ModuleType] = {}


def spu_folder() -> Path | None:
    """The installed `spu` package's folder, found without importing it (`find_spec` of a
    top-level package does not run its `__init__`)."""
    spec = importlib.util.find_spec("spu")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load(name: str) -> ModuleType:
    """`libspu` or `libpsi`, loaded from its file; FedShopError when spu is not installed."""
    if name not in _modules:
        folder = spu_folder()
        suffix = importlib.machinery.EXTENSION_SUFFIXES
        files = [] if folder is None else [folder / f"{name}{s}" for s in (*suffix, ".so")]
        path = next((f for f in files if f.is_file()), None)
        if path is None:
            raise FedShopError(
                "spu PSI needs SecretFlow's spu 0.9.5: python -m pip install --no-deps spu==0.9.5 "
                "(--no-deps: spu declares numpy<2 and jax, which FedShop's numpy 2 and torch "
                "environment cannot take; FedShop loads only spu's native PSI and link modules, "
                "which need neither)"
            )
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


def available() -> bool:
    try:
        load("libspu")
        load("libpsi")
    except (FedShopError, ImportError, OSError):
        return False
    return True


# ---- the process-wide native scope: $TMPDIR and fds 1/2, shared by the sessions running here ----

_scope_lock = threading.Lock()
_scope_users = 0
_scope_state: dict = {}


@contextlib.contextmanager
def native_scope() -> Iterator[Path]:
    """While at least one session runs: $TMPDIR is an owner-only scratch folder and the native
    console output goes to its `native.log`. Yields that log's path."""
    global _scope_users
    with _scope_lock:
        if _scope_users == 0:
            scratch = Path(tempfile.mkdtemp(prefix="fedshop-psi-scratch-"))  # mode 0700
            log = scratch / "native.log"
            log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            saved = (os.dup(1), os.dup(2))
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            _scope_state.update(
                scratch=scratch, log=log, saved=saved, tmpdir=os.environ.get("TMPDIR")
            )
            os.environ["TMPDIR"] = str(scratch)
        _scope_users += 1
        log = _scope_state["log"]
    try:
        yield log
    finally:
        with _scope_lock:
            _scope_users -= 1
            if _scope_users == 0:
                state = dict(_scope_state)
                _scope_state.clear()
                for fd, saved in zip((1, 2), state["saved"], strict=True):
                    os.dup2(saved, fd)
                    os.close(saved)
                if state["tmpdir"] is None:
                    os.environ.pop("TMPDIR", None)
                else:
                    os.environ["TMPDIR"] = state["tmpdir"]
                shutil.rmtree(state["scratch"], ignore_errors=True)


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
    """Run the PSI of `keys` (CSV-safe strings, unique) as party `rank` (0 receives the result)."""
    libspu, libpsi = load("libspu"), load("libpsi")
    link = libspu.link
    desc = link.Desc()
    desc.id = "fedshop-psi"
    addresses = [self_address, peer_address] if rank == 0 else [peer_address, self_address]
    for name, address in zip(PARTY_NAMES, addresses, strict=True):
        desc.add_party(name, address)
    # Connect: one try every CONNECT_INTERVAL_MS for about `timeout` seconds, each try without
    # brpc's own retries (whose backoff would stretch a failure far past the timeout).
    desc.connect_retry_interval_ms = CONNECT_INTERVAL_MS
    desc.connect_retry_times = max(1, int(timeout * 1000 / CONNECT_INTERVAL_MS))
    desc.http_timeout_ms = 5000  # one request (a chunk of at most 1 MB)
    desc.retry_opts.max_retry = 0
    desc.retry_opts.aggressive_retry = False
    desc.recv_timeout_ms = int(timeout * 1000)
    if tls is not None:
        desc.enable_ssl = True
        for options in (desc.client_ssl_opts, desc.server_ssl_opts):
            options.cert.certificate_path = tls.certificate
            options.cert.private_key_path = tls.key
            # Depth > 0 turns verification on, both ways: the server asks for the client's
            # certificate and the client checks the server's, each against the CA.
            options.verify.verify_depth = 1
            options.verify.ca_file_path = tls.ca

    source, output = workdir / "ids.csv", workdir / "intersection.csv"
    write_keys(source, keys)
    config = libpsi.PsiExecuteConfig(
        protocol_conf=protocol_config(libpsi, protocol, broadcast),
        input_params=libpsi.InputParams(path=str(source), selected_keys=["id"], keys_unique=True),
        output_params=libpsi.OutputParams(path=str(output), disable_alignment=True),
    )
    peer = PARTY_NAMES[1 - rank]
    with native_scope() as log:
        try:
            context = link.create_brpc(desc, rank)
        except RuntimeError as error:
            raise FedShopError(
                f"PSI: could not connect to the {peer} holder at {peer_address} within "
                f"{timeout:g} s (is it running, with TLS on both sides and a certificate signed by "
                f"the shared CA?) [{native_errors(log) or first_line(error)}]"
            ) from None
        started = time.perf_counter()  # the protocol's own time, not the wait for the peer
        try:
            # The protocols already reveal each side's set size to the other (spu exchanges them
            # while bucketing, and each party logs both); sent openly here to record it.
            sizes = [int(s) for s in context.all_gather(str(len(keys)))]
            libpsi.psi_execute(config, context)
        except RuntimeError as error:
            raise FedShopError(
                f"PSI with the {peer} holder failed: {first_line(error)}"
                + (f" [{details}]" if (details := native_errors(log)) else "")
            ) from None
        finally:
            context.stop_link()
            del context
        seconds = time.perf_counter() - started
    learns = rank == 0 or broadcast
    return SpuOutcome(
        keys=read_keys(output) if learns else None, peer_size=sizes[1 - rank], seconds=seconds
    )


def protocol_config(libpsi: ModuleType, protocol: str, broadcast: bool):
    config = libpsi.PsiProtocolConfig(
        protocol=getattr(libpsi.PsiProtocol, f"PROTOCOL_{protocol.upper()}"),
        receiver_rank=0,
        broadcast_result=broadcast,
    )
    if protocol == "ecdh":
        config.ecdh_params = libpsi.EcdhParams(curve=getattr(libpsi.EllipticCurveType, ECDH_CURVE))
    return config


def write_keys(path: Path, keys: list[str]) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii", newline="\n") as f:
        f.write("id\n")
        f.write("\n".join(keys))
        f.write("\n")


def read_keys(path: Path) -> list[str]:
    if not path.exists():
        return []
    with open(path, encoding="ascii") as f:
        lines = f.read().splitlines()
    return [line.strip('"') for line in lines[1:] if line]


def first_line(error: BaseException) -> str:
    text = str(error).replace("what:", "").strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
