"""load_tfds_coco with tfds.testing.mock_data (offline, no prepared data)."""

import tempfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from hybridnet_tf.data.coco_classes import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from hybridnet_tf.data.tfds_coco import count_label_frequencies, load_tfds_coco

# Realistic examples: mock_data's own random COCO examples cannot be read
# with a decoder (its random `objects` sub-features get different lengths),
# and their labels are random. (labels, is_crowd) per image:
EXAMPLES = [
    ([0, 0, 0, 56], [False, False, True, False]),  # person x3 (one crowd), chair
    ([79], [False]),  # toothbrush, the last index
    ([], []),  # an image without annotations
    ([16, 2], [True, False]),  # dog only as a crowd region, car
]


def _fake_as_dataset(requested):
    """An `as_dataset_fn` for mock_data: EXAMPLES with small real JPEGs."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        requested.append((self.name, split, decoders))

        def examples():
            rng = np.random.default_rng(0)
            for i, (labels, is_crowd) in enumerate(EXAMPLES):
                pixels = rng.integers(0, 255, (8 + i, 10, 3), dtype=np.uint8)
                yield {
                    "image": tf.io.encode_jpeg(pixels).numpy(),
                    "image/id": i,
                    "objects": {
                        "label": np.array(labels, np.int64),
                        "is_crowd": np.array(is_crowd, bool),
                    },
                }

        signature = {
            "image": tf.TensorSpec([], tf.string),
            "image/id": tf.TensorSpec([], tf.int64),
            "objects": {
                "label": tf.TensorSpec([None], tf.int64),
                "is_crowd": tf.TensorSpec([None], tf.bool),
            },
        }
        return tf.data.Dataset.from_generator(examples, output_signature=signature)

    return as_dataset


def _multi_hot(indices):
    row = np.zeros(80, np.float32)
    row[list(indices)] = 1
    return row


@pytest.mark.parametrize("name", ["coco/2014", "coco/2017"])
def test_mocked_coco_gives_bytes_and_multi_hot(name):
    requested = []
    fake = _fake_as_dataset(requested)
    with tfds.testing.mock_data(num_examples=len(EXAMPLES), as_dataset_fn=fake):
        dataset, vocabulary = load_tfds_coco(name, split="validation")
        elements = list(dataset.as_numpy_iterator())
    assert requested[0][:2] == ("coco", "validation")
    assert isinstance(requested[0][2]["image"], tfds.decode.SkipDecoding)
    assert dataset.element_spec[0].dtype == tf.string
    assert dataset.element_spec[1].shape == (80,) and dataset.element_spec[1].dtype == tf.float32
    # Mocked builders name the classes '0'..'79'; the project's names are used instead.
    assert vocabulary.names == list(COCO_CLASS_NAMES)
    assert vocabulary.source_ids == list(COCO_CATEGORY_IDS)
    assert len(elements) == 3  # the image without labels is dropped
    for (image, multi_hot), expected in zip(elements, [{0, 56}, {79}, {2, 16}]):
        np.testing.assert_array_equal(multi_hot, _multi_hot(expected))  # duplicates collapse
        assert image[:2] == b"\xff\xd8"  # still an encoded JPEG
    decoded = tf.io.decode_image(elements[1][0], channels=3, expand_animations=False)
    assert decoded.shape == (9, 10, 3)


def test_crowd_and_empty_options():
    with tfds.testing.mock_data(num_examples=len(EXAMPLES), as_dataset_fn=_fake_as_dataset([])):
        dataset, _ = load_tfds_coco("coco/2017", include_crowd=False, keep_empty=True)
        labels = np.stack([y for _, y in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(
        labels, [_multi_hot({0, 56}), _multi_hot({79}), _multi_hot(()), _multi_hot({2})]
    )


def test_count_label_frequencies():
    with tfds.testing.mock_data(num_examples=len(EXAMPLES), as_dataset_fn=_fake_as_dataset([])):
        dataset, vocabulary = load_tfds_coco("coco/2017", keep_empty=True)
        counts = count_label_frequencies(dataset, len(vocabulary))
        batched_counts = count_label_frequencies(dataset.batch(3), len(vocabulary))
        first_two = count_label_frequencies(dataset, len(vocabulary), max_examples=2)
    expected = np.zeros(80, int)
    expected[[0, 56, 79, 16, 2]] = 1
    assert counts == expected.tolist() == batched_counts
    assert sum(first_two) == 3 and first_two[79] == 1 and first_two[2] == 0


def test_unprepared_data_gives_a_clear_error(tmp_path, monkeypatch):
    # TFDS' own temporary folder (see tfds_builder) goes to a folder of this test's.
    temp_root = tmp_path / "temp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    expected = r"coco/2017 is not prepared.*download=True.*manual_dir"
    with pytest.raises(FileNotFoundError, match=expected):
        load_tfds_coco("coco/2017", data_dir=str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()  # nothing downloaded or written
    assert list(temp_root.iterdir()) == []  # no tmp*tfds folder left behind
    assert tempfile.gettempdir() == str(temp_root)


def test_unknown_name():
    with pytest.raises(ValueError, match="coco/2014"):
        load_tfds_coco("coco/2017_panoptic")
