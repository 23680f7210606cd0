"""A model of PyTorch's CUDA caching allocator, so that a plan says what `torch.cuda.max_memory_reserved`
(and, with the CUDA context on top, the card) will show, not only what tensors hold.

The rules, as c10/cuda/CUDACachingAllocator.cpp applies them with the default settings (no
expandable_segments, max_split_size_mb or roundup_power2_divisions in PYTORCH_CUDA_ALLOC_CONF):

- a request is rounded up to a multiple of 512 B (kMinBlockSize); under 512 B it takes 512 B;
- requests of at most 1 MiB (kSmallSize) come from the small pool, larger ones from the large pool;
- the smallest cached free block of the same pool and stream that is large enough is used (best fit; among
  equal sizes the lowest address);
- if none is, a new segment is reserved (cudaMalloc): 2 MiB (kSmallBuffer) for a small request, 20 MiB
  (kLargeBuffer) for a request under 10 MiB (kMinLargeAlloc), else the request rounded up to 2 MiB (kRoundLarge);
- the block handed out is split when what is left would be at least 512 B (small pool) or more than 1 MiB
  (large pool); otherwise the whole block is handed out, and memory_allocated counts all of it;
- a freed block merges with free neighbours of its segment; segments are given back only by
  torch.cuda.empty_cache (the run calls it around sampling: library.memory.release_cached_blocks), which frees
  every segment that is one free block (and the allocator itself on an out-of-memory retry, not modelled);
- blocks belong to the stream they were allocated on: a side stream (block swap's copies) has its own blocks.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """The block size a request of `nbytes` takes."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """The cudaMalloc the allocator makes when no cached block fits a (rounded) request of `size`."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class Block:
    addr: int
    size: int
    pool: tuple  # (small: bool, stream)
    prev: "Block | None" = None
    next: "Block | None" = None
    free: bool = True


class CachingAllocator:
    """allocate / free like the CUDA caching allocator; `allocated`, `reserved` and their peaks in bytes."""

    def __init__(self):
        self._free: dict[tuple, list[tuple[int, int]]] = {}  # pool -> sorted (size, addr) of free blocks
        self._blocks: dict[int, Block] = {}  # addr -> free block
        self._end = 0  # the next segment's address
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.segments = 0

    def allocate(self, nbytes: int, stream: str = "main") -> Block:
        size = round_size(nbytes)
        pool = (size <= SMALL_SIZE, stream)
        block = self._take_free(pool, size) or self._new_segment(pool, size)
        rest = block.size - size
        if rest >= MIN_BLOCK if pool[0] else rest > SMALL_SIZE:
            self._split(block, size)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._unlist(neighbour)
                block = self._merge(block, neighbour)
        self._list(block)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache: every segment that is wholly free (one free block, no neighbours) is given
        back to the card."""
        for pool, free in self._free.items():
            kept = []
            for size, addr in free:
                block = self._blocks[addr]
                if block.prev is None and block.next is None:
                    del self._blocks[addr]
                    self.reserved -= size
                    self.segments -= 1
                else:
                    kept.append((size, addr))
            self._free[pool] = kept

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    # ---- the pools -------------------------------------------------------------------------------
    def _take_free(self, pool: tuple, size: int) -> Block | None:
        free = self._free.get(pool, [])
        i = bisect.bisect_left(free, (size, -1))
        if i == len(free):
            return None
        block = self._blocks.pop(free.pop(i)[1])
        return block

    def _new_segment(self, pool: tuple, size: int) -> Block:
        total = segment_size(size)
        block = Block(self._end, total, pool)
        self._end += total
        self.reserved += total
        self.segments += 1
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _split(self, block: Block, size: int) -> None:
        rest = Block(block.addr + size, block.size - size, block.pool, prev=block, next=block.next)
        if block.next is not None:
            block.next.prev = rest
        block.next, block.size = rest, size
        self._list(rest)

    def _merge(self, block: Block, other: Block) -> Block:
        first, second = (block, other) if block.addr < other.addr else (other, block)
        first.size += second.size
        first.next = second.next
        if second.next is not None:
            second.next.prev = first
        first.free = True
        return first

    def _list(self, block: Block) -> None:
        bisect.insort(self._free.setdefault(block.pool, []), (block.size, block.addr))
        self._blocks[block.addr] = block

    def _unlist(self, block: Block) -> None:
        free = self._free[block.pool]
        del free[bisect.bisect_left(free, (block.size, block.addr))]
        del self._blocks[block.addr]


# ---------------------------------------------------------------------------------------------
# A plan's allocations, replayed
# ---------------------------------------------------------------------------------------------

@dataclass
class PhaseMemory:
    """One phase of a run as the allocator counts it: the peaks of memory_allocated (blocks, so with the
    512 B rounding and unsplit remainders) and of memory_reserved during the phase."""
    allocated: int
    reserved: int


def replay(records, start: int, spans: dict[str, tuple[int, int]], persistent: list[int] = (),
           releases: list[int] = ()) -> dict[str, PhaseMemory]:
    """Replay the tracker's records (library.planner.tracker.Record) through the allocator from clock
    `start` on: what is alive at `start` is allocated first (in the order it was created), then every
    allocation and free in the order the run made them. `persistent`: allocations made at the start and
    never freed (the cuBLAS workspace). `releases`: clocks at which the run called torch.cuda.empty_cache.
    `spans`: phase name -> (first clock, last clock)."""
    allocator = CachingAllocator()
    for nbytes in persistent:
        allocator.allocate(nbytes)
    clocks, allocated, reserved = [start], [allocator.allocated], [allocator.reserved]
    blocks = {}
    for clock, kind, record in _events(records, start, releases):
        if kind == 0:
            blocks[id(record)] = allocator.allocate(record.nbytes, record.stream)
        elif kind == 1:
            allocator.free(blocks.pop(id(record)))
        else:
            allocator.empty_cache()
        clocks.append(clock)
        allocated.append(allocator.allocated)
        reserved.append(allocator.reserved)
    out = {}
    for name, (first, last) in spans.items():
        lo = bisect.bisect_left(clocks, first)
        hi = bisect.bisect_right(clocks, last)
        before = max(lo - 1, 0)  # what was allocated when the phase began
        out[name] = PhaseMemory(max(allocated[before:hi]), max(reserved[before:hi]))
    return out


def _events(records, start: int, releases: list[int] = ()):
    """(clock, 0 = allocate / 1 = free / 2 = empty_cache, record), in the order of the run; what lives at
    `start` first."""
    events = [(clock, 2, clock, None) for clock in releases if clock > start]
    for r in records:
        if r.died is not None and r.died <= start:
            continue
        events.append((max(r.born, start), 0, r.born, r))
        if r.died is not None:
            events.append((r.died, 1, r.born, r))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    return [(clock, kind, r) for clock, kind, _, r in events]
