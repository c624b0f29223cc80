"""Elastic resume: continue an epoch on a different number of streams, no sample repeated or lost.

A saved loader position says, for every stream ``g`` of the old layout (data-parallel ranks x
workers), the epoch it is in and how many samples it has handed out there. Those samples are known
exactly by replaying the stream (shards read in its order, its seeded shuffle buffer, no image
decoded): the first ``drawn`` samples it emits. Samples it had read but not emitted (in its shuffle
buffer, in flight to the trainer) were never consumed.

The remainder of each epoch still in progress becomes an :class:`EpochPlan`: shards consumed whole
(``done``) and, for shards consumed in part, the member indices already consumed. The new streams
serve the plan's epochs first, the shards in the epoch's usual order without the ``done`` ones, dealt
over the new streams as a normal epoch is (whole shards; shared by sample when there are fewer shards
than streams), skipping consumed members; then they go on with normal epochs. Plans travel in the
loader state, so a resumed run resumes exactly again, and a second elastic resume composes with the
first (a plan's own streams are replayed the same way).

Replaying reads the consumed part of each epoch in progress once per rank (tar payloads are read,
not decoded). Streams that already finished an epoch in whole shards are not read: their shards are
done. Epoch mode only: resampled streams and the choice between weighted sources continue
statistically (fresh draws on the new streams), as documented in docs/DATA.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EpochPlan:
    """What is left of one epoch of one source: every shard (index in the source's URL list) except
    the ``done`` ones, without the ``consumed`` members of the others."""

    done: frozenset[int] = frozenset()
    consumed: dict[int, frozenset[int]] = field(default_factory=dict)
    generation: int = 1  # how many elastic resumes shaped it (seeds the shuffle of its streams)

    def to_json(self) -> dict:
        return {"done": sorted(self.done), "consumed": {str(k): sorted(v) for k, v in sorted(self.consumed.items())},
                "generation": self.generation}

    @classmethod
    def from_json(cls, d: dict) -> EpochPlan:
        return cls(frozenset(int(i) for i in d["done"]),
                   {int(k): frozenset(int(m) for m in v) for k, v in d["consumed"].items()}, int(d["generation"]))


def plans_to_json(plans: list[dict[int, EpochPlan]]) -> list[dict]:
    return [{str(e): p.to_json() for e, p in sorted(per.items())} for per in plans]


def plans_from_json(raw: list[dict] | None, n_sources: int) -> list[dict[int, EpochPlan]]:
    if not raw:
        return [{} for _ in range(n_sources)]
    return [{int(e): EpochPlan.from_json(p) for e, p in per.items()} for per in raw]


@dataclass
class _Consumed:
    done: set[int] = field(default_factory=set)
    members: dict[int, set[int]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)  # members of each shard read to its end

    def add(self, shard: int, member: int) -> None:
        self.members.setdefault(shard, set()).add(member)

    def plan(self, generation: int) -> EpochPlan:
        done = set(self.done)
        consumed = {}
        for shard, members in self.members.items():
            if shard in done:
                continue
            if shard in self.sizes and len(members) >= self.sizes[shard]:
                done.add(shard)
            else:
                consumed[shard] = frozenset(members)
        return EpochPlan(frozenset(done), consumed, generation)


def replan(n_sources: int, old_streams: int, positions: list[dict], old_plans: list[dict[int, EpochPlan]],
           share_of: Callable[[int, int, int, int], list[int] | None],
           replay: Callable[[int, int, int, int, Callable[[int, int], None]], Iterator[tuple[int, int]]],
           ) -> tuple[list[dict[int, EpochPlan]], list[int]]:
    """The plans of every epoch in progress, per source, and the epoch each source resumes at.

    ``positions``: the old layout's per-stream positions (stream ``g`` = rank x workers + worker), each
    ``{"src": [[epoch, drawn], ...]}``. ``share_of(s, epoch, g, n)``: the shard indices stream ``g`` of
    ``n`` reads whole in that epoch, or None when it shares shards by sample. ``replay(s, epoch, g, n,
    on_shard_end)``: (shard, member) of the samples stream ``g`` emits in that epoch, in order;
    ``on_shard_end(shard, members)`` is called when a shard has been read to its end.
    """
    plans: list[dict[int, EpochPlan]] = []
    starts: list[int] = []
    for s in range(n_sources):
        epochs = [int(p["src"][s][0]) for p in positions]
        first, last = min(epochs), max(epochs)
        generation = 1 + max((p.generation for p in old_plans[s].values()), default=0)
        per: dict[int, EpochPlan] = {}
        for epoch in range(first, last + 1):
            seen = _Consumed()
            old = old_plans[s].get(epoch)
            if old is not None:
                seen.done |= old.done
                for shard, members in old.consumed.items():
                    seen.members[shard] = set(members)
            for g, p in enumerate(positions):
                at, drawn = (int(x) for x in p["src"][s])
                if at < epoch:
                    continue  # has not reached this epoch: consumed nothing of it
                whole = share_of(s, epoch, g, old_streams) if at > epoch else None
                if whole is not None:  # finished this epoch reading whole shards: they are done
                    seen.done.update(whole)
                    continue
                limit = None if at > epoch else drawn
                for shard, member in itertools.islice(replay(s, epoch, g, old_streams, seen.sizes.__setitem__),
                                                      limit):
                    seen.add(shard, member)
            per[epoch] = seen.plan(generation)
        plans.append(per)
        starts.append(first)
    return plans, starts
