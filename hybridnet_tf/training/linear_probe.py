"""A linear probe of backbone features with scikit-learn, and the heads set from it.

The first stage of LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution", ICLR 2022): fit the linear
head to convergence on frozen features before anything else trains. On a
few hundred photos a logistic regression with its L2 strength chosen by
cross-validation ranks labels better than a sigmoid head trained by
AdamW on the same features (coco128, 5 folds: 53.2 mAP against at most
45.9 over the settings tried; docs/real_data.md),
and scikit-learn solves it in seconds.

One `LogisticRegression` per label on standardised features; one C for all
labels, chosen by 3-fold cross-validated mAP. A label that never occurs (or
always occurs) in the training images gets a constant score.

The fits run with BLAS held to one thread (`threadpoolctl`, a scikit-learn
dependency). scikit-learn's lbfgs loss runs its own OpenMP threads, and
OpenBLAS's threads beside them oversubscribe the cores (scikit-learn issue
32162). On 2 cores that made the probe 17x slower on 1000 photos and 5x on
3000, with the same kernel; on coco128's 126 it made no difference
(`scripts/benchmark_linear_probe.py`, docs/performance.md).
"""

import numpy as np

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
# The logit of a label absent from the training images: p = 4.5e-5.
ABSENT_LOGIT = -10.0


class LinearProbe:
    """Per-label logistic regression on standardised features.

    Attributes:
        kernel: [D, L] float32, on raw (unstandardised) features.
        bias: [L] float32.
        c: the L2 strength chosen (scikit-learn's inverse C).
    """

    def __init__(self, kernel, bias, c):
        self.kernel = kernel
        self.bias = bias
        self.c = c

    def logits(self, features):
        return np.asarray(features, np.float32) @ self.kernel + self.bias

    def scores(self, features):
        """Probabilities [N, L]."""
        from scipy.special import expit

        # 1 / (1 + exp(-x)) overflows (with a RuntimeWarning) where a large C gives logits below -88.
        return expit(self.logits(features))


def _fit(features, labels, c):
    """Kernel and bias on raw features (the standardisation folded in)."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-6] = 1.0
    standardised = (features - mean) / scale
    num_labels = labels.shape[1]
    kernel = np.zeros((features.shape[1], num_labels), np.float32)
    bias = np.zeros(num_labels, np.float32)
    for column in range(num_labels):
        y = labels[:, column]
        if y.min() == y.max():
            bias[column] = -ABSENT_LOGIT if y[0] > 0 else ABSENT_LOGIT
            continue
        model = LogisticRegression(C=c, max_iter=2000).fit(standardised, y)
        weights = model.coef_[0] / scale
        kernel[:, column] = weights
        bias[column] = model.intercept_[0] - float(weights @ mean)
    return kernel, bias


def fit_linear_probe(features, labels, seed=0, c_grid=C_GRID, max_search_examples=5000, blas_threads=1,
                     progress=False):
    """Fits a `LinearProbe`, its C chosen by 3-fold cross-validated mAP.

    Args:
        features: [N, D] pooled backbone features.
        labels: [N, L] multi-hot.
        seed: seed of the cross-validation folds (and of the subsample).
        c_grid: the C values tried.
        max_search_examples: the C search runs on a seeded subsample of at
            most this many examples (the final fit uses all).
        blas_threads: BLAS threads during the fits (see the module docstring);
            None leaves BLAS as it is.
        progress: show a progress bar over the fits (each of all labels).

    Returns:
        A `LinearProbe`.
    """
    from threadpoolctl import threadpool_limits

    from hybridnet_tf.console import progress_bar

    # Too few examples for 3 folds, or one C: the final fit alone.
    c_grid = c_grid if len(features) >= 6 else c_grid[:1]
    bar = progress_bar(3 * len(c_grid) * (len(c_grid) > 1) + 1, unit_name="fit") if progress else None
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _search_and_fit(features, labels, seed, c_grid, max_search_examples, bar)


def _search_and_fit(features, labels, seed, c_grid, max_search_examples, bar=None):
    """`fit_linear_probe`'s C search by 3-fold CV mAP (when `c_grid` has several values) and its
    final fit, under the caller's BLAS limit; `bar` (a progress bar or None) advances once per fit
    of all labels."""
    from sklearn.model_selection import KFold

    from hybridnet_tf.evaluation.metrics import mean_average_precision

    features = np.asarray(features, np.float64)
    labels = (np.asarray(labels) > 0).astype(np.int64)
    rng = np.random.default_rng(seed)
    search = np.arange(len(features))
    if len(search) > max_search_examples:
        search = rng.choice(search, max_search_examples, replace=False)
    best_c, best_map = c_grid[0], -1.0
    if len(c_grid) > 1:
        folds = list(KFold(3, shuffle=True, random_state=seed).split(search))
        for c in c_grid:
            maps = []
            for fit_rows, test_rows in folds:
                fit_rows, test_rows = search[fit_rows], search[test_rows]
                probe = LinearProbe(*_fit(features[fit_rows], labels[fit_rows], c), c)
                mean_ap, _ = mean_average_precision(labels[test_rows], probe.scores(features[test_rows]))
                maps.append(mean_ap)
                if bar is not None:
                    bar.add(1)
            if np.nanmean(maps) > best_map:
                best_c, best_map = c, float(np.nanmean(maps))
    probe = LinearProbe(*_fit(features, labels, best_c), best_c)
    if bar is not None:
        bar.add(1)
    return probe


def set_sigmoid_head(model, probe):
    """Copies a `LinearProbe` into the sigmoid head of a HybridNet (`bce` or `hybrid`)."""
    from hybridnet_tf.model.hybridnet import SIGMOID_HEAD

    dense = model.get_layer(SIGMOID_HEAD).dense
    dense.kernel.assign(probe.kernel.astype(dense.kernel.dtype))
    dense.bias.assign(probe.bias.astype(dense.bias.dtype))


def set_decoder_image_logits(model, probe):
    """Copies a `LinearProbe` into the label decoder's `image_to_labels` (decoder `image_logits`);
    into every member's of a decoder ensemble."""
    from hybridnet_tf.model.decoder_ensemble import decoder_members
    from hybridnet_tf.model.hybridnet import LABEL_DECODER

    for decoder in decoder_members(model.get_layer(LABEL_DECODER)):
        dense = decoder.image_to_labels
        dense.kernel.assign(probe.kernel.astype(dense.kernel.dtype))
        dense.bias.assign(probe.bias.astype(dense.bias.dtype))
