"""Shared prompt prefixes: one host copy and one policy index for every session over the same tokens.

A session may declare that its prompt starts with a prefix (OpenSessionRequest.prefix: token
ids, chained per-chunk hashes, the model/layout fingerprint). The first session over it
ingests it as usual; when the ingest completes the PrefixRegistry *registers* it:

* the session's host pages that the prefix fills completely are handed over to the prefix,
  which owns them from then on, and the last, partial page is copied into a page of the
  prefix's own (the session goes on writing its next tokens into its original one);
* the session's policy state right after the ingest (clusters and unit table, page bounds,
  observation ranking, windowkv's selection: all of it, per policy) is copied once into the
  prefix, with the first selection. The copy is never run: it is the template later sessions
  start from, and its device bytes are reserved in the device pool like a session's metadata.

A later session of the same tenant with the same fingerprint, layout (max_tokens included)
and resolved policy configuration over the same tokens *hits*: its host store maps the
prefix's full pages read-only (a session only ever writes tokens past its prefix) and copies
the partial page into a page of its own; its policy state comes from the template by
`Policy.derive()`: louiskv shares the template's unit table read-only and keeps what it adds
(chunk clusters, output segments) in a table of its own, reserving only that in the device
pool; the other policies take a copy. A session whose declared tokens only *begin* with a
held prefix (a chat's next turn re-sends the turns before it) starts from the longest such
prefix and prefills the rest itself (its answer's prefix_tokens_held); when its chunks end
exactly at its declared prefix's end (the client's prefill cuts a pass there), that longer
prefix is registered too, so the turn after it starts there: it owns only the pages past the
shorter prefix's full ones and holds a reference to it (the shorter one is never evicted
under it), and its policy template shares the shorter one's read-only index (louiskv).
Its working set, output segments, boundary state and
windowkv selection stay its own; its
working set is filled as the ingest would have (sinks and window from the host tier, the
first selection placed). It then continues with ChunkAppends exactly like the session that
ingested the prefix itself, so its answers are the same token for token.

Ownership: the registry owns every Prefix, a Prefix owns its pages and its device
reservation; each session using one holds a reference (`acquire` / `release`). A prefix with
no reference stays cached; `make_room` evicts unreferenced prefixes, least recently used
first, when an admission needs their memory. Nothing referenced is ever evicted.

Isolation: the key starts with the tenant (the caller's worker identity), so a prefix is
never visible to another tenant; the daemon recomputes the chained hashes from the token ids
and compares the ids with the held prefix's, so no hash can stand for tokens it does not hash.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvrecall.prefix import HASH_BYTES, MAX_CHUNK_TOKENS, chain_hashes, token_bytes
from kvrecall.server.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.base import Policy, config_json
from kvrecall.server.pools import DevicePool, HostPool
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.prefixes")

MAX_FINGERPRINT = 256


@dataclass(frozen=True)
class Declared:
    """A validated PrefixDeclaration."""

    fingerprint: str
    tokens: bytes  # uint32 little-endian token ids
    num_tokens: int
    digest: bytes  # the last chunk hash: the prefix's id
    must_be_held: bool

    @property
    def prefix_id(self) -> str:
        return self.digest.hex()


@dataclass(frozen=True)
class PrefixKey:
    tenant: str
    fingerprint: str
    layout: ModelLayout
    policy: str  # the policy's name and resolved configuration (JSON)
    digest: bytes


def policy_key(policy: Policy) -> str:
    return f"{policy.name}:{json.dumps(config_json(policy), sort_keys=True)}"


def validate(message: pb.PrefixDeclaration, layout: ModelLayout) -> Declared:
    """Check a declaration at the edge (INVALID_ARGUMENT naming the field): sizes, and that
    every chained hash is the hash of its tokens."""
    fingerprint = message.fingerprint
    if not 1 <= len(fingerprint) <= MAX_FINGERPRINT:
        raise InvalidArgument("prefix.fingerprint", f"required, at most {MAX_FINGERPRINT} characters")
    T = len(message.token_ids)
    if not 1 <= T <= layout.max_tokens:
        raise InvalidArgument(
            "prefix.token_ids", f"{T} tokens: must be in [1, layout.max_tokens={layout.max_tokens}]"
        )
    size = message.chunk_tokens
    if not 1 <= size <= MAX_CHUNK_TOKENS:
        raise InvalidArgument("prefix.chunk_tokens", f"{size} must be in [1, {MAX_CHUNK_TOKENS}]")
    chunks = -(-T // size)
    hashes = list(message.chunk_hashes)
    if len(hashes) != chunks:
        raise InvalidArgument(
            "prefix.chunk_hashes", f"{len(hashes)} hashes for {T} tokens in chunks of {size}: expected {chunks}"
        )
    if any(len(h) != HASH_BYTES for h in hashes):
        raise InvalidArgument("prefix.chunk_hashes", f"every hash is {HASH_BYTES} bytes (sha256)")
    expected = chain_hashes(message.token_ids, size)
    for i, (given, computed) in enumerate(zip(hashes, expected, strict=True)):
        if given != computed:
            raise InvalidArgument(
                "prefix.chunk_hashes",
                f"hash {i} does not match token_ids [{i * size}, {min(T, (i + 1) * size)}) (chained sha256)",
            )
    return Declared(fingerprint, token_bytes(message.token_ids), T, hashes[-1], message.must_be_held)


@dataclass(eq=False)
class Prefix:
    """A registered prefix: its pages, its policy template, its references."""

    key: PrefixKey
    tokens: bytes
    num_tokens: int
    pages: list[int]  # covering tokens [0, num_tokens): `full_pages` full ones, then a partial copy
    full_pages: int
    page_bytes: int
    policy: Policy  # the policy state right after the ingest (a template: never run)
    selection: torch.Tensor | None  # the ingest's first selection, int64 [L, H, R]
    metadata_bytes: int  # reserved in the device pool for `policy`
    refs: int = 0
    hits: int = 0
    last_used: float = field(default_factory=time.monotonic)
    # A prefix registered over a shorter held one (`parent`) maps the parent's full pages
    # (pages [0, shared): the parent's, never freed here) and holds a reference to it.
    parent: Prefix | None = None
    shared: int = 0
    prompt_tokens: int = -1  # its sessions' prompt_tokens (the first ingest's); -1: num_tokens

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            self.prompt_tokens = self.num_tokens

    @property
    def prefix_id(self) -> str:
        return self.key.digest.hex()

    @property
    def tenant(self) -> str:
        return self.key.tenant

    @property
    def host_bytes(self) -> int:
        """Bytes of the pages it owns (a parent's are the parent's)."""
        return (len(self.pages) - self.shared) * self.page_bytes

    def stats(self, now: float) -> pb.PrefixStats:
        return pb.PrefixStats(
            prefix_id=self.prefix_id, worker_id=self.tenant, policy=self.policy.name, tokens=self.num_tokens,
            host_bytes=self.host_bytes, device_bytes=self.metadata_bytes, refs=self.refs, hits=self.hits,
            idle_seconds=0.0 if self.refs else now - self.last_used,
        )


class PrefixRegistry:
    """Every held prefix by key; admission's evictions; the counters stats and metrics show."""

    def __init__(self, host_pool: HostPool, device_pool: DevicePool) -> None:
        self.host_pool = host_pool
        self.device_pool = device_pool
        self.prefixes: dict[PrefixKey, Prefix] = {}
        self.evictions = 0
        self.on_evict: Callable[[Prefix], None] = lambda prefix: None
        self._lock = threading.Lock()

    # ---- lookup --------------------------------------------------------------------------
    def find(self, tenant: str, declared: Declared, layout: ModelLayout, policy: Policy) -> Prefix | None:
        """The held prefix this session starts from, or None (it will ingest and register it).

        The declared prefix itself when held: its token ids must equal the held prefix's
        (INVALID_ARGUMENT naming prefix.token_ids). Else the longest held prefix (same tenant,
        fingerprint, layout and policy) whose tokens begin the declared ones: a chat's next turn
        re-sends the turns before it, and the session then starts after them and prefills the
        rest (OpenSessionResponse.prefix_tokens_held says how many it skips; it registers
        nothing). With must_be_held the whole declared prefix must be held: else NOT_FOUND, or
        FAILED_PRECONDITION naming the field when it is held for another fingerprint, layout or
        policy."""
        key = PrefixKey(tenant, declared.fingerprint, layout, policy_key(policy), declared.digest)
        with self._lock:
            prefix = self.prefixes.get(key)
            if prefix is not None:
                if prefix.tokens != declared.tokens:
                    raise InvalidArgument("prefix.token_ids", f"differ from the tokens of prefix {declared.prefix_id}")
                return prefix
            if declared.must_be_held:
                self._explain_missing(key)
            starts = [
                p for p in self.prefixes.values()
                if p.num_tokens < declared.num_tokens
                and (p.key.tenant, p.key.fingerprint, p.key.layout, p.key.policy)
                == (key.tenant, key.fingerprint, key.layout, key.policy)
                and declared.tokens.startswith(p.tokens)
            ]  # fmt: skip
        return max(starts, key=lambda p: p.num_tokens, default=None)

    def _explain_missing(self, key: PrefixKey) -> None:
        others = [p.key for p in self.prefixes.values() if p.key.tenant == key.tenant and p.key.digest == key.digest]
        if not others:
            raise NotFound(f"prefix.chunk_hashes: no prefix {key.digest.hex()} is held for this caller")
        same_model = [k for k in others if k.fingerprint == key.fingerprint]
        if not same_model:
            name = "prefix.fingerprint"
        elif not any(k.layout == key.layout for k in same_model):
            name = "layout"
        else:
            name = "policy"
        raise FailedPrecondition(
            f"{name}: prefix {key.digest.hex()} is held for another {name.split('.')[-1]}, not this one "
            "(a prefix is shared between sessions of one model fingerprint, layout and policy configuration)"
        )

    # ---- references ----------------------------------------------------------------------
    def acquire(self, prefix: Prefix) -> None:
        with self._lock:
            prefix.refs += 1
            prefix.hits += 1
            prefix.last_used = time.monotonic()

    def release(self, prefix: Prefix) -> None:
        """A session using the prefix closed; the prefix stays cached until evicted."""
        with self._lock:
            prefix.refs -= 1
            prefix.last_used = time.monotonic()

    # ---- registration --------------------------------------------------------------------
    def register(
        self, session, declared: Declared, selection: torch.Tensor | None, parent: Prefix | None = None
    ) -> Prefix | None:
        """After `session` ingested the declared prefix (or, over `parent`, a shorter held one,
        appended the rest): hand its full pages over (a parent's stay the parent's), copy its
        partial page and its policy state. Returns the new Prefix (referenced by the session;
        it references `parent`), or None when an equal one was registered meanwhile or memory
        is short (the session keeps its pages; nothing is shared)."""
        store, policy = session.store, session.policy
        key = PrefixKey(session.worker_id, declared.fingerprint, session.layout, policy_key(policy), declared.digest)
        T = declared.num_tokens
        full = store.full_pages(T)
        partial = 1 if T > full * store.tokens_per_page else 0
        metadata = policy.metadata_bytes()
        with self._lock:
            if key in self.prefixes:
                return None
            try:
                self._make_room(partial, metadata)
                tail = self.host_pool.allocate(partial, session.worker_id)
                try:
                    self.device_pool.reserve(metadata)
                except ResourceExhausted:
                    self.host_pool.free(tail, session.worker_id)
                    raise
            except ResourceExhausted as exc:
                log.warning("session %s: prefix %s not shared (%s)", session.session_id, declared.prefix_id, exc.message)
                return None
            if partial:
                self.host_pool.copy_page(store.pages[full], tail[0])
            shared = store.shared  # the parent's full pages, mapped by the session
            prefix = Prefix(
                key, declared.tokens, T, store.hand_over(full) + tail, full, self.host_pool.page_bytes,
                policy.template(), None if selection is None else selection.clone(), metadata, refs=1,
                parent=parent, shared=shared if parent is not None else 0, prompt_tokens=session.prompt_tokens,
            )
            if parent is not None:
                parent.refs += 1  # released when this one is evicted
            self.prefixes[key] = prefix
        log.info(
            "prefix %s registered by session %s: worker=%s %d tokens, host %d bytes, policy %s",
            prefix.prefix_id, session.session_id, session.worker_id, T, prefix.host_bytes, policy.name,
        )
        return prefix

    # ---- eviction ------------------------------------------------------------------------
    def make_room(self, host_pages: int, device_bytes: int) -> None:
        """Evict unreferenced prefixes, least recently used first, until `host_pages` pages and
        `device_bytes` bytes are free (or none is left to evict: admission then refuses)."""
        with self._lock:
            self._make_room(host_pages, device_bytes)

    def _make_room(self, host_pages: int, device_bytes: int) -> None:
        def short() -> bool:
            device = self.device_pool.usage()
            return not self.host_pool.can_allocate(host_pages) or device.free_bytes < device_bytes

        while short():
            idle = [p for p in self.prefixes.values() if p.refs == 0]
            if not idle:
                return
            self._evict(min(idle, key=lambda p: p.last_used))

    def _evict(self, prefix: Prefix) -> None:
        del self.prefixes[prefix.key]
        self.host_pool.free(prefix.pages[prefix.shared :], prefix.tenant)
        self.device_pool.unreserve(prefix.metadata_bytes)
        prefix.pages, prefix.selection = [], None
        if prefix.parent is not None:
            prefix.parent.refs -= 1
            prefix.parent.last_used = time.monotonic()
            prefix.parent = None
        self.evictions += 1
        self.on_evict(prefix)
        log.info("prefix %s evicted (worker=%s, %d tokens, %d hits): its memory is needed",
                 prefix.prefix_id, prefix.tenant, prefix.num_tokens, prefix.hits)

    def clear(self) -> None:
        """Free every prefix (daemon shutdown, after every session closed)."""
        with self._lock:
            for prefix in list(self.prefixes.values()):
                self._evict(prefix)

    # ---- accounting ----------------------------------------------------------------------
    def held(self) -> list[Prefix]:
        """Every prefix held, of every tenant (callers filter by tenant)."""
        with self._lock:
            return list(self.prefixes.values())

    def in_use_bytes(self, tenant: str) -> int:
        """Host bytes of the tenant's referenced prefixes (cached ones are evictable: not counted)."""
        with self._lock:
            return sum(p.host_bytes for p in self.prefixes.values() if p.tenant == tenant and p.refs > 0)
