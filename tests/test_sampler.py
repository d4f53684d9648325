"""GlobalBatchSampler, the training data's split over processes, as pure unit tests: one sampler per simulated
process. tests/test_distributed.py checks that real processes train on these shards, and tests/test_runs.py
that a run resumed on another number of processes trains as the uninterrupted one."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tl_dist.data import GlobalBatchSampler

CASES = [(size, world, batch, accumulation)
         for size in (1, 7, 32, 33, 100) for world in (1, 2, 3, 4, 8) for batch in (1, 3, 4, 16)
         for accumulation in (1, 2)]


def shards(size, world, batch, epoch, seed=0, start_step=0, accumulation=1):
    """The micro-batches of every simulated process for one epoch."""
    out = []
    for rank in range(world):
        sampler = GlobalBatchSampler(size, batch, world, rank, seed, accumulation)
        sampler.set_epoch(epoch, start_step)
        batches = list(sampler)
        assert len(batches) == len(sampler), "len() must be the number of micro-batches yielded"
        out.append(batches)
    return out


def global_batches(size, world, batch, epoch, seed=0, accumulation=1):
    """What each optimizer step trains on, over all processes and micro-batches, as sets."""
    per_rank = shards(size, world, batch, epoch, seed, accumulation=accumulation)
    steps = len(per_rank[0]) // accumulation
    return [sorted(i for r in per_rank for b in r[s * accumulation:(s + 1) * accumulation] for i in b)
            for s in range(steps)]


def flat(batches) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize("size, world, batch, accumulation", CASES)
def test_every_sample_once_and_every_process_the_same_number_of_steps(size, world, batch, accumulation):
    for epoch in (0, 1):
        per_rank = shards(size, world, batch, epoch, accumulation=accumulation)
        counts = Counter(i for r in per_rank for i in flat(r))
        assert counts == Counter(range(size)), "each sample exactly once: no padding, nothing left out"
        global_batch = batch * world * accumulation
        assert {len(r) for r in per_rank} == {-(-size // global_batch) * accumulation}, \
            "every process takes as many micro-batches, so none waits in an all-reduce for ever"
        assert all(len(b) <= batch for r in per_rank for b in r)


@pytest.mark.parametrize("size, batch", [(100, 4), (33, 16), (45, 3)])
def test_the_global_batches_do_not_depend_on_the_number_of_processes(size, batch):
    """The same global batch (batch x processes) gives the same optimizer steps on 1, 2 or 4 processes,
    with or without accumulation: a run can resume on another number of processes."""
    reference = global_batches(size, 1, 4 * batch, epoch=3, seed=5)
    assert global_batches(size, 2, 2 * batch, epoch=3, seed=5) == reference
    assert global_batches(size, 4, batch, epoch=3, seed=5) == reference
    assert global_batches(size, 2, batch, epoch=3, seed=5, accumulation=2) == reference
    assert sum(map(len, reference)) == size and len(reference[-1]) == size - (len(reference) - 1) * 4 * batch


def test_one_process_keeps_distributed_samplers_order():
    """One process: the permutation DistributedSampler draws (seed + epoch), so one-process runs train on
    the same batches as before this sampler existed."""
    reference = torch.utils.data.DistributedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=7)
    reference.set_epoch(2)
    assert flat(shards(50, 1, 4, epoch=2, seed=7)[0]) == list(reference)


def test_global_images_counts_the_short_last_batch():
    sampler = GlobalBatchSampler(45, 4, 2, 0, seed=0)  # global batch 8: 5 full steps and one of 5
    assert sampler.steps_per_epoch == 6
    assert [sampler.global_images(s) for s in range(6)] == [8, 8, 8, 8, 8, 5]
    tail = [shards(45, 2, 4, epoch=0)[r][-1] for r in range(2)]
    assert [len(b) for b in tail] == [3, 2]  # samples 0, 2, 4 and 1, 3 of the last global batch


def test_order_is_reshuffled_each_epoch_from_seed_and_epoch():
    size, world, batch = 100, 3, 4
    epoch0, epoch1 = shards(size, world, batch, 0, seed=7), shards(size, world, batch, 1, seed=7)
    assert epoch0 != epoch1, "a new order every epoch"
    assert shards(size, world, batch, 1, seed=7) == epoch1, "the same seed and epoch give the same order"
    assert shards(size, world, batch, 1, seed=8) != epoch1, "the order depends on --seed"
    # the order comes from seed and epoch alone, not from the global RNG that a process has drawn from
    torch.manual_seed(1234)
    torch.rand(10)
    assert shards(size, world, batch, 1, seed=7) == epoch1


@pytest.mark.parametrize("start_step", [0, 1, 2, 5])
def test_a_mid_epoch_start_continues_the_same_epoch(start_step):
    size, world, batch, epoch = 45, 2, 4, 4
    full = shards(size, world, batch, epoch, seed=1, accumulation=2)
    resumed = shards(size, world, batch, epoch, seed=1, start_step=start_step, accumulation=2)
    for rank in range(world):
        assert resumed[rank] == full[rank][2 * start_step:]
    # the next epoch starts from its first batch again
    sampler = GlobalBatchSampler(size, batch, world, 0, seed=1)
    sampler.set_epoch(epoch, start_step=start_step)
    sampler.set_epoch(epoch + 1)
    assert list(sampler) == shards(size, world, batch, epoch + 1, seed=1)[0]
