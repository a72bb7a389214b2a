"""A silo's long-lived processes next to its SuperNode: Flower's per-message costs without the waits.

With Flower's default isolation ("subprocess") a SuperNode starts `flower-superexec`, which polls the
SuperNode's Runtime API once a second and starts a fresh `flwr-clientapp` process for every message;
that process imports PyTorch and FedShop again before it can read the message, and the SuperNode
itself asks the SuperLink for new messages only every 3 s when it has none. A deployed round cost
~22× a simulated one. In flwr 1.41 `flwr-clientapp` runs exactly one task (it pulls one task with a
per-task token, runs it, pushes the reply and exits: no `--run-once`, no loop), so a long-lived
ClientApp process is not on offer. Instead each silo runs:

- `executor`: FedShop's SuperExec. The SuperNode runs with `--isolation process` (it starts no
  executor of its own); this process imports Flower, PyTorch and FedShop's silo code once, polls the
  SuperNode's Runtime API for tasks (`AcquireTask`, every 0.1 s) and runs each task in a child
  *forked* from itself, which runs Flower's own `run_clientapp` with the task's token. A fork costs
  milliseconds and inherits the imports and what `warm_up` paid once (PyTorch's lazy imports on an
  optimizer's first step, glibc's heap thresholds) and Flower's shorter waits for a message's
  objects (`flower_waits`); every message still gets a fresh process, so nothing one
  message (or one run) leaves in memory is seen by the next: a run's state is its state folder's,
  `runs/<run id>` (silo_app.py), as before. `LocalFederation` (processes.py) supervises it: when it
  dies it is started again (a task it had acquired and not finished fails, and the round's dropout
  and retry logic copes).
- `supernode`: `flower-supernode` with its idle waits shortened: with no message it asks the
  SuperLink again after `FEDSHOP_SUPERNODE_POLL` seconds (default 0.25) instead of 3 s, and it looks
  for a finished reply as often instead of every 0.5 s. It patches `time` in flwr's
  `supernode.start_client_internal` (a detail of flwr 1.41, checked at start: a flwr without it runs
  unpatched). More frequent polls cost the SuperLink one small request per silo per poll.

Who can reach the Runtime API (the SuperNode's `--port`, the old "ClientAppIo" port): it listens on
127.0.0.1 only (`--host 127.0.0.1`), plain HTTP, so any process on the silo's host can connect, as to
the SuperNode's other local ports. Flower guards it with tokens: every call about a task needs that
task's token, and a token is handed out only by `AcquireTask`. In subprocess isolation `AcquireTask`
is unauthenticated (flwr ignores a SuperExec secret there), so any local process could take a task
(read the global model, answer for the silo). Here the SuperNode runs with
`--superexec-auth-secret-file`: `AcquireTask` needs an HMAC under a random secret in an owner-only
file of the silo's (`executor.secret`), which only the silo's own user can read. A local process of
another user can connect but not take a task; one of the silo's own user can read its data anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

TASK_POLL_SECONDS = 0.1


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["supernode"]:
        supernode(argv[1:])
    elif argv[:1] == ["executor"]:
        executor(argv[1:])
    else:
        raise SystemExit("usage: python -m fedshop.deploy.party_runtime supernode|executor …")


def supernode(args: list[str]) -> None:
    """`flower-supernode` with shorter idle waits (see the module's docstring)."""
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from fedshop.deploy.flower_waits import shorten_object_pulls

    shorten_object_pulls()
    from fedshop.deploy import timing

    if timing.enabled():  # the SuperNode's own lines, timed as the executor's
        timing.stamp_flower_log()
    from fedshop.config import Environment

    idle = Environment.from_os().supernode_poll
    if getattr(internal, "time", None) is time:
        internal.time = _ShortSleeps(idle)  # type: ignore[attr-defined]
    else:  # another flwr: its own waits
        print("fedshop: flwr's SuperNode loop is not the expected one; unpatched", file=sys.stderr)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


class _ShortSleeps:
    """`time` for flwr's SuperNode loop, whose waits (3 s idle, 0.5 s for a reply) cap at `idle`."""

    def __init__(self, idle: float) -> None:
        self.idle = idle

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.idle))

    def __getattr__(self, name: str):
        return getattr(time, name)


