"""The caching-allocator model against numbers worked out by hand from the CUDA caching allocator's rules
(c10/cuda/CUDACachingAllocator.cpp: 512 B rounding, 1 MiB small/large boundary, 2 MiB / 20 MiB segments,
2 MiB rounding of segments from 10 MiB, best fit, split thresholds, per-stream pools)."""
from __future__ import annotations

import pytest

from library.planner.allocator import CachingAllocator, replay, round_size, segment_size
from library.planner.card import Card
from library.planner.tracker import Record

KIB, MIB = 2**10, 2**20


@pytest.mark.parametrize("request_bytes, block", [(1, 512), (512, 512), (513, 1024), (1000, 1024),
                                                  (MIB + 1, MIB + 512)])
def test_requests_round_up_to_512_bytes(request_bytes, block):
    assert round_size(request_bytes) == block


@pytest.mark.parametrize("size, segment", [(512, 2 * MIB), (MIB, 2 * MIB), (MIB + 512, 20 * MIB),
                                           (10 * MIB - 512, 20 * MIB), (10 * MIB, 10 * MIB),
                                           (11 * MIB + 512, 12 * MIB)])
def test_segment_sizes(size, segment):
    assert segment_size(size) == segment


def test_small_requests_share_a_2_mib_segment():
    a = CachingAllocator()
    a.allocate(1000)  # 1024 B block in a new 2 MiB segment
    a.allocate(MIB)  # the rest (2 MiB - 1 KiB) fits 1 MiB
    assert (a.reserved, a.allocated) == (2 * MIB, MIB + 1024)
    a.allocate(MIB)  # 1 MiB - 1 KiB left: a second segment
    assert (a.reserved, a.allocated, a.segments) == (4 * MIB, 2 * MIB + 1024, 2)


def test_a_large_block_is_split_only_when_more_than_1_mib_remains():
    a = CachingAllocator()
    a.allocate(5 * MIB)  # a 20 MiB segment, split: 5 + 15
    a.allocate(14 * MIB + 512 * KIB)  # takes the 15 MiB block whole: 0.5 MiB would remain, not > 1 MiB
    assert (a.reserved, a.allocated) == (20 * MIB, 20 * MIB)


def test_a_smaller_bucket_fragments_the_cached_block():
    """A 12 MiB activation of the square bucket, freed; an 8 MiB one of the next bucket takes that block and
    splits it (4 MiB left); the square bucket's 12 MiB next step fits nowhere: a second segment."""
    a = CachingAllocator()
    square = a.allocate(12 * MIB)
    a.free(square)
    wide = a.allocate(8 * MIB)
    a.free(wide)  # merges back with the 4 MiB rest: the 12 MiB block again
    a.allocate(8 * MIB)
    a.allocate(12 * MIB)
    assert (a.reserved, a.peak_allocated) == (24 * MIB, 20 * MIB)


def test_best_fit_and_merging():
    a = CachingAllocator()
    blocks = [a.allocate(4 * MIB) for _ in range(3)]  # one 20 MiB segment: 4 + 4 + 4, 8 MiB free at 12 MiB
    a.free(blocks[0])
    a.free(blocks[1])  # merged: 8 MiB free at address 0
    assert a.allocate(3 * MIB).addr == 0  # two free 8 MiB blocks: the lower address
    assert a.allocate(5 * MIB).addr == 3 * MIB  # the 5 MiB left at 3 MiB: best fit, no new segment
    assert a.reserved == 20 * MIB


def test_a_side_stream_does_not_reuse_the_compute_streams_blocks():
    a = CachingAllocator()
    a.free(a.allocate(12 * MIB))
    a.allocate(12 * MIB, stream="swap")
    assert a.reserved == 24 * MIB
    a.allocate(12 * MIB)  # the compute stream's cached block
    assert a.reserved == 24 * MIB


