"""DNS service discovery: a group's members from DNS, re-resolved while running.

Theory of operation
-------------------
A group with `discover` (config/dns.py) has a fixed number of slots, backends named
`<group>-<n>` that sit in every per-backend table (the shared BackendTable and PeerCounts,
each worker's pool, the metrics) from the generation's start, as HAProxy's `server-template`
makes them. What changes while running is which member each slot holds:

    resolve the name (A+AAAA, or SRV then its targets) ──► the answer's members
      ──► Slots.apply (pure): a member already in a slot stays there; one DNS no longer
          names is LEAVING (no new connections; its open ones finish: the drain); a new one
          takes an empty slot, else the slot that has been leaving longest
      ──► each change written to the BackendTable (address, port, weight, state) that every
          worker's pool reads on its next pick, and to the health checker: a member that
          joins while running is down until its checks pass (the first one at once)
      ──► ask again after the answer's TTL, kept within [dns] ttl_min/ttl_max_seconds

A failed resolution (timeout, SERVFAIL/REFUSED, NXDOMAIN, no records) changes nothing: the
last good answer is kept for [dns] hold_seconds after it was last confirmed (HAProxy's `hold
valid`), each failure logged and counted, tried again every retry_seconds; past the hold the
members leave. A generation's first answer is its farm as it starts: those members serve at
once, as configured backends do (checks take them down if they fail), and a reload carries
the members of a group whose `discover` name it kept (into its new slot count).

The resolver is dnspython's, asynchronous, with the file's nameservers or /etc/resolv.conf's.
It runs where the health checks run: in the supervisor for every worker, or in a lone
Balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from balancer.backend.health import HealthChecker
from balancer.backend.pool import LEAVING, MEMBER, BackendTable
from balancer.backend.state import Backend
from balancer.config.dns import Discover, DnsConfig
from balancer.config.schema import Config, GroupConfig

log = logging.getLogger("balancer")

JOIN, LEAVE, WEIGHT = "join", "leave", "weight"
# A resolution's outcome (balancer_dns_resolutions_total{result}): ok, or why not.
OK, NXDOMAIN, NO_RECORDS, SERVFAIL, TIMEOUT, ERROR = (
    "ok", "nxdomain", "no_records", "servfail", "timeout", "error",
)  # fmt: skip
RESULTS = (OK, NXDOMAIN, NO_RECORDS, SERVFAIL, TIMEOUT, ERROR)


@dataclass(frozen=True, slots=True)
class Member:
    """One address DNS names for a group, with its port and weight (SRV's; else 1)."""

    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Change:
    slot: int  # within the group's slots
    kind: str  # JOIN, LEAVE, WEIGHT
    member: Member


class Slots:
    """One discovered group's slots and the members in them (pure; see the module
    docstring)."""

    __slots__ = ("dropped", "leaving", "members")

    def __init__(self, count: int) -> None:
        self.members: list[Member | None] = [None] * count
        self.leaving: list[float | None] = [None] * count  # since when; None: serving or empty
        self.dropped = 0  # members the last answer named that found no slot

    def serving(self) -> int:
        return sum(1 for m, t in zip(self.members, self.leaving, strict=True) if m and t is None)

    def apply(self, answer: Sequence[Member], now: float) -> list[Change]:
        """The changes that make the slots hold `answer`'s members."""
        wanted: dict[tuple[str, int], Member] = {}
        for named in answer:
            wanted.setdefault((named.host, named.port), named)
        changes: list[Change] = []
        for slot, held in enumerate(self.members):
            if held is None:
                continue
            member = wanted.pop((held.host, held.port), None)
            if member is None:
                if self.leaving[slot] is None:
                    self.leaving[slot] = now
                    changes.append(Change(slot, LEAVE, held))
            elif self.leaving[slot] is not None:  # named again: back, checked again first
                self.members[slot], self.leaving[slot] = member, None
                changes.append(Change(slot, JOIN, member))
            elif member.weight != held.weight:
                self.members[slot] = member
                changes.append(Change(slot, WEIGHT, member))
        empty = [slot for slot, held in enumerate(self.members) if held is None]
        # The longest gone first: its connections have had the most time to finish.
        leaving = sorted((t, slot) for slot, t in enumerate(self.leaving) if t is not None)
        free = empty + [slot for _, slot in leaving]
        self.dropped = max(0, len(wanted) - len(free))
        for member, slot in zip(sorted(wanted.values(), key=_order), free, strict=False):
            self.members[slot], self.leaving[slot] = member, None
            changes.append(Change(slot, JOIN, member))
        return changes

    def copy(self, count: int) -> Slots:
        """These slots' members in `count` slots (a reload that changed `slots`): each in its
        own slot while there is room; those past it wait for the next answer to place them."""
        other = Slots(count)
        kept = min(count, len(self.members))
        other.members[:kept], other.leaving[:kept] = self.members[:kept], self.leaving[:kept]
        return other


def _order(member: Member) -> tuple[str, int]:
    return member.host, member.port


def next_delay(ttl_seconds: float, dns_config: DnsConfig) -> float:
    """When to ask again after an answer: its TTL, within the configured bounds."""
    return min(max(ttl_seconds, dns_config.ttl_min_seconds), dns_config.ttl_max_seconds)


class LookupFailed(Exception):
    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result  # one of RESULTS but OK


def resolver_for(dns_config: DnsConfig) -> dns.asyncresolver.Resolver:
    """dnspython's resolver, over the file's nameservers or /etc/resolv.conf's (raises
    dns.resolver.NoResolverConfiguration when there are none)."""
    resolver = dns.asyncresolver.Resolver(configure=not dns_config.nameservers)
    if dns_config.nameservers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(server.host, server.port)
            for server in dns_config.nameservers
        ]
    resolver.lifetime = dns_config.timeout_seconds
    resolver.timeout = dns_config.timeout_seconds
    resolver.cache = None  # the TTL is ours to honour
    return resolver


