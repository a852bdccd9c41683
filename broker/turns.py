"""Refused requests come back in the order they were first refused, not in a race.

The broker never queues work, so a request it refuses (429) is retried by its client after
``retry_after``. With fixed credits and clients that all honour the same estimate, every
retry is a race for the credits one reply frees, and the losers of one race are no better
placed in the next: measured with 8 closed-loop clients x 32 items, p50 79 ms but p99 6.7 s,
because some requests lost again and again.

A :class:`RetryLine` turns those races into a line without the broker holding any work. A
refused request that asked for one (header ``ticket: 0``: its client will retry) gets a
**ticket** (a random 48-bit number, in the 429 reply); its client sends the ticket with the
retry. Clients that do not retry ask for none, so they hold no credits back for anyone.
While a ticket is waiting, credits go to its holder first: a request without a ticket, or
with a later one, is admitted only if the credits it needs leave enough for the oldest
waiting ticket too. A ticket whose holder does not come back in time (its retry
estimate, stretched by the client's jitter, plus a grace period) is dropped, so a client that
gave up blocks no one for longer than that. Each retry estimate counts the items of the
tickets ahead, so clients come back roughly in turn instead of all at once.

This is the bakery algorithm's idea (Lamport: take a number, be served in its order) with
tickets that expire, kept per lane and class. Per request it costs a dict lookup and a few
comparisons; the line is bounded by the number of refused requests that are still waiting.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: How much later than its retry estimate a ticket may come back: the clients' jitter stretches
#: a delay by up to 50 %, and a retry crosses the network and a loop turn.
JITTER = 1.5
GRACE_S = 0.05
#: A line keeps at most this many tickets; past it, refused requests get no ticket (they
#: still get a retry estimate), so a flood cannot grow the broker's memory.
MAX_TICKETS = 100_000


@dataclass(slots=True)
class Waiting:
    """A ticket's holder: ``n`` items, expected back by ``until``, ``before`` items issued
    ahead of it (a running count, so the items still ahead are ``before - left``)."""

    n: int
    until: float
    before: int


@dataclass(slots=True)
class RetryLine:
    """Tickets of refused requests of one lane and class, oldest first."""

    waiting: dict[int, Waiting] = field(default_factory=dict)  # insertion order = ticket order
    issued_items: int = 0  # items of every ticket ever issued
    left_items: int = 0  # items of tickets that left the line (served or expired)
    served: int = 0  # tickets admitted
    expired: int = 0  # tickets whose holder never came back in time

    def head(self, now: float) -> tuple[int, Waiting] | None:
        """The oldest ticket still waiting (expired ones are dropped on the way)."""
        waiting = self.waiting
        while waiting:
            ticket = next(iter(waiting))
            entry = waiting[ticket]
            if entry.until > now:
                return ticket, entry
            del waiting[ticket]
            self.left_items += entry.n
            self.expired += 1
        return None

    def must_wait(self, ticket: int | None, n: int, room: int, now: float) -> bool:
        """Whether a request of ``n`` items that ``room`` credits would fit must still be
        refused, to keep those credits for an older ticket (False: admit it)."""
        if not self.waiting:
            return False
        head = self.head(now)
        if head is None or head[0] == ticket:
            return False
        return room - n < head[1].n

    def admitted(self, ticket: int | None) -> None:
        """A request was admitted: its ticket, if it had one, leaves the line."""
        if ticket is not None:
            entry = self.waiting.pop(ticket, None)
            if entry is not None:
                self.left_items += entry.n
                self.served += 1

    def ahead(self, ticket: int | None) -> int:
        """Items of the tickets waiting before ``ticket`` (all of them for a new request)."""
        entry = self.waiting.get(ticket) if ticket is not None else None
        if entry is None:
            return self.issued_items - self.left_items
        return max(0, entry.before - self.left_items)

    def refused(self, ticket: int | None, n: int, retry_after_s: float, now: float) -> int | None:
        """Record a refusal: the request keeps its place (a known ticket, due again by its new
        estimate) or takes the next number. Returns its ticket: None for a request that asked
        for none (``ticket`` None), and past ``MAX_TICKETS``."""
        if ticket is None:
            return None
        until = now + retry_after_s * JITTER + GRACE_S
        entry = self.waiting.get(ticket) if ticket is not None else None
        if entry is not None:
            entry.until = until
            return ticket
        if len(self.waiting) >= MAX_TICKETS:
            return None
        number = 0  # random, so not guessable: a client cannot jump the line
        while number == 0 or number in self.waiting:
            number = random.getrandbits(48)
        self.waiting[number] = Waiting(n, until, self.issued_items)
        self.issued_items += n
        return number

    def view(self) -> dict[str, int]:
        """What the stats show of the line (docs/stats.md)."""
        return {"waiting": len(self.waiting), "waiting_items": self.issued_items - self.left_items,
                "served": self.served, "expired": self.expired}
