"""Which units each step trains on: seeded, resumable orders."""
from kto_cli.sampling import batch_indices, data_order, epoch_permutation, length_grouped, visited_indices


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(240)]
    order = length_grouped(lengths, batch_size=4, span=8)
    assert sorted(order(240, 0, 0)) == list(range(240))
    assert length_grouped(lengths, batch_size=4, span=8)(240, 0, 0) == order(240, 0, 0)  # rebuilt: the same order
    assert order(240, 0, 1) != order(240, 0, 0) and order(240, 1, 0) != order(240, 0, 0)

    def padding(fn):
        batches = [batch_indices(s, 240, 4, 0, fn) for s in range(60)]
        return sum(max(lengths[i] for i in b) * 4 - sum(lengths[i] for i in b) for b in batches)
    assert padding(order) < padding(epoch_permutation) / 4


def test_unshuffled_order_is_data_order():
    assert [batch_indices(s, 10, 4, 0, data_order) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_visited_indices_are_the_first_steps_units():
    """3 steps of 4 over 20 units visit exactly the first 12 of epoch 0's order; a run longer than
    an epoch visits everything."""
    assert visited_indices(3, 20, 4, 0) == sorted(epoch_permutation(20, 0, 0)[:12])
    assert visited_indices(6, 20, 4, 0) == list(range(20))
