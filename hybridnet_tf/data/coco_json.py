"""COCO `instances_*.json` annotations + an image folder -> `LabeledImages`.

An image's labels are the categories of its object annotations; boxes and
masks are not used.

Conventions (the same as the multi-label COCO loaders of ASL, Query2Label
and torchvision's `CocoDetection`, so that scores are comparable):

- **Category order**: contiguous indices in ascending category id (1..90
  with gaps -> 0..79), the standard COCO-80 order, which is also the order of
  `COCO_CLASS_NAMES` and of the TFDS `coco` labels.
- **Crowd annotations count** (`include_crowd=True`): an `iscrowd=1` region
  marks a group of objects of that category that is really in the image, so
  it is a true image-level label (ASL & co. read every annotation of an
  image). In real COCO a crowd region almost always sits beside separate
  instances of the same category (all 10 in coco128 do), so the choice
  rarely changes a label.
- **Images without labels are dropped** (`keep_empty=False`), as ASL does;
  `keep_empty=True` keeps them as all-negative examples.
"""

import contextlib
import io
import json
import logging
import os

import numpy as np

from hybridnet_tf.data.labeled_images import LabeledImages
from hybridnet_tf.vocabulary import LabelVocabulary

logger = logging.getLogger(__name__)

MISSING_FILE_POLICIES = ("error", "skip")


def load_coco_json(
    annotation_file,
    image_dir,
    include_crowd=True,
    keep_empty=False,
    vocabulary=None,
    missing_files="error",
):
    """Reads a COCO instances annotation file as multi-label examples.

    Args:
        annotation_file: path of a COCO `instances_*.json` file.
        image_dir: folder holding the images named by its `file_name` fields.
        include_crowd: whether `iscrowd=1` annotations give labels (default
            True, the field's convention; see the module docstring).
        keep_empty: keep images with no (used) annotation as all-negative
            examples; by default they are dropped.
        vocabulary: a `LabelVocabulary` to map onto, usually the train split's
            (pass it when loading val/test so both share columns). Categories
            are matched by name; a category unknown to it is logged as a
            warning and its annotations ignored. Without it, the vocabulary is
            built from this file's categories in ascending id order, with
            `source_ids` = the category ids and `frequencies` counted on the
            returned images. A passed vocabulary is returned unchanged (its
            train frequencies are kept).
        missing_files: what to do about listed images absent from `image_dir`:
            "error" (raise `FileNotFoundError`) or "skip" (drop them, warning).

    Returns:
        `LabeledImages` with absolute paths, in ascending image id order.

    Example:
        >>> train = load_coco_json("annotations/instances_train2017.json", "train2017")
        >>> val = load_coco_json("annotations/instances_val2017.json", "val2017",
        ...                      vocabulary=train.vocabulary)
    """
    if missing_files not in MISSING_FILE_POLICIES:
        raise ValueError(
            f"unknown missing_files={missing_files!r}; choose one of {list(MISSING_FILE_POLICIES)}"
        )
    annotation_file = os.fspath(annotation_file)
    image_dir = os.path.abspath(os.fspath(image_dir))
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder {image_dir} (for {annotation_file}) not found")
    coco = _read_coco(annotation_file)
    categories = sorted(coco.cats.values(), key=lambda c: c["id"])

    count_frequencies = vocabulary is None
    if vocabulary is None:
        vocabulary = LabelVocabulary(
            [c["name"] for c in categories], source_ids=[c["id"] for c in categories]
        )
        column_of = {c["id"]: i for i, c in enumerate(categories)}
    else:
        column_of = _columns_in_vocabulary(categories, vocabulary, annotation_file)

    image_ids = sorted(coco.imgs)
    labels = np.zeros((len(image_ids), len(vocabulary)), dtype=np.float32)
    num_crowd = 0
    unmapped = {}  # category id -> number of annotations ignored
    for row, image_id in enumerate(image_ids):
        for annotation in coco.imgToAnns.get(image_id, ()):
            if annotation.get("iscrowd", 0):
                num_crowd += 1
                if not include_crowd:
                    continue
            column = column_of.get(annotation["category_id"])
            if column is None:
                unmapped[annotation["category_id"]] = unmapped.get(annotation["category_id"], 0) + 1
                continue
            labels[row, column] = 1.0
    _report_unmapped(unmapped, coco.cats, annotation_file)

    keep = np.ones(len(image_ids), dtype=bool) if keep_empty else labels.any(axis=1)
    paths = [
        os.path.join(image_dir, coco.imgs[image_ids[row]]["file_name"])
        for row in np.flatnonzero(keep)
    ]
    labels = labels[keep]
    num_empty_dropped = len(image_ids) - len(paths)

    present = _check_files(paths, missing_files, annotation_file, image_dir)
    paths = [p for p, ok in zip(paths, present) if ok]
    labels = labels[present]
    if not paths:
        raise ValueError(
            f"no labelled images in {annotation_file} ({len(image_ids)} images, "
            f"{num_empty_dropped} without labels); for a test split without "
            "annotations pass keep_empty=True"
        )
    if count_frequencies:
        vocabulary = vocabulary.with_frequencies(labels)
    logger.info(
        "%s: %d images, %d labels; %d crowd annotations %s; %d images without labels %s",
        annotation_file,
        len(paths),
        len(vocabulary),
        num_crowd,
        "used" if include_crowd else "ignored",
        num_empty_dropped if not keep_empty else int((~labels.any(axis=1)).sum()),
        "kept" if keep_empty else "dropped",
    )
    return LabeledImages(paths, labels, vocabulary)


