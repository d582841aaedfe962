"""The built-in demo data set: synthetic scenes written as a real COCO data set.

`write_demo_dataset(out_dir)` draws small images of coloured shapes over
cluttered backgrounds and writes them with COCO "instances" annotations, so
the whole pipeline (COCO loader -> tf.data -> CNN-RNN) can be tried in a few
minutes on a CPU without downloading anything.

Each of the 14 classes is one shape in one colour (two also carry a texture),
e.g. `red_circle`, `striped_bar`, `pink_checker`. Category ids run 1..16 with
gaps at 4 and 11, as real COCO's ids have gaps.

How a label set is sampled (`sample_label_set`), so the labels carry
dependencies a label-sequence decoder can learn:

1. Pick 0, 1 or 2 scene templates (probabilities 0.25 / 0.55 / 0.2, weighted
   choice without replacement). A template brings a correlated group; each
   member is kept with its own probability, topped up to the template's
   minimum size:

   - "dinner": red_circle (0.85), blue_square (0.97), at least 1.
     blue_square appears nowhere else, so P(blue_square | red_circle) ~ 0.97
     while P(red_circle | blue_square) ~ 0.85 (an asymmetric fork -> knife).
   - "garden": green_triangle, yellow_star, orange_cross (0.85 each), at
     least 2: a triple that comes together.
   - "night": white_crescent, cyan_diamond (0.9 each), at least 1.

   A template is only chosen if none of its members is excluded by a member
   of an already chosen template, so "garden" and "night" never meet.
2. Add 0-3 independent extras (probabilities 0.4 / 0.4 / 0.15 / 0.05) from
   purple_ring, magenta_hexagon, black_hourglass, brown_arrow, pink_checker,
   striped_bar, lime_pentagon (weighted, without replacement), skipping any
   extra excluded by a label already present, up to 5 labels in all. An
   empty set gets one extra, so every image has 1-5 distinct labels.
3. Mutually exclusive pairs (never in one image): purple_ring / magenta_hexagon
   (two independent classes), yellow_star / white_crescent (day vs night
   templates), red_circle / brown_arrow (a template member vs an extra).

Each label is drawn once, or twice with probability 0.25 (at most 6 objects),
so instance counts differ from label counts.

Everything is seeded per image: image `i` of a split uses
`default_rng([seed, split_code, i, stream])`, so the same seed gives
byte-identical files and the size of one split never changes the other's
content.
"""

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

SPLIT_CODES = {"train": 0, "val": 1}
_LABEL_STREAM, _RENDER_STREAM = 0, 1
_SUPERSAMPLE = 2  # draw at 2x and box-downsample: smooth edges at tiny sizes
_FIXED_DATE = "2024/01/01"

# (category id, name, supercategory, RGB colour, second RGB colour for textures)
DEMO_CATEGORIES = (
    (1, "red_circle", "round", (220, 30, 30), None),
    (2, "blue_square", "polygon", (30, 70, 225), None),
    (3, "green_triangle", "polygon", (20, 150, 40), None),
    (5, "yellow_star", "symbol", (250, 215, 0), None),
    (6, "orange_cross", "symbol", (255, 125, 0), None),
    (7, "purple_ring", "round", (125, 35, 190), None),
    (8, "cyan_diamond", "polygon", (0, 215, 225), None),
    (9, "magenta_hexagon", "polygon", (235, 0, 180), None),
    (10, "white_crescent", "round", (248, 248, 248), None),
    (12, "black_hourglass", "symbol", (12, 12, 12), None),
    (13, "brown_arrow", "symbol", (135, 75, 25), None),
    (14, "pink_checker", "textured", (255, 150, 200), (105, 15, 55)),
    (15, "striped_bar", "textured", (250, 250, 250), (10, 10, 10)),
    (16, "lime_pentagon", "polygon", (170, 245, 50), None),
)
DEMO_CLASS_NAMES = tuple(name for _, name, *_ in DEMO_CATEGORIES)

