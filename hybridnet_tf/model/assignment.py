"""Exact minimum-cost assignment of small square cost matrices, inside the graph.

PLA (Yazici et al., CVPR 2020) assigns the labels a decoder missed to its
free steps by minimum cost, which the paper does with the Hungarian
algorithm on the CPU. A decoder has at most `max_length - 1` label steps
(5 by default), so an exact dynamic programme over subsets, O(m 2^m), is
cheap, and written with gathers and reductions it stays in the TF graph:
it runs under `jit_compile` (XLA) and on TPU, where `tf.numpy_function`
around SciPy's `linear_sum_assignment` could not.
"""

import itertools

import numpy as np
import tensorflow as tf

# Above any real cost (a sum of at most m negative log-probabilities of
# float32 softmax outputs) and finite, so sums of it never overflow.
_IMPOSSIBLE = 1e7


def _tables(size):
    """Static tables of the subset DP, level by level.

    Level k holds the subsets of k columns (assigned to rows 0..k-1). For
    each subset of level k and each column j, `previous[k][s, j]` is the
    position in level k-1 of the subset without j, or the sentinel
    position `len(level k-1)` when j is not in the subset.
    """
    levels = [[0]]
    previous = [None]
    for k in range(1, size + 1):
        masks = [sum(1 << j for j in columns) for columns in itertools.combinations(range(size), k)]
        position = {mask: index for index, mask in enumerate(levels[-1])}
        sentinel = len(levels[-1])
        table = np.full((len(masks), size), sentinel, np.int32)
        for row, mask in enumerate(masks):
            for j in range(size):
                if mask >> j & 1:
                    table[row, j] = position[mask ^ (1 << j)]
        levels.append(masks)
        previous.append(table)
    return previous


def min_cost_assignment(cost):
    """The assignment of rows to columns with the least total cost, for each matrix of a batch.

    Args:
        cost: [B, m, m] float costs (m static, up to about 12); row i
            assigned to column j costs `cost[b, i, j]`. They must be finite
            and well below `m * 1e7` in size: an argmin over NaN gives an
            out-of-range index on CPU inside a graph, and the padding of the
            subset table costs `2 * m * 1e7`. Callers map NaN or infinite
            costs to a large finite value first (as `predicted_label_alignment`
            does).

    Returns:
        [B, m] int32: the column of each row (a permutation of 0..m-1).

    Example:
        >>> min_cost_assignment([[[4.0, 1.0], [2.0, 8.0]]]).numpy()
        array([[1, 0]], dtype=int32)
    """
    cost = tf.convert_to_tensor(cost, tf.float32)
    size = cost.shape[-1]
    if size is None or cost.shape[-2] != size:
        raise ValueError(f"min_cost_assignment needs static square [B, m, m] costs, got {cost.shape}")
    batch = tf.shape(cost)[0]
    previous = _tables(size)
    best = tf.zeros([batch, 1])  # level 0: the empty subset costs nothing
    choices = [None]
    for k in range(1, size + 1):
        padded = tf.concat([best, tf.fill([batch, 1], 2 * size * _IMPOSSIBLE)], axis=1)
        table = previous[k]
        # candidates[b, s, j]: subset s of level k with column j on row k-1.
        candidates = tf.gather(padded, table, axis=1) + cost[:, k - 1, None, :]
        best = tf.reduce_min(candidates, axis=-1)
        choices.append(tf.cast(tf.math.argmin(candidates, axis=-1), tf.int32))
    position = tf.zeros([batch], tf.int32)
    columns = [None] * size
    for k in range(size, 0, -1):  # walk back from the full subset
        column = tf.gather(choices[k], position[:, None], batch_dims=1)[:, 0]
        columns[k - 1] = column
        position = tf.gather_nd(previous[k], tf.stack([position, column], axis=-1))
    return tf.stack(columns, axis=1)
