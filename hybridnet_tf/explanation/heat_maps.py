"""Heat maps on images: upsampling, peak locations, and the overlay figure as PNG.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg, no pyplot),
as in `evaluation/report.py`: no display is needed and a notebook's
backend is left alone.
"""

import io

import numpy as np

# Heat-map overlay: opacity over the photo, and the colour map (high = red).
OVERLAY_ALPHA = 0.5
COLORMAP = "jet"
PANEL_INCHES = 2.6
DPI = 100


def upsample(heat_map, height, width):
    """Bilinear resize of a [h, w] map to [height, width] (half-pixel centres, as tf.image.resize)."""
    import tensorflow as tf

    heat_map = np.asarray(heat_map, np.float32)
    resized = tf.image.resize(heat_map[:, :, None], (height, width), method="bilinear")
    return resized.numpy()[:, :, 0]


def peak_of(heat_map, height, width):
    """The peak of a [h, w] map drawn over a `height` x `width` image.

    Returns:
        `{"x", "y"}` pixel coordinates in the image (of the upsampled map's
        maximum), `"x_fraction"`, `"y_fraction"` (0..1 of the width and
        height), `"cell"` `[row, col]` of the maximum in the map itself and
        `"value"` (its 0..1 value); None when the map is all zeros (nothing
        raised the score).
    """
    heat_map = np.asarray(heat_map, np.float32)
    if not np.any(heat_map > 0):
        return None
    row, col = np.unravel_index(int(np.argmax(heat_map)), heat_map.shape)
    upsampled = upsample(heat_map, height, width)
    y, x = np.unravel_index(int(np.argmax(upsampled)), upsampled.shape)
    return {
        "x": int(x),
        "y": int(y),
        "x_fraction": round((x + 0.5) / width, 4),
        "y_fraction": round((y + 0.5) / height, 4),
        "cell": [int(row), int(col)],
        "value": round(float(heat_map[row, col]), 4),
    }


def draw_overlay(axes, image, heat_map, title=None, peak=None):
    """Draws `image` [H, W, 3] (0..255) with `heat_map` [h, w] (0..1) upsampled over it.

    Args:
        axes: a matplotlib Axes.
        image: the picture, uint8 or float 0..255.
        heat_map: the map, or None to draw the picture alone.
        title: the panel title (e.g. "dog 0.93").
        peak: a `peak_of` dict, marked with a white cross.
    """
    image = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    axes.imshow(image)
    if heat_map is not None:
        axes.imshow(upsample(heat_map, height, width), cmap=COLORMAP, alpha=OVERLAY_ALPHA,
                    vmin=0.0, vmax=1.0, interpolation="nearest")
    if peak is not None:
        axes.plot([peak["x"]], [peak["y"]], marker="+", color="white", markersize=12, mew=2)
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_axis_off()
    if title:
        axes.set_title(title, fontsize=9)


def overlay_figure(image, panels, title=None, columns=None):
    """A figure with the image, then one heat-map panel per label.

    Args:
        image: [H, W, 3] pixels 0..255.
        panels: list of dicts with `title`, `heat_map` ([h, w] in 0..1, or
            None) and optionally `peak`.
        title: the first panel's title (default "image").
        columns: panels per row (default: all in one row, up to 6).

    Returns:
        A `matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    count = 1 + len(panels)
    columns = columns or min(count, 6)
    rows = -(-count // columns)
    height, width = np.asarray(image).shape[:2]
    aspect = height / width
    figure = Figure(
        figsize=(PANEL_INCHES * columns, (PANEL_INCHES * aspect + 0.35) * rows), layout="constrained"
    )
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    draw_overlay(axes[0], image, None, title=title or "image")
    for ax, panel in zip(axes[1:], panels):
        draw_overlay(ax, image, panel.get("heat_map"), title=panel.get("title"), peak=panel.get("peak"))
    for ax in axes[count:]:
        ax.set_axis_off()
    return figure


def figure_png(figure, dpi=DPI):
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def shrink(image, max_side):
    """`image` [H, W, 3] resized (area) so that its longer side is at most `max_side`."""
    import tensorflow as tf

    image = np.asarray(image, np.float32)
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return tf.image.resize(image, size, method="area").numpy()
