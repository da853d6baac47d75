"""Triton kernels of `ws_decode` (pointer-table decode over B working sets). Imported only
when Triton is and the tensors are on a GPU (see `_triton`); `ws_decode` holds the tables, the
PyTorch references and the dispatch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _at(anchor, table, b):
    """Slot b's tensor: the anchor plus its aligned element offset."""
    return anchor + tl.multiple_of(tl.load(table + b), 16)


@triton.jit
def _write_step_kernel(
    k_ptr, v_ptr, q_ptr, pos_ptr, anchor, anchor_pos, keys_tab, values_tab, slot_tab, query_tab,
    cap_tab, wstart_tab, wsize_tab, layer, H, HQ, D: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    cap = tl.load(cap_tab + b)
    if cap > 0:
        pos = tl.load(pos_ptr + b)
        slot = tl.load(wstart_tab + b).to(tl.int64) + pos % tl.load(wsize_tab + b).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        dmask = offs < D
        if h < H:
            row = ((layer * H + h) * cap.to(tl.int64) + slot) * D
            keys = _at(anchor, keys_tab, b)
            values = _at(anchor, values_tab, b)
            tl.store(keys + row + offs, tl.load(k_ptr + (b * H + h) * D + offs, mask=dmask), mask=dmask)
            tl.store(values + row + offs, tl.load(v_ptr + (b * H + h) * D + offs, mask=dmask), mask=dmask)
            slot_pos = _at(anchor_pos, slot_tab, b)
            tl.store(slot_pos + (layer * H + h) * cap.to(tl.int64) + slot, pos.to(tl.int32))
        query = _at(anchor, query_tab, b)
        tl.store(
            query + (layer * HQ + h) * D + offs, tl.load(q_ptr + (b * HQ + h) * D + offs, mask=dmask), mask=dmask
        )

@triton.jit
def _attend_split_kernel(
    q_ptr, anchor, anchor_pos, keys_tab, values_tab, slot_tab, cap_tab, wstart_tab, from_tab, below_tab,
    part_acc, part_m, part_l, layer, H, scale, slots_per_split,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    cap = tl.load(cap_tab + b).to(tl.int64)
    rows = tl.arange(0, GP)
    dims = tl.arange(0, D)
    rmask = rows < G
    elem = q_ptr.dtype.element_ty
    q = tl.load(q_ptr + ((b * H + h) * G + rows[:, None]) * D + dims[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.full((GP,), -1.0e30, tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    start = split * slots_per_split
    end = tl.minimum(start + slots_per_split, cap)
    if cap > 0:
        keys = _at(anchor, keys_tab, b)
        values = _at(anchor, values_tab, b)
        slot_pos = _at(anchor_pos, slot_tab, b)
        base = (layer * H + h) * cap
        wstart = tl.load(wstart_tab + b)
        ring_from = tl.load(from_tab + b)
        kept_below = tl.load(below_tab + b)
        for c0 in range(start, end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < end
            pos = tl.load(slot_pos + base + cols, mask=cmask, other=-1)
            # (ws_decode: deferred eviction's mask; other sessions read every filled slot)
            valid = (pos >= 0) & tl.where(cols >= wstart, pos >= ring_from, pos < kept_below)
            k = tl.load(keys + (base + cols[:, None]) * D + dims[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(values + (base + cols[:, None]) * D + dims[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(elem), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    out = ((b * H + h) * n_splits + split) * GP + rows
    tl.store(part_acc + out[:, None] * D + dims[None, :], acc)
    tl.store(part_m + out, m_i)
    tl.store(part_l + out, l_i)

@triton.jit
def _attend_combine_kernel(
    part_acc, part_m, part_l, out_ptr, H, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    rows = tl.arange(0, GP)
    dims = tl.arange(0, D)
    smask = splits < n_splits
    index = ((b * H + h) * n_splits + splits[:, None]) * GP + rows[None, :]  # [SPLITS, GP]
    m = tl.load(part_m + index, mask=smask[:, None], other=-1.0e30)
    lse = tl.load(part_l + index, mask=smask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - m_max[None, :]) * tl.where(smask[:, None], 1.0, 0.0)
    total = tl.sum(w * lse, axis=0)
    total = tl.where(total > 0, total, 1.0)
    acc = tl.zeros((GP, D), tl.float32)
    for s in range(0, n_splits):
        ws = tl.sum(tl.where(splits[:, None] == s, w, 0.0), axis=0)  # [GP]
        part = tl.load(part_acc + (((b * H + h) * n_splits + s) * GP + rows[:, None]) * D + dims[None, :])
        acc += part * ws[:, None]
    acc = acc / total[:, None]
    tl.store(
        out_ptr + ((b * H + h) * G + rows[:, None]) * D + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(rows < G)[:, None],
    )


def write_step_triton(tables, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, positions: torch.Tensor) -> None:
    B, H, D = k.shape
    HQ = q.shape[1]
    _write_step_kernel[(B, HQ)](
        k.contiguous(), v.contiguous(), q.contiguous(), positions, tables.anchor, tables.anchor_pos, tables.keys, tables.values, tables.slot_pos,
        tables.query, tables.capacity, tables.window_start, tables.window, layer, H, HQ,
        D=D, BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip


def attend_triton(tables, layer: int, q: torch.Tensor, scale: float, workspace) -> torch.Tensor:
    B, HQ, D = q.shape
    H = workspace.kv_heads
    G = HQ // H
    out = torch.empty_like(q)
    _attend_split_kernel[(B, H, workspace.splits)](
        q.contiguous(), tables.anchor, tables.anchor_pos, tables.keys, tables.values, tables.slot_pos, tables.capacity,
        tables.window_start, tables.ring_from, tables.kept_below,
        workspace.acc, workspace.m, workspace.l, layer, H, scale, workspace.slots_per_split,
        G=G, GP=workspace.group_padded, D=D, BLOCK_C=workspace.block_c, IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    _attend_combine_kernel[(B, H)](
        workspace.acc, workspace.m, workspace.l, out, H, workspace.splits,
        G=G, GP=workspace.group_padded, D=D, SPLITS=triton.next_power_of_2(workspace.splits),
    )  # fmt: skip
    return out
