"""Content-addressed prompt prefixes: the chained per-chunk hash both the SDK and the daemon compute.

h_i = sha256(h_{i-1} || token ids of chunk i as uint32 little-endian), h_{-1} = 32 zero
bytes; the last hash is the prefix's id. Chaining makes every chunk's hash name the whole
prefix up to it (LMCache's hashed chunks, vLLM's block hashes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvrecall.v1 import kvrecall_pb2 as pb

DEFAULT_CHUNK_TOKENS = 256
MAX_CHUNK_TOKENS = 1 << 16
HASH_BYTES = 32


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """The token ids as uint32 little-endian bytes (what the hash and the comparison read)."""
    return np.asarray(token_ids, dtype="<u4").tobytes()


def chain_hashes(token_ids: Sequence[int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[bytes]:
    """One 32-byte hash per chunk of `chunk_tokens` token ids (the last may be shorter)."""
    raw = token_bytes(token_ids)
    step = 4 * chunk_tokens
    previous = bytes(HASH_BYTES)
    hashes = []
    for offset in range(0, len(raw), step):
        previous = hashlib.sha256(previous + raw[offset : offset + step]).digest()
        hashes.append(previous)
    return hashes


def declare(
    token_ids: Sequence[int], fingerprint: str, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, must_be_held: bool = False
) -> pb.PrefixDeclaration:
    """The PrefixDeclaration of a prompt prefix of `token_ids` from the model `fingerprint` names."""
    ids = [int(t) for t in token_ids]
    return pb.PrefixDeclaration(
        fingerprint=fingerprint, token_ids=ids, chunk_tokens=chunk_tokens,
        chunk_hashes=chain_hashes(ids, chunk_tokens), must_be_held=must_be_held,
    )


def prefix_id(declaration: pb.PrefixDeclaration) -> str:
    """The id (hex of the last chunk hash) a declaration names."""
    return declaration.chunk_hashes[-1].hex() if declaration.chunk_hashes else ""