class Lookup:
    """One name's members, as DNS answers now (I/O; LookupFailed says why not)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver

    async def members(self, discover: Discover) -> tuple[list[Member], float]:
        """The members and the smallest TTL among the records that named them. Bounded: an
        SRV name's targets are resolved together, after it, so twice the timeout at most."""
        try:
            async with asyncio.timeout(2 * float(self.resolver.lifetime)):
                if discover.srv:
                    return await self._srv(discover.name)
                return await self._addresses(discover.name, discover.port, 1)
        except TimeoutError:
            raise LookupFailed(
                TIMEOUT, f"no answer within {2 * self.resolver.lifetime} s"
            ) from None
        except dns.resolver.NXDOMAIN as error:
            raise LookupFailed(NXDOMAIN, str(error)) from None
        except dns.exception.Timeout as error:
            raise LookupFailed(TIMEOUT, str(error)) from None
        except dns.resolver.NoNameservers as error:
            raise LookupFailed(SERVFAIL, str(error)) from None
        except (dns.exception.DNSException, OSError) as error:
            raise LookupFailed(ERROR, str(error) or type(error).__name__) from None

    async def _addresses(self, name: str, port: int, weight: int) -> tuple[list[Member], float]:
        """A and AAAA asked together; one family's records are enough (a failure of the
        other is not the name's: many servers answer only the family they have)."""
        answers = await asyncio.gather(
            self.resolver.resolve(name, "A", raise_on_no_answer=False),
            self.resolver.resolve(name, "AAAA", raise_on_no_answer=False),
            return_exceptions=True,
        )
        members: list[Member] = []
        ttls: list[float] = []
        for answer in answers:
            if isinstance(answer, dns.resolver.Answer) and answer.rrset is not None:
                ttls.append(float(answer.rrset.ttl))
                members += [Member(record.address, port, weight) for record in answer.rrset]
        if members:
            return members, min(ttls)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        raise LookupFailed(NO_RECORDS, f"{name} has no A or AAAA records")

    async def _srv(self, name: str) -> tuple[list[Member], float]:
        answer = await self.resolver.resolve(name, "SRV", raise_on_no_answer=False)
        records = [r for r in answer.rrset or () if str(r.target) != "."]
        if answer.rrset is None or not records:
            raise LookupFailed(NO_RECORDS, f"{name} has no SRV records")
        first = min(record.priority for record in records)  # RFC 2782: lowest first
        answers = await asyncio.gather(*(
            self._addresses(
                record.target.to_text(omit_final_dot=True), record.port, max(1, record.weight)
            )
            for record in records
            if record.priority == first
        ))  # fmt: skip
        members = [member for found, _ in answers for member in found]
        return members, min([float(answer.rrset.ttl), *(ttl for _, ttl in answers)])