def executor(args: list[str]) -> None:
    """FedShop's SuperExec for one SuperNode: acquire each ClientApp task, run it in a fork."""
    parser = argparse.ArgumentParser(prog="fedshop.deploy.party_runtime executor")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--superexec-auth-secret-file", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    options = parser.parse_args(args)

    # What every message needs, imported once: the forks inherit it.
    import torch  # noqa: F401
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    import fedshop.deploy.silo_app
    import fedshop.deploy.silo_secagg  # noqa: F401
    from fedshop.deploy import timing
    from fedshop.deploy.flower_waits import shorten_object_pulls

    shorten_object_pulls()  # the forks inherit it
    warm_up()
    secret = load_superexec_auth_secret(options.superexec_auth_secret_file)
    client = RuntimeHttpClient.from_server_address(
        server_address=options.runtime_api_address,
        insecure=True,  # loopback only (see the docstring)
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=secret,
                protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
            ),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    stopping = False

    def stop(_signal: int, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children: set[int] = set()
    print(f"fedshop executor {os.getpid()} ready on {options.runtime_api_address}", flush=True)
    while not stopping:
        children -= _reaped(children)
        if options.parent_pid is not None and not _alive(options.parent_pid):
            break  # the SuperNode is gone
        try:
            reply = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
            )
        except Exception as error:  # the SuperNode restarting: try again
            print(f"fedshop executor: AcquireTask failed: {error}", file=sys.stderr, flush=True)
            time.sleep(1.0)
            continue
        if reply.HasField("task") and reply.token:
            timing.mark("acquired")
            pid = os.fork()
            if pid == 0:  # the task's process: Flower's own ClientApp process, forked
                code = 1
                timing.reset()
                timing.mark("forked")
                try:
                    run_clientapp(
                        runtime_api_address=options.runtime_api_address, token=reply.token,
                        insecure=True, certificates=None, parent_pid=os.getppid(),
                        runtime_dependency_install=False,
                    )  # fmt: skip
                    code = 0
                except SystemExit as exit_:  # flwr_exit ends every task this way
                    code = exit_.code if isinstance(exit_.code, int) else 1
                finally:
                    timing.mark("exit")
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children.add(pid)
            continue  # another task may be waiting
        time.sleep(TASK_POLL_SECONDS)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    client.close()


def warm_up() -> None:
    """What every message's first training step would otherwise pay in its fresh fork, paid once here:

    - PyTorch imports much lazily on an optimizer's first step (`torch._dynamo`, sympy, mpmath:
      ~800 modules, ~1.2 s of CPU). A one-step Adam on a throwaway tensor imports them here, so every
      fork inherits them. It touches no silo data and no run's state.
    - glibc returns freed blocks over its mmap threshold to the system and maps them again on the
      next allocation: a fit's per-step tensors then cost ~100,000 page faults per message (a quarter
      of its CPU). A fixed, high threshold (and trim threshold) keeps them in the heap; the forks
      inherit the setting. Each fork is short-lived, so memory kept in its heap is given back when it
      exits. Only on glibc; elsewhere nothing changes.
    """
    import torch

    parameter = torch.zeros(4, 2, requires_grad=True)
    optimizer = torch.optim.Adam([parameter], lr=0.1)
    parameter.sum().backward()
    optimizer.step()
    _keep_freed_memory()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_THRESHOLD = 1 << 30


def _keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (`warm_up`); False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, HEAP_THRESHOLD)
    )


def _reaped(children: set[int]) -> set[int]:
    done = set()
    for pid in children:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                done.add(pid)
        except ChildProcessError:  # not ours any more
            done.add(pid)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    main()