# name -> (members with keep probability, minimum members, template weight)
SCENE_TEMPLATES = {
    "dinner": ((("red_circle", 0.85), ("blue_square", 0.97)), 1, 1.0),
    "garden": ((("green_triangle", 0.85), ("yellow_star", 0.85), ("orange_cross", 0.85)), 2, 1.0),
    "night": ((("white_crescent", 0.9), ("cyan_diamond", 0.9)), 1, 0.8),
}
# Independent extras and their relative weights (a mild long tail).
INDEPENDENT_CLASSES = {
    "purple_ring": 1.0, "magenta_hexagon": 1.0, "black_hourglass": 0.8, "brown_arrow": 0.8,
    "pink_checker": 0.6, "striped_bar": 0.6, "lime_pentagon": 0.4,
}
EXCLUSIVE_PAIRS = (
    ("purple_ring", "magenta_hexagon"),
    ("yellow_star", "white_crescent"),
    ("red_circle", "brown_arrow"),
)
MAX_LABELS = 5
_NUM_TEMPLATE_PROBS = (0.25, 0.55, 0.2)
_NUM_EXTRA_PROBS = (0.4, 0.4, 0.15, 0.05)
_DUPLICATE_PROB, _MAX_OBJECTS = 0.25, 6


# ---------------------------------------------------------------- label sets


def _excluded_by(labels):
    """Names that may not join `labels` because of an exclusive pair."""
    banned = set()
    for a, b in EXCLUSIVE_PAIRS:
        if a in labels:
            banned.add(b)
        if b in labels:
            banned.add(a)
    return banned


def sample_label_set(rng):
    """Samples one image's label set from the generative process above.

    Args:
        rng: a `numpy.random.Generator`.

    Returns:
        A list of 1-5 distinct class names in `DEMO_CLASS_NAMES` order.
    """
    labels = set()
    templates = list(SCENE_TEMPLATES)
    possible = set()  # every member of the chosen templates, kept or not
    for _ in range(rng.choice(len(_NUM_TEMPLATE_PROBS), p=_NUM_TEMPLATE_PROBS)):
        # Checked against all members, not only the kept ones, so two
        # conflicting templates never meet (garden without its star still
        # excludes night).
        banned = _excluded_by(possible)
        allowed = [t for t in templates
                   if not any(m in banned for m, _ in SCENE_TEMPLATES[t][0])]
        if not allowed:
            break
        weights = np.array([SCENE_TEMPLATES[t][2] for t in allowed])
        name = allowed[rng.choice(len(allowed), p=weights / weights.sum())]
        templates.remove(name)
        members, min_members, _ = SCENE_TEMPLATES[name]
        possible.update(m for m, _ in members)
        kept = [m for m, keep_prob in members if rng.random() < keep_prob]
        # Top up with the most likely members so a template is never empty.
        for member, _ in sorted(members, key=lambda mp: -mp[1]):
            if len(kept) >= min_members:
                break
            if member not in kept:
                kept.append(member)
        labels.update(kept)

    num_extras = rng.choice(len(_NUM_EXTRA_PROBS), p=_NUM_EXTRA_PROBS)
    num_extras = max(num_extras, 1 if not labels else 0)
    for _ in range(min(num_extras, MAX_LABELS - len(labels))):
        banned = _excluded_by(labels)
        allowed = [c for c in INDEPENDENT_CLASSES if c not in labels and c not in banned]
        if not allowed:
            break
        weights = np.array([INDEPENDENT_CLASSES[c] for c in allowed])
        labels.add(allowed[rng.choice(len(allowed), p=weights / weights.sum())])
    return [name for name in DEMO_CLASS_NAMES if name in labels]


def _image_rng(seed, split, index, stream):
    return np.random.default_rng([seed, SPLIT_CODES[split], index, stream])


