"""Flower's waits for a message's objects, shortened in FedShop's own processes.

In flwr 1.41 a message travels as a tree of objects. Whoever receives one is told of the message
first and then pulls its objects one by one; an object not there yet (its sender is still pushing
it) is asked for again after a back-off that starts at 1 s and doubles up to 10 s
(`flwr.supercore.inflatable.inflatable_utils.pull_objects`). A silo's SuperNode stores a message
before it has pulled its objects from the SuperLink, so the ClientApp task that FedShop's executor
acquires within 0.1 s typically finds the model not there yet and waits 1 s, often 1 + 2 s; the
server pulling a silo's reply, and the SuperNode pulling from the SuperLink, wait the same way. With
four silos a deployed round lost 2–4 s to these waits alone.

`shorten_object_pulls()` makes the back-off start at 20 ms and cap at 0.2 s (an object that arrives
is then taken at most 0.2 s late: with a 1 s cap a pull overshot by up to 1 s), with fifty times the
tries (the time a missing object is waited for before the pull fails stays about what it was). It changes
the defaults of flwr's two pulling functions (a detail of flwr 1.41, checked: with another flwr it
changes nothing and says so). Called in the silo's SuperNode and executor (party_runtime) and in the
ServerApp process (the Flower app's server module).
"""

from __future__ import annotations

import sys

INITIAL_BACKOFF = 0.02
BACKOFF_CAP = 0.2
TRIES_FACTOR = 50


def shorten_object_pulls() -> bool:
    """Shorter back-off for pulling a message's objects in this process; False if flwr's pulling
    functions are not the expected ones (nothing changed then)."""
    try:
        from flwr.supercore.inflatable import inflatable_utils
    except ImportError:
        return False
    functions = [
        getattr(inflatable_utils, "pull_objects", None),
        getattr(inflatable_utils, "pull_and_inflate_object_from_tree", None),
    ]
    expected = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
    if not all(expected <= set(getattr(f, "__kwdefaults__", None) or {}) for f in functions):
        print("fedshop: flwr's object pulls are not the expected ones; unchanged", file=sys.stderr)
        return False
    for function in functions:
        defaults = function.__kwdefaults__
        tries = defaults["max_tries_per_object"]
        defaults["initial_backoff"] = min(defaults["initial_backoff"], INITIAL_BACKOFF)
        defaults["backoff_cap"] = min(defaults["backoff_cap"], BACKOFF_CAP)
        if tries is not None and not getattr(function, "_fedshop_shortened", False):
            defaults["max_tries_per_object"] = tries * TRIES_FACTOR
        function._fedshop_shortened = True  # type: ignore[attr-defined]
    return True