def _read_coco(annotation_file):
    """Reads the JSON with clear errors, then indexes it with pycocotools (quietly)."""
    from pycocotools.coco import COCO

    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file {annotation_file} not found")
    try:
        with open(annotation_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"COCO annotation file {annotation_file} is not valid JSON: {e}"
        ) from None
    if not isinstance(data, dict) or not {"images", "categories"} <= data.keys():
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{annotation_file} is not a COCO instances file: it needs 'images' and "
            f"'categories' (and 'annotations'); found {found}"
        )
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"malformed COCO annotation file {annotation_file}: an image, category or "
            f"annotation entry lacks the field {e}"
        ) from None
    return coco


def _columns_in_vocabulary(categories, vocabulary, annotation_file):
    """Maps category id -> column of `vocabulary`, matching by name.

    Names, not ids, decide: a file whose ids were renumbered must not be
    silently mislabelled. Id disagreements are logged.
    """
    column_of_name = {name: i for i, name in enumerate(vocabulary.names)}
    column_of = {}
    id_mismatches = []
    for category in categories:
        column = column_of_name.get(category["name"])
        if column is None:
            continue
        column_of[category["id"]] = column
        if vocabulary.source_ids is not None and vocabulary.source_ids[column] != category["id"]:
            id_mismatches.append(
                f"{category['name']!r}: {category['id']} vs {vocabulary.source_ids[column]}"
            )
    if id_mismatches:
        logger.warning(
            "%s: %d categories have other ids than in the vocabulary (mapped by name): %s",
            annotation_file,
            len(id_mismatches),
            ", ".join(id_mismatches[:10]),
        )
    return column_of


def _report_unmapped(unmapped, categories_by_id, annotation_file):
    if not unmapped:
        return
    names = [
        categories_by_id[i]["name"] if i in categories_by_id else f"<undefined id {i}>"
        for i in sorted(unmapped)
    ]
    logger.warning(
        "%s: %d categories unknown to the vocabulary (%d annotations ignored): %s",
        annotation_file,
        len(unmapped),
        sum(unmapped.values()),
        ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""),
    )


def _check_files(paths, missing_files, annotation_file, image_dir):
    """Returns a bool array: which paths exist; raises or warns about the others."""
    present = np.array([os.path.isfile(p) for p in paths], dtype=bool)
    missing = [p for p, ok in zip(paths, present) if not ok]
    if not missing:
        return present
    if missing_files == "error":
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {annotation_file} are "
            f"missing from {image_dir}, e.g. {missing[:5]}; pass missing_files='skip' "
            "to drop them"
        )
    logger.warning(
        "%s: skipping %d of %d images missing from %s, e.g. %s",
        annotation_file,
        len(missing),
        len(paths),
        image_dir,
        [os.path.basename(p) for p in missing[:5]],
    )
    return present
