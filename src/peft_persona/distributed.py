"""Calibration across processes with ``torch.distributed``, bit-identical to one process.

Launch the CLI with ``torchrun --nproc-per-node N --no-python peft-persona extract ...`` (or ``accelerate launch``);
the API works in any initialised process group. Batches are dealt round-robin: rank ``r`` forwards batches
``r, r + N, ...``. Each rank keeps one statistic per batch it ran; every rank then receives all of them, batch by
batch from the rank that ran it, and adds them in batch order, starting from zero, which is exactly the order one
process adds them in. (An all-reduce would sum in another order and could change the last bits of the float64 sums,
so masks could differ at near-ties.) Selection is then split across ranks by layer and the packed masks are
broadcast from the rank that selected them. Without an initialised process group, every function here is the
one-process case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .bits import pack_mask, unpack_mask


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this is rank 0 (or the only process)."""
    return world()[0] == 0


def owner(index: int) -> int:
    """The rank that runs batch (or selects layer) ``index``."""
    return index % world()[1]


def mine(names: Sequence[str], split: bool = True) -> list[str]:
    """The ``names`` (layers) this process selects: all of them in one process or without ``split``, else every N-th
    of N ranks."""
    rank = world()[0]
    return [name for index, name in enumerate(names) if not split or owner(index) == rank]


def barrier() -> None:
    """Wait for every process (nothing to wait for in one)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.distributed.get_backend() == "nccl"
        else torch.device("cpu")
    )


def add_in_batch_order(
    totals: Sequence[torch.Tensor], local: Mapping[int, Sequence[torch.Tensor]], n_batches: int
) -> None:
    """Add every batch's tensors to ``totals`` (in place), batch 0 first, on every rank.

    ``local[b]`` holds batch ``b``'s tensors (shaped like ``totals``) on the rank that ran it.
    """
    sizes = [t.numel() for t in totals]
    device = _device()
    for batch in range(n_batches):
        if owner(batch) == world()[0]:
            flat = torch.cat([t.reshape(-1) for t in local[batch]]).to(device, torch.float64)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float64, device=device)
        torch.distributed.broadcast(flat, src=owner(batch))
        for total, part in zip(totals, flat.split(sizes), strict=True):
            total += part.view(total.shape).to(total.device, total.dtype)


def share_masks(
    masks: dict[str, torch.Tensor], layers: Sequence[str], shapes: Mapping[str, tuple[int, int]], packed: bool = False
) -> None:
    """Fill ``masks`` (layer to mask: ``bool``, or packed ``uint8`` with ``packed``) on every rank from the rank that
    owns each layer (in place)."""
    device = _device()
    for index, layer in enumerate(layers):
        out_features, in_features = shapes[layer]
        if owner(index) == world()[0]:
            bits = (masks[layer] if packed else pack_mask(masks[layer])).to(device)
        else:
            bits = torch.empty(out_features, (in_features + 7) // 8, dtype=torch.uint8, device=device)
        torch.distributed.broadcast(bits, src=owner(index))
        masks[layer] = bits.cpu() if packed else unpack_mask(bits.cpu(), in_features)


def share_all_masks(
    masks: dict[str, dict[str, torch.Tensor]], shapes: Mapping[str, tuple[int, int]], packed: bool = False
) -> None:
    """Give every rank every persona's mask of every layer of ``shapes`` (in place, layers in that order), each from
    the rank that selected it; nothing to do in one process."""
    if world()[1] == 1:
        return
    for persona, persona_masks in masks.items():
        share_masks(persona_masks, list(shapes), shapes, packed=packed)
        masks[persona] = {layer: persona_masks[layer] for layer in shapes}


def init_from_environment() -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1 in the environment); ``False`` if none.

    The backend is ``nccl`` when CUDA is available, else ``gloo``.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or world()[1] > 1:
        return world()[1] > 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    return True