def sample_label_sets(num_sets, seed=0, split="train"):
    """The label sets of the first `num_sets` images of a demo split, without drawing.

    Uses the same per-image random streams as `write_demo_dataset`, so the
    result equals the labels written for that split and seed.

    Args:
        num_sets: how many label sets.
        seed: the data set seed.
        split: "train" or "val".

    Returns:
        A list of label-name lists.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_CODES)}")
    return [sample_label_set(_image_rng(seed, split, i, _LABEL_STREAM)) for i in range(num_sets)]


# -------------------------------------------------------------------- shapes


def _circle_points(radius, num_points=32, center=(0.0, 0.0), start=0.0, stop=None):
    stop = start + 2 * math.pi if stop is None else stop
    angles = np.linspace(start, stop, num_points, endpoint=False)
    return np.stack([center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)], 1)


def _star():
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _ring():
    # One "keyhole" polygon (outer circle, then the inner one backwards) keeps
    # the hole both when drawing and in the COCO polygon and its area.
    outer = _circle_points(1.0, 32)
    inner = _circle_points(0.55, 32)[::-1]
    return np.concatenate([outer, outer[:1], inner[-1:], inner, inner[-1:]])


def _crescent():
    offset, inner_radius = 0.45, 0.85  # inner circle centred at (offset, 0)
    x = (1 - inner_radius**2 + offset**2) / (2 * offset)
    y = math.sqrt(1 - x**2)
    outer_start, inner_start = math.atan2(y, x), math.atan2(y, x - offset)
    outer = _circle_points(1.0, 24, start=outer_start, stop=2 * math.pi - outer_start)
    inner = _circle_points(inner_radius, 16, (offset, 0.0), start=inner_start,
                           stop=2 * math.pi - inner_start)[::-1]
    return np.concatenate([outer, inner])


def _normalized(points):
    """Centres a polygon on its box and scales its longest side to 2."""
    points = np.asarray(points, dtype=np.float64)
    low, high = points.min(0), points.max(0)
    return (points - (low + high) / 2) * (2 / (high - low).max())


_SQUARE = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
# name -> (unit polygon, max rotation in degrees). Rotations are limited where
# a free rotation would turn one class into another (square vs diamond).
_SHAPES = {
    "red_circle": (_normalized(_circle_points(1.0)), 0),
    "blue_square": (_normalized(_SQUARE), 15),
    "green_triangle": (_normalized(_circle_points(1.0, 3, start=-math.pi / 2)), 20),
    "yellow_star": (_normalized(_star()), 36),
    "orange_cross": (_normalized([(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33),
                                  (0.33, 0.33), (0.33, 1), (-0.33, 1), (-0.33, 0.33), (-1, 0.33),
                                  (-1, -0.33), (-0.33, -0.33)]), 20),
    "purple_ring": (_normalized(_ring()), 0),
    "cyan_diamond": (_normalized([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]), 15),
    "magenta_hexagon": (_normalized(_circle_points(1.0, 6)), 30),
    "white_crescent": (_normalized(_crescent()), 40),
    "black_hourglass": (_normalized([(-0.8, -1), (0.8, -1), (0.12, 0), (0.8, 1), (-0.8, 1),
                                     (-0.12, 0)]), 20),
    "brown_arrow": (_normalized([(-1, -0.28), (0.2, -0.28), (0.2, -0.75), (1, 0), (0.2, 0.75),
                                 (0.2, 0.28), (-1, 0.28)]), 180),
    "pink_checker": (_normalized(_SQUARE), 20),
    "striped_bar": (_normalized([(-1, -0.36), (1, -0.36), (1, 0.36), (-1, 0.36)]), 180),
    "lime_pentagon": (_normalized(_circle_points(1.0, 5, start=-math.pi / 2)), 36),
}
_CATEGORY_BY_NAME = {c[1]: c for c in DEMO_CATEGORIES}


def _polygon_area(points):
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


# ----------------------------------------------------------------- rendering


def _random_muted_colour(rng):
    """A low-saturation, mid-brightness colour, so every class stands out on it."""
    hue, saturation, value = rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.75)
    rgb = np.array([(math.cos(2 * math.pi * (hue - k / 3)) + 1) / 2 for k in range(3)])
    return 255 * value * (1 - saturation + saturation * rgb)


def _background(rng, size):
    """A two-colour gradient with mottling and faint strokes, at `size` px."""
    c1, c2 = _random_muted_colour(rng), _random_muted_colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    # Both the gradient and the mottling are smooth, so a 6x6 grid upsampled
    # bilinearly is enough, and much faster than computing every pixel.
    ys, xs = np.mgrid[0:6, 0:6] / 5
    t = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    grid = c1 * (1 - t[..., None]) + c2 * t[..., None] + rng.normal(0, 14, (6, 6, 1))
    image = Image.fromarray(grid.clip(0, 255).astype(np.uint8))
    image = image.resize((size, size), Image.Resampling.BILINEAR)

    # Faint lines and arcs: clutter a model must learn to ignore (never a class).
    draw = ImageDraw.Draw(image)
    base = (c1 + c2) / 2
    for _ in range(rng.integers(3, 8)):
        colour = tuple(int(v) for v in (base + rng.uniform(-45, 45, 3)).clip(0, 255))
        width = int(rng.integers(1, 4))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 2, max(y0, y1) + 2]
            start = float(rng.uniform(0, 360))
            draw.arc(box, start, start + float(rng.uniform(60, 270)), fill=colour, width=width)
    return image


def _place_polygons(names, rng, image_size):
    """Random size, rotation and position for each object, keeping overlaps small.

    Returns:
        A list of `(name, polygon in pixels, rotation radians, centre, side)`.
    """
    # Objects are 20-42% of the image (19-40 px at 96 px); smaller when crowded.
    high = 0.42 if len(names) <= 3 else (0.36 if len(names) <= 5 else 0.32)
    boxes, placed = [], []
    for name in names:
        unit, max_rotation = _SHAPES[name]
        best = None
        for _ in range(20):
            side = rng.uniform(0.2, high) * image_size
            theta = math.radians(rng.uniform(-max_rotation, max_rotation))
            rotation = np.array([[math.cos(theta), math.sin(theta)],
                                 [-math.sin(theta), math.cos(theta)]])
            points = unit @ rotation * (side / 2)
            extent = points.max(0) - points.min(0)
            if extent.max() > image_size - 2:
                continue
            corner = rng.uniform(1, image_size - 1 - extent)
            centre = corner - points.min(0)  # where the shape's own origin lands
            points = points + centre
            box = np.concatenate([corner, corner + extent])
            # Overlap as a share of the smaller box: later objects are drawn on
            # top, so this bounds how much of either one can be hidden.
            overlap = 0.0
            for other in boxes:
                iw = min(box[2], other[2]) - max(box[0], other[0])
                ih = min(box[3], other[3]) - max(box[1], other[1])
                if iw > 0 and ih > 0:
                    smaller = min(np.prod(extent), np.prod(other[2:] - other[:2]))
                    overlap = max(overlap, iw * ih / smaller)
            if best is None or overlap < best[0]:
                best = (overlap, points, box, theta, centre, side)
            if overlap < 0.2:
                break
        _, points, box, theta, centre, side = best
        boxes.append(box)
        placed.append((name, points, theta, centre, side))
    return placed


def _texture(name, theta, centre, side, crop_box, colours):
    """Stripes or a checkerboard in the object's own frame, over a crop."""
    x0, y0, x1, y1 = crop_box
    ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    # Undo the object's rotation; u, v run over [-0.5, 0.5] across the shape.
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / side
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / side
    if name == "striped_bar":
        first = np.floor(u * 7) % 2 == 0  # 7 bands across the bar
    else:
        first = (np.floor(u * 4 + 8) + np.floor(v * 4 + 8)) % 2 == 0  # 4x4 cells
    return np.where(first[..., None], colours[0], colours[1]).astype(np.uint8)


