"""Emulated ``nki.collectives``: collective communication between ranks.

The emulator runs one rank (a kernel call on one logical NeuronCore), so a collective over a
replica group of that one rank is exact (all-reduce, all-gather and reduce-scatter copy, a
permute to itself copies); a group that names other ranks needs ranks the emulator does not
run and is refused naming the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nkimoe.nki.emulator import isa as _isa
from nkimoe.nki.emulator.core import EmulatorError, NKIObject, NkiTensor, not_emulated

__all__ = ["NKIObject", "ReplicaGroup", "all_gather", "all_reduce", "all_to_all", "all_to_all_v",
           "collective_permute", "collective_permute_implicit",
           "collective_permute_implicit_current_processing_rank_id", "collective_permute_implicit_reduce",
           "rank_id", "reduce_scatter"]


class ReplicaGroup(NKIObject):
    """Groups of ranks that take part in a collective; sub-groups must not overlap."""

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        self.groups = [list(int(r) for r in g) for g in groups]
        seen = [r for g in self.groups for r in g]
        if len(seen) != len(set(seen)):
            raise EmulatorError(f"ReplicaGroup {self.groups}: sub-groups overlap")

    def __repr__(self) -> str:
        return f"ReplicaGroup({self.groups})"


def rank_id() -> int:
    """The rank of this kernel call: the emulator runs rank 0."""
    return 0


def _own_group(api: str, replica_group: Any) -> None:
    groups = replica_group.groups if isinstance(replica_group, ReplicaGroup) else None
    if groups is None:
        raise EmulatorError(f"{api}: replica_group must be an nki.collectives.ReplicaGroup, got {replica_group!r}")
    mine = next((g for g in groups if rank_id() in g), [])
    if mine != [rank_id()]:
        raise not_emulated(api, f"replica group {mine or groups} spans ranks other than {rank_id()}; the emulator "
                                "runs one rank")


def _one_rank(api: str, srcs: Sequence[NkiTensor], dsts: Sequence[NkiTensor], replica_group: Any) -> None:
    """A collective over rank 0 alone: each dst receives its src."""
    _own_group(api, replica_group)
    if len(srcs) != len(dsts):
        raise EmulatorError(f"{api}: {len(srcs)} srcs but {len(dsts)} dsts")
    for src, dst in zip(srcs, dsts):
        if src.buffer.on_chip and dst.buffer.on_chip:
            _isa.tensor_copy(dst=dst, src=src)
        else:
            _isa.dma_copy(dst=dst, src=src)


def all_reduce(srcs: Sequence[NkiTensor], dsts: Sequence[NkiTensor], replica_group: ReplicaGroup, op: Any) -> None:
    """Reduce across the group's ranks (one rank: a copy)."""
    _one_rank("nki.collectives.all_reduce", srcs, dsts, replica_group)


def all_gather(srcs: Sequence[NkiTensor], dsts: Sequence[NkiTensor], replica_group: ReplicaGroup,
               collective_dim: int) -> None:
    """Concatenate the ranks' srcs along ``collective_dim`` (one rank: a copy)."""
    _one_rank("nki.collectives.all_gather", srcs, dsts, replica_group)


def reduce_scatter(srcs: Sequence[NkiTensor], dsts: Sequence[NkiTensor], replica_group: ReplicaGroup,
                   collective_dim: int, op: Any) -> None:
    """Reduce across ranks and give each its slice (one rank: a copy)."""
    _one_rank("nki.collectives.reduce_scatter", srcs, dsts, replica_group)


def all_to_all(srcs: Sequence[NkiTensor], dsts: Sequence[NkiTensor], replica_group: ReplicaGroup,
               collective_dim: int) -> None:
    """Split srcs among the ranks and concatenate what each receives (one rank: a copy)."""
    _one_rank("nki.collectives.all_to_all", srcs, dsts, replica_group)


def all_to_all_v(srcs: Sequence[NkiTensor], dsts: Sequence[NkiTensor], replica_group: ReplicaGroup,
                 metadata_tensor: NkiTensor, recv_counts_known: bool = False, has_rdispls: bool = False) -> None:
    raise not_emulated("nki.collectives.all_to_all_v", "its counts and displacements address other ranks' buffers")


def collective_permute(srcs: Sequence[NkiTensor], dsts: Sequence[NkiTensor], source_target_pairs: Any) -> None:
    """Send each source rank's srcs to its target rank (only rank 0 to itself runs here)."""
    pairs = [tuple(int(r) for r in p) for p in source_target_pairs]
    if any(p != (rank_id(), rank_id()) for p in pairs):
        raise not_emulated("nki.collectives.collective_permute",
                           f"pairs {pairs} name ranks other than {rank_id()}; the emulator runs one rank")
    _one_rank("nki.collectives.collective_permute", srcs, dsts, ReplicaGroup([[rank_id()]]))


def collective_permute_implicit(srcs_by_channel: Any, dsts_by_channel: Any, replica_group: ReplicaGroup,
                                channel_ids: Any = [0]) -> None:  # noqa: B006 (the documented default)
    raise not_emulated("nki.collectives.collective_permute_implicit", "a ring needs more than the one rank the "
                                                                      "emulator runs")


def collective_permute_implicit_reduce(srcs0_by_channel: Any, srcs1_by_channel: Any, dsts_by_channel: Any,
                                       replica_group: ReplicaGroup, op: Any,
                                       channel_ids: Any = [0]) -> None:  # noqa: B006
    raise not_emulated("nki.collectives.collective_permute_implicit_reduce", "a ring needs more than the one "
                                                                             "rank the emulator runs")


def collective_permute_implicit_current_processing_rank_id(iteration_id: Any, replica_group: ReplicaGroup,
                                                           channel_id: int = 0) -> Any:
    raise not_emulated("nki.collectives.collective_permute_implicit_current_processing_rank_id",
                       "a ring needs more than the one rank the emulator runs")
