"""Batches of causal-LM training examples that spend little compute on padding.

Packing (`trainer.packing`) concatenates whole examples into rows of at most max_length tokens. Position ids restart
at 0 for every example, the first token of each example is never predicted from the one before it, and attention
never crosses examples: under SDPA and eager attention through a 4-D block-diagonal causal mask built on the
device (transformers 5.x passes a 4-D mask to the attention function as it is; position ids alone do not isolate
the examples there), under flash-attention by putting the whole batch in one row without padding, whose
variable-length kernel splits it where the position ids restart. Length grouping (`trainer.group_by_length`) is
the alternative that keeps one example per row: batches of similar lengths, so little padding."""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from kasa.data.prompts import IGNORE_INDEX
from kasa.tasks.lm_loss import loss_positions

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Groups of example indices whose lengths add up to at most max_length each, by best-fit decreasing: the
    longest example first, each into the fullest row that still has room for it (few rows, little padding)."""
    too_long = [n for n in lengths if n > max_length or n < 1]
    if too_long:
        raise ValueError(f"cannot pack an example of {too_long[0]} tokens into rows of max_length={max_length}")
    rows: list[list[int]] = []
    room: list[int] = []  # the distinct free capacities of the rows that still have room, ascending
    rows_with_room: dict[int, list[int]] = {}  # free capacity -> rows with exactly that much room
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        at = bisect_left(room, need)
        if at == len(room):  # no row has room: start one
            rows.append([index])
            row, left = len(rows) - 1, max_length - need
        else:
            capacity = room[at]
            row = rows_with_room[capacity].pop()
            if not rows_with_room[capacity]:
                del rows_with_room[capacity]
                room.pop(at)
            rows[row].append(index)
            left = capacity - need
        if left > 0:
            if left not in rows_with_room:
                insort(room, left)
                rows_with_room[left] = []
            rows_with_room[left].append(row)
    return rows


def packed_row(examples: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """One training row holding `examples` one after another, with position ids restarting per example and no loss
    on each example's first token (it would be predicted from the previous example's last token)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for example in examples:
        input_ids += example["input_ids"]
        labels += [IGNORE_INDEX] + list(example["labels"][1:])
        position_ids += range(len(example["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class PackedCollator:
    """Batches packed rows. Rows are right-padded to the longest with a block of their own (positions from 0, label
    IGNORE_INDEX, attention_mask 0), or, for flash-attention, concatenated into one row without padding.
    `attention_mask` marks the real tokens; `task.model_inputs` turns it into what the attention needs. Where the
    loss lies is added as PadCollator adds it."""

    def __init__(self, pad_token_id: int, one_row: bool) -> None:
        self.pad_token_id = pad_token_id
        self.one_row = one_row

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.one_row:
            rows = [{key: [value for row in rows for value in row[key]] for key in rows[0]}]
        length = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
        for row in rows:
            pad = length - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(row["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
            batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * pad)
        tensors = {key: torch.tensor(value) for key, value in batch.items()}
        return {**tensors, **loss_positions(tensors["labels"])}


def block_causal_mask(position_ids: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (batch, 1, length, length) mask of packed rows: token i attends to token j <= i of the same example
    (examples start where the position ids return to 0). Boolean (True = attend) for SDPA; with `additive_dtype`,
    0 and the dtype's minimum, which eager attention adds to its scores."""
    example = (position_ids == 0).cumsum(dim=-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = ((example[:, :, None] == example[:, None, :]) & causal)[:, None]
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


class LengthGroupedSampler(Sampler[int]):
    """Indices in random groups of 50 batches, each group sorted longest first, so that every batch (cut by the
    data loader every batch_size indices) holds examples of similar lengths. The order depends on the seed and
    the epoch only (`set_epoch`), so a resumed run sees the same batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.group = batch_size * 50  # a multiple of batch_size: only the very last batch can be short
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.group):
            yield from sorted(order[start:start + self.group], key=lambda i: -self.lengths[i])
