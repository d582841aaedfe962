"""A fast pre-training check for image files that `tf.io.decode_image` would fail on.

Only the first 32 and the last 16 bytes of each file are read, so a data
set of 100k images is checked in seconds. It catches what is common in
scraped or copied data sets: missing and zero-byte files, files that are no
image at all (an HTML error page saved as .jpg), and JPEG/PNG files cut off
by an interrupted download. A file that fails these quick rules is decoded
by TensorFlow before it is rejected, so every file TF decodes is accepted
(a JPEG with bytes after its end marker, a JPEG XL file). It does not prove
that a file decodes: damage in the middle of a file is only found by decoding it.
"""

import concurrent.futures
import os

_HEAD_BYTES = 32
# Real JPEGs may carry a few padding bytes after their end-of-image marker.
_TAIL_BYTES = 16
_PROGRESS_BAR_FROM = 5000

_JPEG = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND"
_GIF = (b"GIF87a", b"GIF89a")
_BMP = b"BM"
_RIFF, _WEBP = b"RIFF", b"WEBP"


def find_unreadable_images(paths, num_threads=8):
    """Returns the files among `paths` that cannot be decoded as images, with why.

    Accepts what `tf.io.decode_image` reads: JPEG, PNG, GIF, BMP, WebP (and
    whatever else TF decodes), told apart by their content, not their name
    (PNG data in a .jpg file is fine, as decode_image sniffs the format).
    A file that breaks the quick rules is decoded with TF before it is
    reported. Shows a tqdm progress bar for more than 5000 files.

    Args:
        paths: image file paths.
        num_threads: files checked in parallel (the work is I/O bound).

    Returns:
        A list of `(path, reason)` in the order of `paths`, e.g.
        `("a.jpg", "truncated JPEG: no end-of-image marker (FFD9); TensorFlow cannot decode it")`.
        Empty when every file looks whole.

    Example:
        >>> bad = find_unreadable_images(images.paths)
        >>> images = images.subset([i for i, p in enumerate(images.paths)
        ...                         if p not in dict(bad)])
    """
    paths = [os.fspath(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        reasons = pool.map(_problem_with, paths)
        if len(paths) > _PROGRESS_BAR_FROM:
            from tqdm import tqdm

            reasons = tqdm(reasons, total=len(paths), desc="checking images", unit="file")
        reasons = list(reasons)
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def _problem_with(path):
    """Why `path` is not an image TF decodes, or None when it is (or looks) fine."""
    problem = _quick_problem(path)
    if problem is None or problem in _NOT_A_FILE:
        return problem
    return None if _tf_decodes(path) else f"{problem}; TensorFlow cannot decode it"


_NOT_A_FILE = ("empty file (0 bytes)", "missing file", "a directory, not a file")


def _tf_decodes(path):
    """Whether `tf.io.decode_image` decodes the file (the rare files the quick rules doubt)."""
    import tensorflow as tf

    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError):
        return False
    return True


def _quick_problem(path):
    """Why `path` does not look like a whole image file from its head and tail, or None."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "empty file (0 bytes)"
            head = f.read(_HEAD_BYTES)
            if size > _HEAD_BYTES:
                f.seek(max(size - _TAIL_BYTES, 0))
                tail = f.read(_TAIL_BYTES)
            else:
                tail = head[-_TAIL_BYTES:]
    except FileNotFoundError:
        return "missing file"
    except IsADirectoryError:
        return "a directory, not a file"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"

    if head.startswith(_JPEG):
        if _JPEG_END not in tail:
            return "truncated JPEG: no end-of-image marker (FFD9)"
        return None
    if head.startswith(_PNG):
        if _PNG_END not in tail:
            return f"truncated PNG: no IEND chunk in its last {_TAIL_BYTES} bytes"
        return None
    if head.startswith(_GIF) or head.startswith(_BMP):
        return None
    if head[:4] == _RIFF and head[8:12] == _WEBP:
        # The RIFF header holds the size of the rest of the file.
        if int.from_bytes(head[4:8], "little") + 8 > size:
            return "truncated WebP: shorter than its RIFF header says"
        return None
    return f"not an image tf.io.decode_image reads: {_describe(head)}"


def _describe(head):
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIF/AVIF"
    text = head.lstrip()
    if text[:1] in (b"<", b"{", b"[") or all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"text starting {head[:20]!r}"
    return f"unknown signature {head[:8].hex(' ')}"