def _render_scene(label_names, rng, image_size):
    """Draws one scene.

    Returns:
        `(PIL RGB image, objects)` where objects are `(name, polygon in pixels)`.
    """
    names = list(label_names)
    for name in label_names:
        if len(names) < _MAX_OBJECTS and rng.random() < _DUPLICATE_PROB:
            names.append(name)
    names = [names[i] for i in rng.permutation(len(names))]

    scale = _SUPERSAMPLE
    big = image_size * scale
    image = _background(rng, big)
    draw = ImageDraw.Draw(image)
    objects = []
    for name, points, theta, centre, side in _place_polygons(names, rng, image_size):
        _, _, _, colour, second_colour = _CATEGORY_BY_NAME[name]
        # Per-object colour jitter, so colour is a strong but not exact cue.
        shade = rng.uniform(0.85, 1.08)
        jitter = rng.uniform(-12, 12, 3)
        colour = tuple(int(c) for c in (np.array(colour) * shade + jitter).clip(0, 255))
        scaled = [tuple(p) for p in points * scale]
        if second_colour is None:
            # The ring's keyhole seam would show up in an outline, so it has none.
            outline = None if name == "purple_ring" else tuple(int(c * 0.55) for c in colour)
            draw.polygon(scaled, fill=colour, outline=outline, width=scale)
        else:
            x0, y0 = np.floor(points.min(0) * scale).astype(int)
            x1, y1 = np.ceil(points.max(0) * scale).astype(int) + 1
            x1, y1 = min(x1, big), min(y1, big)
            mask = Image.new("L", (x1 - x0, y1 - y0), 0)
            ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in scaled], fill=255)
            fill = _texture(name, theta, centre * scale, side * scale, (x0, y0, x1, y1),
                            (colour, second_colour))
            image.paste(Image.fromarray(fill), (int(x0), int(y0)), mask)
        objects.append((name, points))

    image = image.reduce(scale)
    noise = rng.normal(0, rng.uniform(3, 9), (image_size, image_size, 3)).astype(np.float32)
    pixels = (np.asarray(image, np.float32) + noise).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels), objects


