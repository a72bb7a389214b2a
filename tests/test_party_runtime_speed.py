"""The silo executor's once-only costs and Flower's shortened object waits (fast, no processes)."""

from __future__ import annotations

import subprocess
import sys

from fedshop.deploy import flower_waits, timing


def test_object_pulls_shortened_once() -> None:
    from flwr.supercore.inflatable import inflatable_utils

    functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    before = [dict(f.__kwdefaults__) for f in functions]
    try:
        assert flower_waits.shorten_object_pulls()
        assert flower_waits.shorten_object_pulls()  # a second call changes nothing more
        for function, old in zip(functions, before, strict=True):
            new = function.__kwdefaults__
            assert new["initial_backoff"] == flower_waits.INITIAL_BACKOFF
            assert new["backoff_cap"] == flower_waits.BACKOFF_CAP
            assert (
                new["max_tries_per_object"]
                == old["max_tries_per_object"] * flower_waits.TRIES_FACTOR
            )
    finally:
        for function, old in zip(functions, before, strict=True):
            function.__kwdefaults__.update(old)
            vars(function).pop("_fedshop_shortened", None)


def test_warm_up_imports_what_a_first_optimizer_step_would() -> None:
    """In a fresh interpreter: after `warm_up` a fork's first Adam step imports nothing more."""
    code = (
        "import sys, torch\n"
        "from fedshop.deploy.party_runtime import warm_up\n"
        "warm_up()\n"
        "before = set(sys.modules)\n"
        "p = torch.ones(3, requires_grad=True)\n"
        "o = torch.optim.Adam([p], lr=0.1)\n"
        "(p * p).sum().backward(); o.step()\n"
        "print(len(set(sys.modules) - before))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "0"


def test_timing_marks_only_when_asked(monkeypatch, capsys) -> None:
    monkeypatch.delenv(timing.TIMING_ENV, raising=False)
    timing.mark("nothing")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(timing.TIMING_ENV, "1")
    timing.reset()
    timing.mark("first")
    timing.mark("second")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[3] for line in lines] == ["first", "second"]
    assert "(+" in lines[1] and "(+" not in lines[0]