class Discovered:
    """One discovered group in a generation: its slots and where they sit in the tables."""

    __slots__ = (
        "config", "delay", "dropped_said", "failing", "first", "last_ok", "slots", "started",
    )  # fmt: skip

    def __init__(self, config: GroupConfig, first: int) -> None:
        assert config.discover is not None
        self.config = config
        self.first = first  # its first slot's place in the shared tables
        self.slots = Slots(config.discover.slots)
        self.last_ok: float | None = None  # when an answer last came (monotonic)
        self.started = False  # its first resolution done (or its slots carried over)
        self.failing = False  # its resolutions fail now (said once, and once when they stop)
        self.dropped_said = 0  # the count of slotless members last logged
        self.delay = 0.0  # until its resolver loop's first resolution (after `first`: the TTL)

    @property
    def discover(self) -> Discover:
        assert self.config.discover is not None
        return self.config.discover


class DnsReport(Protocol):
    """Where resolutions and memberships are published (observe.DnsMetrics): discovery.py
    reports to it and does not know the metrics."""

    def groups(self, names: Iterable[str], results: Iterable[str]) -> None: ...

    def resolved(self, group: str, result: str) -> None: ...

    def members(self, group: str, serving: int, dropped: int) -> None: ...


class Discovery:
    """The resolver loop of every discovered group of a generation (see the module
    docstring): writes the shared BackendTable, tells the health checker."""

    def __init__(
        self,
        config: Config,
        backends: Sequence[Backend],
        table: BackendTable,
        metrics: DnsReport,
        lookup: Lookup | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dns = config.dns
        self.backends = list(backends)
        self.table = table
        self.metrics = metrics
        self.lookup = lookup or Lookup(resolver_for(config.dns))
        self.clock = clock
        self.checker: HealthChecker | None = None  # once the checks run (attach)
        self.groups: list[Discovered] = []
        first = 0
        for group in config.groups:
            if group.discover is not None:
                self.groups.append(Discovered(group, first))
            first += len(group.backends)
        metrics.groups([group.config.name for group in self.groups], RESULTS)
        self._tasks: list[asyncio.Task[None]] = []

    async def first(self) -> None:
        """Every group not carried over, resolved once (bounded by the timeout): the farm a
        generation starts with."""
        pending = [group for group in self.groups if not group.started]
        delays = await asyncio.gather(*(self._resolve(group) for group in pending))
        for group, delay in zip(pending, delays, strict=True):
            group.delay = delay
            group.started = True  # from now on a member joins while running (checked first)

    def carry(self, old: Discovery) -> None:
        """A reload: the members of each group whose name and port (or SRV name) the file kept,
        as they were (up, as configured backends start), in as many slots as it now has."""
        previous = {group.config.name: group for group in old.groups}
        for group in self.groups:
            before = previous.get(group.config.name)
            if before is None or (before.discover.name, before.discover.port) != (
                group.discover.name, group.discover.port,
            ):  # fmt: skip
                continue
            group.slots = before.slots.copy(group.discover.slots)
            group.last_ok, group.started = before.last_ok, True
            for slot, member in enumerate(group.slots.members):
                if member is not None:
                    leaving = group.slots.leaving[slot] is not None
                    self._write(group, slot, LEAVING if leaving else MEMBER, member, up=True)
            self.metrics.members(group.config.name, group.slots.serving(), 0)

    def attach(self, checker: HealthChecker | None) -> None:
        """The generation's checks run: it checks every member the slots hold now (as they
        stand: up, unless the table says down; not those leaving) and each one that joins
        later."""
        self.checker = checker
        if checker is None:
            return
        for group in self.groups:
            for slot, member in enumerate(group.slots.members):
                if member is not None and group.slots.leaving[slot] is None:
                    index = group.first + slot
                    backend = self._backend(self.backends[index], member)
                    checker.member(index, backend, up=self.table.up(index))

    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(group, group.delay)) for group in self.groups]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _run(self, group: Discovered, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self._resolve(group)

    async def _resolve(self, group: Discovered) -> float:
        """One resolution, applied; the seconds until the next."""
        name = group.config.name
        try:
            members, ttl = await self.lookup.members(group.discover)
        except LookupFailed as failure:
            self.metrics.resolved(name, failure.result)
            self._failed(group, failure)
            return self.dns.retry_seconds
        self.metrics.resolved(name, OK)
        if group.failing:
            group.failing = False
            log.info("group %s: %s resolves again", name, group.discover)
        group.last_ok = self.clock()
        self._apply(group, group.slots.apply(members, self.clock()), checked=group.started)
        return next_delay(ttl, self.dns)

    def _failed(self, group: Discovered, failure: LookupFailed) -> None:
        """Said once as the failures begin (each is counted), and when the hold runs out."""
        name, discover = group.config.name, group.discover
        first, group.failing = not group.failing, True
        if group.last_ok is None:
            if first:
                log.warning("group %s: %s does not resolve (%s: %s); no members yet, trying "
                        "again every %g s", name, discover, failure.result, failure,
                        self.dns.retry_seconds)  # fmt: skip
            return
        held = self.clock() - group.last_ok
        if held < self.dns.hold_seconds:
            if first:
                log.warning("group %s: %s does not resolve (%s: %s); keeping its last answer "
                            "for up to hold_seconds (%g s)", name, discover, failure.result,
                            failure, self.dns.hold_seconds)  # fmt: skip
            return
        changes = group.slots.apply([], self.clock())
        if changes:
            log.error("group %s: %s has not resolved for %.1f s (hold_seconds): its %d "
                      "member(s) leave", name, discover, held, len(changes))  # fmt: skip
        self._apply(group, changes, checked=True)

    def _apply(self, group: Discovered, changes: list[Change], checked: bool) -> None:
        """Write each change to the table (and the checker): `checked`, a joining member is
        down until its checks pass; else (a generation's first answer) it serves at once."""
        name = group.config.name
        checks_on = group.config.health_check.type != "none" and checked
        for change in changes:
            slot, member = change.slot, change.member
            backend = self.backends[group.first + slot]
            if change.kind == JOIN:
                self._write(group, slot, MEMBER, member, up=not checks_on)
                if self.checker is not None:
                    joined = self._backend(backend, member)
                    self.checker.member(group.first + slot, joined, up=not checks_on)
                log.info("group %s: %s joins as %s%s", name, member.address, backend.name,
                         " (health-checked first)" if checks_on else "")  # fmt: skip
            elif change.kind == LEAVE:
                self.table.set_member(group.first + slot, LEAVING)
                if self.checker is not None:
                    self.checker.left(group.first + slot)
                log.info("group %s: %s leaves (%s drains)", name, member.address, backend.name)
            else:
                self.table.set_member(group.first + slot, MEMBER, weight=member.weight)
                log.info("group %s: %s (%s) weight %d", name, member.address, backend.name,
                         member.weight)  # fmt: skip
        if group.slots.dropped != group.dropped_said:
            group.dropped_said = group.slots.dropped
            log.warning("group %s: %d member(s) named by %s have no slot (slots = %d)", name,
                        group.slots.dropped, group.discover, group.discover.slots)  # fmt: skip
        self.metrics.members(name, group.slots.serving(), group.slots.dropped)

    def _write(self, group: Discovered, slot: int, state: int, member: Member, up: bool) -> None:
        address = (member.host, member.port)
        self.table.set_member(group.first + slot, state, address, member.weight, up)

    @staticmethod
    def _backend(slot: Backend, member: Member) -> Backend:
        return replace(slot, host=member.host, port=member.port, weight=member.weight,
                       connect_hosts=())  # fmt: skip

    def view(self) -> dict[str, str]:
        """Each slot's member's address, by backend name (for /backends); empty slots: none."""
        return {
            self.backends[group.first + slot].name: member.address
            for group in self.groups
            for slot, member in enumerate(group.slots.members)
            if member is not None
        }


def resolver_problems(config: Config) -> list[str]:
    """What `check` says of [dns] beyond its values: a discovered group needs nameservers,
    the file's or /etc/resolv.conf's."""
    if not any(group.discover is not None for group in config.groups):
        return []
    try:
        resolver_for(config.dns)
    except dns.resolver.NoResolverConfiguration as error:
        return [
            f"{config.source}: dns.nameservers = (missing): expected nameservers for the "
            f"discovered groups: /etc/resolv.conf gives none ({error or 'no nameserver'}); "
            "list them in [dns] nameservers"
        ]
    return []


def discovery_for(
    config: Config, backends: Sequence[Backend], table: BackendTable, metrics: DnsReport
) -> Discovery | None:
    """A generation's discovery, if any group discovers its members."""
    if not any(group.discover is not None for group in config.groups):
        return None
    return Discovery(config, backends, table, metrics)
