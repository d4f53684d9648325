"""The stratified split and --max-samples draw exactly the positions they drew before they shared one
group-by-class helper (data.shuffled_by_class): the values below were recorded from the earlier, separate
implementations. A change here changes every run's split, so resuming an older run would mix images."""

from __future__ import annotations

import hashlib
import json

from tl_dist.data import shuffled_by_class, stratified_sample, stratified_split

LABELS = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3]


def fingerprint(positions) -> str:
    return hashlib.sha256(json.dumps(positions).encode()).hexdigest()[:16]


def test_small_split_and_sample_positions_are_pinned():
    assert stratified_split(LABELS, 0.3, seed=0) == ([1, 2, 3, 5, 7, 8, 10, 11, 13, 14], [0, 4, 6, 9, 12])
    assert stratified_sample(LABELS, 6, seed=0) == [0, 4, 6, 10, 13, 14]
    groups = shuffled_by_class(LABELS, seed=0)
    assert [sorted(g) for g in groups] == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    assert groups == shuffled_by_class(LABELS, seed=0) != shuffled_by_class(LABELS, seed=1)


def test_caltech_sized_split_and_sample_positions_are_pinned():
    """The labels of the Caltech-101 sample the values were recorded on (102 classes of 20 images, in class
    order): the split and the sample depend on the labels alone."""
    labels = [c for c in range(102) for _ in range(20)]
    assert fingerprint(stratified_split(labels, 0.2, seed=0)) == "4162b15f4d792aa9"
    assert fingerprint(stratified_split(labels, 0.2, seed=3)) == "85d18ede2df5e900"
    assert fingerprint(stratified_sample(labels, 200, seed=0)) == "9ade62611d15d0e6"
    assert fingerprint(stratified_sample(labels, 500, seed=5)) == "b482ae5fa8d3913f"
