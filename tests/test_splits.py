"""The validation split: `validation_indices` (a fixed, sorted 10 % of train) and the digits pool's "val" split,
which must hold exactly those train examples."""

from __future__ import annotations

import pytest
import torch

from mergebench_core.data.splits import VAL_FRACTION, VAL_SEED, validation_indices


@pytest.mark.parametrize("n, count", [(1, 1), (2, 1), (4, 1), (9, 1), (14, 1), (16, 2), (100, 10), (123, 12),
                                      (127, 13), (1200, 120), (1797, 180)])
def test_count_is_ten_percent_rounded_and_at_least_one(n, count):
    idx = validation_indices(n)
    assert len(idx) == count


@pytest.mark.parametrize("n", [1, 2, 7, 10, 99, 1200, 5000])
def test_indices_are_sorted_distinct_and_in_range(n):
    idx = validation_indices(n)
    assert idx.dtype == torch.long
    assert idx.dim() == 1
    assert bool((idx[1:] > idx[:-1]).all())  # strictly increasing: sorted and distinct
    assert int(idx.min()) >= 0 and int(idx.max()) < n


def test_deterministic_and_seeded():
    a, b = validation_indices(1200), validation_indices(1200)
    assert torch.equal(a, b)
    assert torch.equal(a, validation_indices(1200, VAL_FRACTION, VAL_SEED))
    assert VAL_FRACTION == 0.1 and VAL_SEED == 0
    other = validation_indices(1200, seed=1)
    assert len(other) == len(a) and not torch.equal(a, other)
    # the global generator does not matter
    torch.manual_seed(123)
    c = validation_indices(1200)
    torch.manual_seed(456)
    assert torch.equal(c, a) and torch.equal(validation_indices(1200), a)


def test_not_simply_the_first_or_evenly_spaced_examples():
    idx = validation_indices(1200)
    assert not torch.equal(idx, torch.arange(120))
    assert not torch.equal(idx, torch.arange(0, 1200, 10))
    # spread over the whole train split
    assert int(idx.min()) < 120 and int(idx.max()) >= 1080


def test_other_fractions():
    assert len(validation_indices(10, fraction=0.5)) == 5
    assert len(validation_indices(200, fraction=0.25)) == 50
    assert len(validation_indices(10, fraction=0.01)) == 1
    assert len(validation_indices(10, fraction=0.99)) == 10


@pytest.mark.parametrize("n", [0, -1, -100])
def test_empty_train_split_refused(n):
    with pytest.raises(ValueError, match="no validation split"):
        validation_indices(n)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction_refused(fraction):
    with pytest.raises(ValueError, match="fraction"):
        validation_indices(100, fraction=fraction)


# --- the digits pool's "val" split ---------------------------------------------------------------------------------


def _concat(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("task", ["rot90", "parity"])
def test_digits_val_is_the_chosen_train_examples(digits_pools, task):
    _, taskpool = digits_pools
    train_x, train_y = _concat(taskpool.batches(task, "train", batch_size=100))
    n_train = len(train_y)
    assert n_train == taskpool.recipe.n_train
    idx = validation_indices(n_train)

    val_batches = list(taskpool.batches(task, "val", batch_size=50))
    assert len(val_batches) > 1  # several batches, concatenated in order
    val_x, val_y = _concat(val_batches)
    assert len(val_y) == len(idx) == max(1, round(0.1 * n_train))
    assert taskpool.num_examples(task, "val") == len(idx)
    assert torch.equal(val_x, train_x[idx])
    assert torch.equal(val_y, train_y[idx])

    # the same on a second call
    again_x, again_y = _concat(taskpool.batches(task, "val", batch_size=256))
    assert torch.equal(again_x, val_x) and torch.equal(again_y, val_y)


def test_digits_val_differs_between_tasks_only_by_the_view(digits_pools):
    _, taskpool = digits_pools
    x_digits, y_digits = _concat(taskpool.batches("digits", "val"))
    x_parity, y_parity = _concat(taskpool.batches("parity", "val"))
    x_rot, _ = _concat(taskpool.batches("rot90", "val"))
    assert torch.equal(x_parity, x_digits)  # same images
    assert torch.equal(y_parity, y_digits % 2)  # parity labels of the same digits
    assert not torch.equal(x_rot, x_digits)
    assert torch.equal(x_rot.view(-1, 8, 8), torch.rot90(x_digits.view(-1, 8, 8), 1, (1, 2)))


def test_digits_val_honours_limit(digits_pools):
    _, taskpool = digits_pools
    full_x, full_y = _concat(taskpool.batches("mirror", "val"))
    x, y = _concat(taskpool.batches("mirror", "val", batch_size=7, limit=20))
    assert torch.equal(x, full_x[:20]) and torch.equal(y, full_y[:20])
