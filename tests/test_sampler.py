"""ShardedBatchSampler, the training data's split over processes (issue 3, point 1), as pure unit tests: one
sampler per simulated process. tests/test_distributed.py checks that real processes train on these shards."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tl_dist.data import ShardedBatchSampler

CASES = [(size, world, batch)
         for size in (1, 7, 32, 33, 100) for world in (1, 2, 3, 4, 8) for batch in (1, 3, 4, 16)]


def shards(size: int, world: int, batch: int, epoch: int, seed: int = 0, start_batch: int = 0):
    """The batches of every simulated process for one epoch."""
    out = []
    for rank in range(world):
        sampler = ShardedBatchSampler(size, batch, world, rank, seed)
        sampler.set_epoch(epoch, start_batch)
        batches = list(sampler)
        assert len(batches) == len(sampler), "len() must be the number of batches yielded (progress, steps)"
        out.append(batches)
    return out


def flat(batches) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize("size, world, batch", CASES)
def test_shards_are_disjoint_and_cover_the_split_once_up_to_padding(size, world, batch):
    for epoch in (0, 1):
        per_rank = [flat(b) for b in shards(size, world, batch, epoch)]
        per_process = -(-size // world)
        assert all(len(r) == per_process for r in per_rank), "every process gets the same number of samples"
        counts = Counter(i for r in per_rank for i in r)
        assert set(counts) == set(range(size)), "the shards together cover the whole split"
        padding = per_process * world - size
        assert padding < world
        assert sum(c - 1 for c in counts.values()) == padding, "only the padding repeats samples"
        # every process takes the same number of steps, so no process waits in an all-reduce for ever
        steps = {len(b) for b in shards(size, world, batch, epoch)}
        assert steps == {-(-per_process // batch)}


@pytest.mark.parametrize("size, world, batch", [(32, 3, 4), (33, 2, 16), (100, 4, 3), (7, 8, 1)])
def test_every_process_cuts_the_same_permutation(size, world, batch):
    """DistributedSampler's layout: process r takes positions r, r + W, r + 2W, ... of one permutation of
    the split (padded with its own first elements), the same permutation on every process."""
    per_rank = [flat(b) for b in shards(size, world, batch, epoch=3, seed=5)]
    interleaved = [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(world)]
    perm = interleaved[:size]
    assert sorted(perm) == list(range(size))
    assert interleaved[size:] == perm[:len(interleaved) - size]
    # the batches are consecutive runs of the process' shard, batch_size long but the last
    for batches in shards(size, world, batch, epoch=3, seed=5):
        assert all(len(b) == batch for b in batches[:-1]) and 0 < len(batches[-1]) <= batch


def test_order_is_reshuffled_each_epoch_from_seed_and_epoch():
    size, world, batch = 100, 3, 4
    epoch0, epoch1 = shards(size, world, batch, 0, seed=7), shards(size, world, batch, 1, seed=7)
    assert epoch0 != epoch1, "a new order every epoch"
    assert [sorted(flat(b)) for b in epoch0] != [sorted(flat(b)) for b in epoch1], \
        "each epoch deals different samples to each process, not just another order within each shard"
    assert shards(size, world, batch, 1, seed=7) == epoch1, "the same seed and epoch give the same order"
    assert shards(size, world, batch, 1, seed=8) != epoch1, "the order depends on --seed"
    # the order comes from seed and epoch alone, not from the global RNG that a process has drawn from
    torch.manual_seed(1234)
    torch.rand(10)
    assert shards(size, world, batch, 1, seed=7) == epoch1


def test_the_order_does_not_depend_on_the_processes_history():
    """A sampler that went through epochs 0..2 deals epoch 2 as one created for epoch 2 does (a resumed run
    creates a fresh one)."""
    sampler = ShardedBatchSampler(50, 4, 2, 1, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = list(sampler)
    assert seen == shards(50, 2, 4, epoch=2, seed=3)[1]


@pytest.mark.parametrize("start_batch", [0, 1, 2, 5])
def test_a_mid_epoch_start_continues_the_same_epoch(start_batch):
    size, world, batch, epoch = 45, 2, 4, 4
    full = shards(size, world, batch, epoch, seed=1)
    resumed = shards(size, world, batch, epoch, seed=1, start_batch=start_batch)
    for rank in range(world):
        assert resumed[rank] == full[rank][start_batch:]
    # the next epoch starts from its first batch again
    sampler = ShardedBatchSampler(size, batch, world, 0, seed=1)
    sampler.set_epoch(epoch, start_batch=start_batch)
    sampler.set_epoch(epoch + 1)
    assert list(sampler) == shards(size, world, batch, epoch + 1, seed=1)[0]
