"""Your own images -> `LabeledImages`: a folder per label set, or a CSV of path,labels.

Both sources name labels by strings. Without a `vocabulary` the label
columns are the sorted label names of this split. Every split must share
one vocabulary: build it from train and pass `vocabulary=train.vocabulary`
for val/test. Labels unknown to it are reported (a warning with counts) and
dropped from those examples, never given new columns.
"""

import collections
import csv
import logging
import os

import numpy as np

from hybridnet_tf.data.labeled_images import LabeledImages
from hybridnet_tf.vocabulary import LabelVocabulary

logger = logging.getLogger(__name__)

# What `tf.io.decode_image` reads (WebP and TIFF are not among them).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def load_folder(root, label_separator="_", vocabulary=None):
    """Reads `root/<label>_<label>.../<image>` folders as multi-label examples.

    Each sub-folder's name, split at `label_separator`, gives the labels of
    the images directly inside it: `black_jeans/1.jpg` is {black, jeans}.
    Images are files with a .jpg/.jpeg/.png/.bmp/.gif extension in any case;
    other and hidden files are ignored.

    Args:
        root: folder holding one sub-folder per label combination.
        label_separator: what separates labels in a folder name.
        vocabulary: a `LabelVocabulary` to map onto (usually the train
            split's); default: the sorted label names found here.

    Returns:
        `LabeledImages` with absolute paths, sorted by folder then file name.

    Example:
        >>> train = load_folder("clothes/train")
        >>> val = load_folder("clothes/val", vocabulary=train.vocabulary)
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} not found")
    folders = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not folders:
        raise ValueError(
            f"{root} has no sub-folders; put the images of each label set in a folder "
            f"named after its labels, e.g. {root}/black{label_separator}jeans/"
        )
    paths, label_sets = [], []
    for folder in folders:
        labels = _split_labels(folder, label_separator)
        files = sorted(
            entry.name
            for entry in os.scandir(os.path.join(root, folder))
            if entry.is_file() and not entry.name.startswith(".")
        )
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise ValueError(
                f"folder {os.path.join(root, folder)} holds no images ({len(files)} other "
                f"files); images must end in one of {list(IMAGE_EXTENSIONS)}. Add images "
                "or remove the folder."
            )
        paths += [os.path.join(root, folder, f) for f in images]
        label_sets += [labels] * len(images)
    return _labeled_images(paths, label_sets, vocabulary, source=root)


def load_csv(
    csv_path,
    image_root=None,
    label_separator=" ",
    path_column="path",
    labels_column="labels",
    vocabulary=None,
):
    """Reads a CSV with a header and one row per image: path, labels.

    Example file (labels separated by spaces; an empty labels cell is an
    image with no label, kept as an all-negative example)::

        path,labels
        shirts/001.jpg,blue shirt
        jeans/002.jpg,black jeans

    Args:
        csv_path: the CSV file (UTF-8; a byte-order mark is accepted).
        image_root: folder that relative paths are resolved against;
            default: the CSV's folder.
        label_separator: what separates labels within the labels cell.
        path_column: name of the column holding image paths.
        labels_column: name of the column holding labels.
        vocabulary: a `LabelVocabulary` to map onto (usually the train
            split's); default: the sorted label names found here.

    Returns:
        `LabeledImages` with absolute paths, in file order.
    """
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file {csv_path} not found")
    image_root = os.path.abspath(
        os.fspath(image_root) if image_root is not None else os.path.dirname(csv_path)
    )
    paths, label_sets, line_of_path = [], [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [name.strip() for name in next(reader, [])]
            missing_columns = [c for c in (path_column, labels_column) if c not in header]
            if missing_columns:
                raise ValueError(
                    f"{csv_path}, line 1: the header {header} lacks the column(s) "
                    f"{missing_columns}; set path_column= and labels_column= to the names used"
                )
            path_index, labels_index = header.index(path_column), header.index(labels_column)
            for row in reader:
                line = reader.line_num
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"{csv_path}, line {line}: expected {len(header)} fields "
                        f"({','.join(header)}), found {len(row)}; quote cells that hold "
                        "the delimiter"
                    )
                path = row[path_index].strip()
                if not path:
                    raise ValueError(f"{csv_path}, line {line}: empty {path_column!r} cell")
                # An absolute path stays as it is.
                paths.append(os.path.normpath(os.path.join(image_root, path)))
                label_sets.append(_split_labels(row[labels_index], label_separator))
                line_of_path.append(line)
        except csv.Error as e:
            raise ValueError(f"{csv_path}, line {reader.line_num}: {e}") from None
        except UnicodeDecodeError:
            raise ValueError(
                f"{csv_path}, line {reader.line_num + 1}: not UTF-8 text; save the CSV as UTF-8"
            ) from None
    if not paths:
        raise ValueError(f"{csv_path} has a header but no rows")
    missing = [(line, p) for line, p in zip(line_of_path, paths) if not os.path.isfile(p)]
    if missing:
        examples = "; ".join(f"line {line}: {p}" for line, p in missing[:5])
        raise FileNotFoundError(
            f"{csv_path}: {len(missing)} of {len(paths)} image files not found "
            f"(relative paths are resolved against {image_root}), e.g. {examples}"
        )
    return _labeled_images(paths, label_sets, vocabulary, source=csv_path)


def _split_labels(text, separator):
    return sorted({label.strip() for label in text.split(separator) if label.strip()})


def _labeled_images(paths, label_sets, vocabulary, source):
    """Multi-hot rows for `label_sets` in `vocabulary` (built from them when None)."""
    count_frequencies = vocabulary is None
    if vocabulary is None:
        vocabulary = LabelVocabulary(sorted({label for labels in label_sets for label in labels}))
    column_of = {name: i for i, name in enumerate(vocabulary.names)}
    labels = np.zeros((len(paths), len(vocabulary)), dtype=np.float32)
    unknown = collections.Counter()
    for row, names in enumerate(label_sets):
        for name in names:
            if name in column_of:
                labels[row, column_of[name]] = 1.0
            else:
                unknown[name] += 1
    if unknown:
        emptied = sum(1 for names, y in zip(label_sets, labels) if names and not y.any())
        logger.warning(
            "%s: %d labels unknown to the vocabulary were dropped (images per label: %s); "
            "%d images are left without any label",
            source,
            len(unknown),
            ", ".join(f"{name}: {n}" for name, n in unknown.most_common(20)),
            emptied,
        )
    if count_frequencies:
        vocabulary = vocabulary.with_frequencies(labels)
    return LabeledImages(paths, labels, vocabulary)
