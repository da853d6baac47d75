"""SequenceStore: one session's full KV in host-pool pages.

A page holds `tokens_per_page` (P) tokens laid out [L, 2, H_kv, P, D] (K then V), so the
rows of one (layer, head) are contiguous inside a page and a gather reads whole rows of D
elements. The store borrows its pages from the HostPool at admission (enough for
`max_tokens`) and returns them all on release(). A session over a shared prefix starts
with the prefix's full pages (`shared_pages`, owned by the prefix: read-only here, since a
session writes only tokens past its prefix) and borrows the rest.
"""

from __future__ import annotations

import torch

from kvrecall import kernels
from kvrecall.dtypes import itemsize
from kvrecall.server.errors import InvalidArgument
from kvrecall.server.layout import ModelLayout
from kvrecall.server.pools import HostPool


def tokens_per_page(layout: ModelLayout, page_bytes: int) -> int:
    return page_bytes // layout.token_bytes


class SequenceStore:
    def __init__(
        self, pool: HostPool, layout: ModelLayout, owner: str, device: torch.device | None = None,
        shared_pages: list[int] | None = None,
    ) -> None:
        self.pool = pool
        self.layout = layout
        self.owner = owner
        self.tokens_per_page = tokens_per_page(layout, pool.page_bytes)
        if self.tokens_per_page < 1:
            raise InvalidArgument(
                "layout",
                f"one token needs {layout.token_bytes} bytes, more than a host page "
                f"({pool.page_bytes} bytes); start the daemon with a larger --page-kb",
            )
        num_pages = -(-layout.max_tokens // self.tokens_per_page)
        shared = list(shared_pages or [])
        self.shared = len(shared)  # pages [0, shared) belong to a prefix: never freed here
        self.pages = shared + pool.allocate(num_pages - self.shared, owner)
        self._flat = pool.view(layout.dtype)
        page_elems = pool.page_bytes // itemsize(layout.dtype)
        self._page_base = torch.tensor(self.pages, dtype=torch.int64) * page_elems
        # Row offsets are computed where the working set lives (the gather's index tensors).
        self._page_base_dev = self._page_base.to(device) if device is not None else self._page_base
        self._page_rows_aligned = page_elems % layout.head_dim == 0
        L, H, D, P = layout.num_layers, layout.num_kv_heads, layout.head_dim, self.tokens_per_page
        self._page_shape = (L, 2, H, P, D)
        self._page_numel = L * 2 * H * P * D
        self.num_tokens = 0  # tokens [0, num_tokens) are written

    @property
    def nbytes(self) -> int:
        """Bytes of the pages this store owns (a shared prefix's are the prefix's)."""
        return (len(self.pages) - self.shared) * self.pool.page_bytes

    def full_pages(self, num_tokens: int) -> int:
        """Pages that tokens [0, num_tokens) fill completely."""
        return num_tokens // self.tokens_per_page

    def hand_over(self, num_pages: int) -> list[int]:
        """Give pages [0, num_pages) to a prefix (which frees them); they stay mapped here."""
        self.shared = num_pages
        return self.pages[:num_pages]

    def page(self, index: int) -> torch.Tensor:
        """Page `index` of this sequence as [L, 2, H_kv, P, D]."""
        base = int(self._page_base[index])
        return self._flat[base : base + self._page_numel].view(self._page_shape)

    def _chunks(self, start: int, end: int):
        """(page index, first slot in page, tokens, offset from start) covering [start, end)."""
        P = self.tokens_per_page
        pos = start
        while pos < end:
            index, slot = divmod(pos, P)
            count = min(P - slot, end - pos)
            yield index, slot, count, pos - start
            pos += count

    def write(self, start: int, kv: torch.Tensor, first_layer: int = 0) -> None:
        """Store kv [l, 2, H_kv, n, D] (layers [first_layer, first_layer + l)) as tokens
        [start, start + n)."""
        n, layers = kv.shape[3], slice(first_layer, first_layer + kv.shape[0])
        if kv.is_cuda and self.pool.kind == "pinned" and self._page_base_dev.device == kv.device:
            # One launch writing the pinned pages over PCIe; a copy per page would be a D2H
            # transfer and a stream sync each (2,048 per layer of a 32K prompt at 16 tokens a page).
            kernels.store_tokens(kv, start, first_layer, self._flat, self._page_base_dev, self.tokens_per_page)
        else:
            for index, slot, count, offset in self._chunks(start, start + n):
                self.page(index)[layers, :, :, slot : slot + count].copy_(kv[:, :, :, offset : offset + count])
        self.num_tokens = max(self.num_tokens, start + n)

    def read(self, kv_index: int, layer: int, start: int, end: int) -> torch.Tensor:
        """K (kv_index 0) or V (1) of `layer` for tokens [start, end) as [H_kv, n, D] (a copy)."""
        parts = [
            self.page(index)[layer, kv_index, :, slot : slot + count]
            for index, slot, count, _ in self._chunks(start, end)
        ]
        if not parts:
            return self._flat.new_empty((self.layout.num_kv_heads, 0, self.layout.head_dim))
        return torch.cat(parts, dim=1)

    def keys(self, layer: int, start: int, end: int) -> torch.Tensor:
        return self.read(0, layer, start, end)

    def layer_blocks(self, layer: int, end: int, size: int, device: torch.device):
        """(keys, values) [H_kv, b, D] of `layer` for tokens [0, end), `size` tokens a block, on
        `device`: from pinned pages one gather launch per block reads them over PCIe; else copies."""
        for start in range(0, end, size):
            stop = min(end, start + size)
            if device.type == "cuda" and self.pool.kind == "pinned" and self._page_base_dev.device == device:
                yield self._gather_block(layer, start, stop, device)
            else:
                yield self.read(0, layer, start, stop).to(device), self.read(1, layer, start, stop).to(device)

    def _gather_block(self, layer: int, start: int, stop: int, device: torch.device):
        H, D, n = self.layout.num_kv_heads, self.layout.head_dim, stop - start
        heads = torch.arange(H, device=device)[:, None]
        positions = torch.arange(start, stop, device=device)[None, :]
        src = torch.cat([self.row_offsets(layer, kv, heads, positions).reshape(-1) for kv in (0, 1)])
        out = torch.empty(2 * H * n * D, dtype=self._flat.dtype, device=device)
        kernels.gather_rows(self._flat, src, out, torch.arange(2 * H * n, device=device) * D, D)
        kv = out.view(2, H, n, D)
        return kv[0], kv[1]

    def row_offsets(
        self, layer: torch.Tensor, kv_index: int, head: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        """Element offsets into the pool's flat view of rows (layer, kv, head, position); int64 [N]."""
        L, _, H, P, D = self._page_shape
        page_index = torch.div(position, P, rounding_mode="floor")
        in_page = position - page_index * P
        return self._page_base_dev[page_index] + (((layer * 2 + kv_index) * H + head) * P + in_page) * D

    @property
    def page_table(self) -> torch.Tensor:
        """Element offset of each of this sequence's pages in `flat`, int64 [pages], on the
        working set's device (what the placement kernels address host rows by)."""
        return self._page_base_dev

    @property
    def page_table_host(self) -> torch.Tensor:
        """page_table in host memory."""
        return self._page_base

    @property
    def page_rows_aligned(self) -> bool:
        """Whether every page starts at a whole row of the flat pool (rows of D elements)."""
        return self._page_rows_aligned

    @property
    def flat(self) -> torch.Tensor:
        """The pool's flat view in this layout's dtype (the gather source)."""
        return self._flat

    def release(self) -> None:
        """Return every page to the pool (idempotent)."""
        if self.pages:
            self.pool.free(self.pages[self.shared :], self.owner)
            self.pages, self.shared = [], 0
