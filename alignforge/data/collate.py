"""Batching: padded batches, and packed rows that keep examples isolated.

Packing puts several examples in one row with no padding between them. A packed batch carries
no ``attention_mask``: its ``position_ids`` restart at 0 for each example, and that is what
marks the boundaries. :func:`alignforge.models.attention.attention_inputs` turns them into what
the model's attention backend reads (a block-diagonal mask of the right kind for sdpa, eager
and flex attention; varlen sequence boundaries for flash attention, with no ``T x T`` mask), so
token *i* attends to token *j* only if ``j <= i`` and both belong to the same example. The
model must be called through it (:func:`alignforge.models.scoring.target_token_logps` does):
handed straight to a model with its KV cache on, restarted positions do not isolate anything.
Each example's first token is never a label, so no example is predicted from its neighbour's
last token.
"""

from __future__ import annotations

import torch

from alignforge.data.templating import IGNORE, Tokenized


def pack(examples: list[Tokenized], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens (first-fit decreasing).

    Returns lists of indices into ``examples``; every example appears exactly once.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(examples[i])
        for r, free in enumerate(space):
            if n <= free:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(max_length - n)
    return rows


def collate_padded(batch: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` (B, T)."""
    width = max(len(t) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for b, t in enumerate(batch):
        n = len(t)
        ids[b, :n] = torch.tensor(t.input_ids)
        labels[b, :n] = torch.tensor(t.labels)
        attn[b, :n] = 1
    labels[:, 0] = IGNORE
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def collate_packed(rows: list[list[Tokenized]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed batch: each row concatenates its examples; returns ``input_ids``, ``labels``,
    ``position_ids`` (restarting at 0 per example; 0 on row-end padding, so each padding slot
    is a one-token sequence of its own) and ``segment_ids`` (B, T: the example's index in its
    row, -1 on padding)."""
    width = max(sum(len(t) for t in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    seg = torch.full((B, width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for s, t in enumerate(row):
            n = len(t)
            ids[b, start : start + n] = torch.tensor(t.input_ids)
            lab = torch.tensor(t.labels)
            lab[0] = IGNORE
            labels[b, start : start + n] = lab
            pos[b, start : start + n] = torch.arange(n)
            seg[b, start : start + n] = s
            start += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg}
