"""One round's membership as every member sees it: the members, their roles, who is refused.

A :class:`Quorum` is what the coordinator (torchft's lighthouse) answered to one group's request
at a round boundary, ranked by group id: a member's index is its rank in that round's
cross-group process group. Every member computes the same :class:`Quorum` from the same answer,
so roles need no further messages:

* **current** members are at the highest round (and, should two θ exist for that round, of the
  lineage most of them hold); they contribute their Δ and can donate state;
* the others are **behind** (a restarted group, one woken from a stall, or one whose θ lost the
  lineage vote): they heal from a current one (joiner k from current member k mod |current|)
  and contribute zeros this round;
* a member that has never trained is at round 0, so it is current only when every member is:
  a fresh group never overwrites trained ones;
* refused (:func:`admit`): a second process claiming a group id (the one started later), and
  a group whose config fingerprint differs from the most common one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Member", "Quorum", "RunFinished", "admit"]


class RunFinished(Exception):
    """The job's last round is done (another group finished it while this one was away)."""


@dataclass(frozen=True)
class Member:
    """One worker group in a quorum, as it announced itself."""

    group: int
    round: int
    trained: bool
    replica_id: str
    started: float  # wall time the group's process started (duplicate ids: the newer one yields)
    fingerprint: str = ""  # the group's config fingerprint (all must match)
    lineage: str = "start"  # where its θ comes from: the epoch of the exchange that made it


@dataclass(frozen=True)
class Quorum:
    """The members of one round, ranked by group id (a member's index is its rank in the
    cross-group process group), and this group's place among them."""

    quorum_id: int
    epoch: str  # the process-group key: quorum id + failed-exchange count
    members: tuple[Member, ...]
    index: int  # this group's rank
    kept: bool = False  # the coordinator was unreachable: the previous membership, kept
    waited_s: float = 0.0
    finished_round: int | None = None

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def groups(self) -> list[int]:
        return [m.group for m in self.members]

    @property
    def max_round(self) -> int:
        return max(m.round for m in self.members)

    @property
    def current(self) -> list[int]:
        """Indices of the members holding the newest θ (the donors and the contributors): at the
        highest round, and of the lineage most of those hold (a tie: the lowest group id's).

        Two lineages at one round happen when an exchange completed on some members while the
        others, taking a member for dead, redid the round without it; one θ must win.
        """
        top = self.max_round
        at_top = [m for m in self.members if m.round == top]
        votes: dict[str, int] = {}
        for m in at_top:
            votes[m.lineage] = votes.get(m.lineage, 0) + 1
        first = {lineage: min(m.group for m in at_top if m.lineage == lineage) for lineage in votes}
        winner = min(votes, key=lambda lineage: (-votes[lineage], first[lineage]))
        return [i for i, m in enumerate(self.members) if m.round == top and m.lineage == winner]

    @property
    def behind(self) -> list[int]:
        """Indices of the members that must heal before this round's exchange."""
        current = set(self.current)
        return [i for i in range(len(self.members)) if i not in current]

    def donor_of(self, index: int) -> int:
        """The current member that heals member ``index`` (joiners spread over the donors)."""
        current, behind = self.current, self.behind
        return current[behind.index(index) % len(current)]

    def to_json(self) -> str:
        return json.dumps(
            {
                "quorum_id": self.quorum_id,
                "epoch": self.epoch,
                "members": [m.__dict__ for m in self.members],
                "index": self.index,
                "kept": self.kept,
                "waited_s": self.waited_s,
                "finished_round": self.finished_round,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Quorum:
        d = json.loads(text)
        d["members"] = tuple(Member(**m) for m in d["members"])
        return cls(**d)


def admit(members: list[Member]) -> tuple[list[Member], dict[str, str]]:
    """(the members that may take part, ranked by group id; {replica id: why not} for the rest).

    Two processes claiming one group id: the one started later is refused. Config fingerprints
    that differ: the most common fingerprint wins (a tie: the earliest-started member's).
    """
    rejected: dict[str, str] = {}
    kept: list[Member] = []
    for m in sorted(members, key=lambda m: (m.group, m.started)):
        if kept and kept[-1].group == m.group:
            rejected[m.replica_id] = (
                f"another process already runs as topology.group_id={m.group}; give each "
                "group its own group_id"
            )
        else:
            kept.append(m)
    counts: dict[str, int] = {}
    for m in kept:
        counts[m.fingerprint] = counts.get(m.fingerprint, 0) + 1
    first = min(kept, key=lambda m: m.started)
    ruling = max(counts, key=lambda f: (counts[f], f == first.fingerprint))
    admitted = []
    for m in kept:
        if m.fingerprint == ruling:
            admitted.append(m)
        else:
            rejected[m.replica_id] = (
                f"group {m.group}'s config differs from the running groups' (fingerprint "
                f"{m.fingerprint} vs {ruling}); every group must train with the same settings"
            )
    return admitted, rejected
