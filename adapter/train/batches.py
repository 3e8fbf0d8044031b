"""InternEvo collated batches → the micro-batches the model runs.

InternEvo's collate function gives one step's data as ``micro_num`` rows of ``packed_length`` tokens with
``cu_seqlens`` per row. Packed (``use_packed_dataset=True``): each row is one micro-batch, attention cut at
the ``cu_seqlens`` boundaries. Unpacked: each row holds ``micro_bsz`` samples (the last piece is padding),
and InternEvo's ``unpack_data`` turns it into ``[micro_bsz, seq_len]`` rows, which are plain causal
micro-batches. Like ``unpack_data``, the rows are zero-filled after a short sample, labels included: those
positions count in the loss as predictions of token 0, exactly as in InternEvo's unpacked training.
"""

from __future__ import annotations

import torch

from adapter.model.forward import MicroBatch


def to_microbatches(batch: dict, *, packed: bool, micro_bsz: int, seq_len: int) -> list[MicroBatch]:
    """One ``MicroBatch`` per row of an InternEvo batch (``input_ids``/``labels`` ``[micro_num, packed_length]``)."""
    out = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row:row + 1], batch["labels"][row:row + 1]
        cu = torch.as_tensor(batch["cu_seqlens"][row], dtype=torch.int32)
        if packed:
            out.append(MicroBatch(ids, labels, cu))
            continue
        rows_ids = torch.zeros(micro_bsz, seq_len, dtype=ids.dtype)
        rows_labels = torch.zeros(micro_bsz, seq_len, dtype=labels.dtype)
        bounds = cu.tolist()
        for i in range(micro_bsz):
            start, end = bounds[i], bounds[i + 1]
            rows_ids[i, :end - start] = ids[0, start:end]
            rows_labels[i, :end - start] = labels[0, start:end]
        out.append(MicroBatch(rows_ids, rows_labels))
    return out


def piece_lengths(batches: list[MicroBatch]) -> list[int]:
    """Lengths of the attention pieces in ``batches`` (whole rows when unpacked), for FLOP accounting."""
    lengths = []
    for b in batches:
        if b.cu_seqlens is not None:
            lengths += (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        else:
            lengths += [b.input_ids.shape[1]] * b.input_ids.shape[0]
    return lengths
