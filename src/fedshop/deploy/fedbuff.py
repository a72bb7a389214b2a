"""FedBuff's bookkeeping in a deployment: the training messages in flight across server steps.

Under `[communication] schedule = "fedbuff"` the server no longer waits for every silo of a round
(`server_app.GridTransport`): each step it sends the current model to the chosen silos that have
nothing in flight, and steps once `buffer_size` training replies have arrived. `InFlight` keeps, by
Flower message id, which silo each training message went to and which round's model it carried,
and the replies that arrived and wait, in arrival order, for a step to take them. A message left
unanswered for longer than the round timeout is given up (its silo's slot is free again); only the
ids still in flight are ever pulled, so a late reply to a message given up, or to a run that has
finished, is never read, let alone applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sent:
    """A training message on its way: to whom, which round's model, when (monotonic seconds)."""

    silo: int
    node: int
    round: int
    at: float


@dataclass(frozen=True)
class Arrived:
    """A silo's decoded training reply, waiting for a step: its update and its signature on the
    model it was sent (that of round `round`)."""

    silo: int
    round: int
    update: Any  # a ClientMessage
    ack: str | None = None

    def staleness(self, round_number: int) -> int:
        """Server steps since the model it trained on: 0 when it trained on this step's model."""
        return round_number - self.round


@dataclass
class InFlight:
    timeout: float  # seconds a training message may go unanswered before it is given up
    sent: dict[str, Sent] = field(default_factory=dict)  # by Flower message id
    arrived: list[Arrived] = field(default_factory=list)  # in arrival order

    def busy(self) -> set[int]:
        """Silos with a message in flight or a reply not yet used: they are not sent another."""
        return {s.silo for s in self.sent.values()} | {a.silo for a in self.arrived}

    def occupied(self) -> int:
        """How many of the `concurrency` slots are taken."""
        return len(self.sent) + len(self.arrived)

    def add(self, message_id: str, silo: int, node: int, round_number: int, now: float) -> None:
        self.sent[message_id] = Sent(silo, node, round_number, now)

    def ids(self) -> list[str]:
        return list(self.sent)

    def answer(self, message_id: str, src_node: int) -> Sent | None:
        """The message a reply answers, no longer in flight; None when the reply answers no message
        in flight or comes from another node than the one asked (ignored either way)."""
        sent = self.sent.get(message_id)
        if sent is None:
            return None
        del self.sent[message_id]
        return sent if sent.node == src_node else None

    def give_up(self, now: float) -> list[Sent]:
        """The messages unanswered for longer than `timeout`, forgotten: their replies, should they
        come, are never pulled."""
        late = {i: s for i, s in self.sent.items() if now - s.at > self.timeout}
        for message_id in late:
            del self.sent[message_id]
        return list(late.values())

    def take(self, count: int) -> list[Arrived]:
        """The first `count` replies to arrive, removed from the buffer."""
        taken, self.arrived = self.arrived[:count], self.arrived[count:]
        return taken

    def drop(self) -> tuple[list[Sent], list[Arrived]]:
        """Everything still in flight or buffered, forgotten (the run is over)."""
        dropped = (list(self.sent.values()), self.arrived)
        self.sent, self.arrived = {}, []
        return dropped