# ------------------------------------------------------------------- writing


def _coco_skeleton(split, seed, image_size):
    return {
        "info": {
            "description": f"hybridnet_tf demo scenes, {split} split (synthetic; seed={seed}, "
                           f"{image_size}x{image_size})",
            "url": "", "version": "1.0", "year": 2024,
            "contributor": "hybridnet_tf", "date_created": _FIXED_DATE,
        },
        "licenses": [{"id": 1, "name": "CC0 1.0 (synthetic images)",
                      "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": [],
        "annotations": [],
        "categories": [{"id": cid, "name": name, "supercategory": supercategory}
                       for cid, name, supercategory, *_ in DEMO_CATEGORIES],
    }


def _write_split(out_dir, split, num_images, seed, image_size, progress):
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    coco = _coco_skeleton(split, seed, image_size)
    indices = range(num_images)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"demo {split}", unit="img")
    for index in indices:
        labels = sample_label_set(_image_rng(seed, split, index, _LABEL_STREAM))
        image, objects = _render_scene(labels, _image_rng(seed, split, index, _RENDER_STREAM),
                                       image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        # 4:4:4 chroma: the default 4:2:0 smears colour on 20-px objects.
        image.save(os.path.join(image_dir, file_name), "JPEG", quality=90, subsampling=0)
        coco["images"].append({
            "id": image_id, "file_name": file_name, "width": image_size, "height": image_size,
            "license": 1, "date_captured": "2024-01-01 00:00:00", "coco_url": "", "flickr_url": "",
        })
        for name, points in objects:
            low, high = points.min(0), points.max(0)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1,
                "image_id": image_id,
                "category_id": _CATEGORY_BY_NAME[name][0],
                "bbox": [round(float(v), 2) for v in (*low, *(high - low))],
                "area": round(_polygon_area(points), 2),
                "iscrowd": 0,
                "segmentation": [[round(float(v), 2) for v in points.ravel()]],
            })
    annotation_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    with open(annotation_path, "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))
    return annotation_path, len(coco["annotations"])


def write_demo_dataset(out_dir, seed=0, num_train=2000, num_val=500, image_size=96,
                       progress=True):
    """Writes the synthetic demo scenes as a COCO-format data set.

    Layout: `out_dir/train/*.jpg`, `out_dir/val/*.jpg` and
    `out_dir/annotations/instances_{train,val}.json` (COCO instances format;
    `file_name` is relative to the split folder; image and annotation ids start
    at 1 in each file). Existing files of the same names are overwritten.

    Args:
        out_dir: folder to write into (created if missing).
        seed: non-negative int; the same seed gives byte-identical files.
        num_train: number of training images (>= 1).
        num_val: number of validation images (>= 0).
        image_size: width and height in pixels (>= 32).
        progress: show a tqdm progress bar per split.

    Returns:
        A dict with `train_annotations`, `val_annotations` (JSON paths),
        `train_images`, `val_images` (folders), `num_train`, `num_val`,
        `num_train_objects`, `num_val_objects` and `num_categories`.

    Example:
        >>> info = write_demo_dataset("/tmp/demo", num_train=200, num_val=50, progress=False)
        >>> from pycocotools.coco import COCO
        >>> coco = COCO(info["train_annotations"])
    """
    for arg_name, value, minimum in (("num_train", num_train, 1), ("num_val", num_val, 0),
                                     ("image_size", image_size, 32), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{arg_name} must be an int, got {value!r}")
        if value < minimum:
            hint = ""
            if arg_name == "image_size":
                hint = " (smaller images leave the shapes too few pixels)"
            raise ValueError(f"{arg_name} must be >= {minimum}, got {value}{hint}")
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    result = {"num_categories": len(DEMO_CATEGORIES)}
    for split, count in (("train", int(num_train)), ("val", int(num_val))):
        path, num_objects = _write_split(out_dir, split, count, int(seed), int(image_size),
                                         progress)
        result[f"{split}_annotations"] = path
        result[f"{split}_images"] = os.path.join(out_dir, split)
        result[f"num_{split}"] = count
        result[f"num_{split}_objects"] = num_objects
    return result


# ---------------------------------------------------------------- statistics


def label_set_statistics(label_sets, class_names=DEMO_CLASS_NAMES):
    """Per-class frequencies and co-occurrence of a list of label sets.

    Args:
        label_sets: iterable of label-name collections, one per image.
        class_names: the classes, in the order of the returned rows/columns.

    Returns:
        A dict with `class_names`, `num_images`, `frequency` ([C] share of
        images holding each class), `cooccurrence` ([C, C] image counts; the
        diagonal counts each class), `conditional` ([C, C], row i column j =
        P(j | i), NaN where i never occurs) and `labels_per_image` (counts of
        images with 0, 1, 2, ... labels).
    """
    index = {name: i for i, name in enumerate(class_names)}
    multi_hot = []
    for labels in label_sets:
        row = np.zeros(len(class_names), np.int64)
        for name in labels:
            if name not in index:
                raise ValueError(f"unknown label {name!r}; expected one of {list(class_names)}")
            row[index[name]] = 1
        multi_hot.append(row)
    multi_hot = np.array(multi_hot, np.int64).reshape(-1, len(class_names))
    cooccurrence = multi_hot.T @ multi_hot
    counts = np.diag(cooccurrence).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conditional = cooccurrence / counts[:, None]
    return {
        "class_names": list(class_names),
        "num_images": len(multi_hot),
        "frequency": counts / max(len(multi_hot), 1),
        "cooccurrence": cooccurrence,
        "conditional": conditional,
        "labels_per_image": np.bincount(multi_hot.sum(1), minlength=MAX_LABELS + 1),
    }


def demo_label_statistics(annotation_json):
    """Label frequencies and co-occurrence of a written COCO annotation file.

    Args:
        annotation_json: path to a COCO instances JSON (e.g. one written by
            `write_demo_dataset`; any COCO file works).

    Returns:
        The dict of `label_set_statistics`, classes in category-id order.
    """
    with open(annotation_json, encoding="utf-8") as f:
        coco = json.load(f)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    name_of = {c["id"]: c["name"] for c in categories}
    labels = {image["id"]: set() for image in coco["images"]}
    for annotation in coco["annotations"]:
        labels[annotation["image_id"]].add(name_of[annotation["category_id"]])
    return label_set_statistics(labels.values(), [c["name"] for c in categories])