def test_replay_follows_the_records_clock():
    """Two phases: a 12 MiB then an 8 MiB tensor (one after the other) in the first; in the second a 12 MiB
    one while the 8 MiB one lives. Peak reserved and peak allocated within each phase."""
    records = [Record(12 * MIB, born=1, phase="a", died=2), Record(8 * MIB, born=3, phase="a", died=6),
               Record(12 * MIB, born=5, phase="b", died=7)]
    phases = replay(records, start=0, spans={"a": (0, 4), "b": (4, 7)})
    assert (phases["a"].allocated, phases["a"].reserved) == (12 * MIB, 12 * MIB)
    assert (phases["b"].allocated, phases["b"].reserved) == (20 * MIB, 24 * MIB)


def test_empty_cache_gives_back_only_wholly_free_segments():
    """A 20 MiB segment split 4 + 16 with the 4 MiB block in use stays; a free 24 MiB segment and a free 2 MiB
    small segment go back; the next request that does not fit the kept segment makes a new one."""
    a = CachingAllocator()
    a.allocate(4 * MIB)  # a 20 MiB segment: 4 in use, 16 free
    a.free(a.allocate(24 * MIB))  # its own 24 MiB segment, wholly free
    a.free(a.allocate(1000))  # a 2 MiB small segment, wholly free
    assert (a.reserved, a.segments) == (46 * MIB, 3)
    a.empty_cache()
    assert (a.reserved, a.segments, a.allocated, a.peak_reserved) == (20 * MIB, 1, 4 * MIB, 46 * MIB)
    a.allocate(14 * MIB)  # 16 MiB free in the kept segment: fits, nothing reserved
    assert a.reserved == 20 * MIB
    a.allocate(14 * MIB)
    assert a.reserved == 34 * MIB


def test_replay_releases_the_cache_where_the_run_calls_empty_cache():
    """A step leaves a 12 MiB block cached; sampling needs 16 MiB. Without empty_cache the card holds both
    (28 MiB); with it between the phases, 16 MiB (the phase's peak reserved)."""
    records = [Record(12 * MIB, born=1, phase="step", died=2), Record(16 * MIB, born=4, phase="sample", died=5)]
    spans = {"step": (0, 2), "sample": (3, 6)}
    assert replay(records, 0, spans)["sample"].reserved == 28 * MIB
    released = replay(records, 0, spans, releases=[3, 6])
    assert (released["step"].reserved, released["sample"].reserved) == (12 * MIB, 16 * MIB)
    assert released["sample"].allocated == 16 * MIB


def test_replay_starts_with_what_lives_and_the_workspace():
    card = Card(capability=(8, 9))
    records = [Record(100 * MIB, born=1, phase="setup"), Record(3 * MIB, born=2, phase="setup", died=4)]
    phases = replay(records, start=3, spans={"x": (3, 5)}, persistent=[card.cublas_workspace])
    # the 8 MiB + 128 KiB cuBLAS workspace opens a 20 MiB segment; the 3 MiB tensor fits its rest
    assert phases["x"].reserved == 20 * MIB + 100 * MIB
    assert phases["x"].allocated == card.cublas_workspace + 103 * MIB
    assert Card(capability=(9, 0)).cublas_workspace == 32 * MIB


def test_bucket_steps_repeat_the_step_at_other_sizes():
    """Inside the step span (clocks 10-20): an activation of 12 MiB and a gradient of 4 MiB; a bucket of 3/4 the
    area repeats them at 9 MiB and 4 MiB, then the planned size comes back; what outlives the step is not repeated."""
    from library.planner.plan import bucket_steps

    weights = Record(100 * MIB, born=1, phase="setup", category="weights")
    activation = Record(12 * MIB, born=11, phase="forward", died=15)
    gradient = Record(4 * MIB, born=14, phase="backward", died=19, category="gradients")
    state = Record(MIB, born=18, phase="optimizer", category="optimizer state")
    records, span = bucket_steps([weights, activation, gradient, state], (10, 20), (0.75,))
    assert span == (10, 40)
    added = [(r.nbytes // MIB, r.born, r.died) for r in records[4:]]
    assert added == [(9, 21, 25), (4, 24, 29), (12, 31, 35), (4, 34, 39)]
    assert records[4].nbytes == 9 * MIB and records[5].category == "gradients"
    assert bucket_steps([activation], (10, 20), ()) == ([activation], (10, 20))
