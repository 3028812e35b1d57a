"""plots.py: PNG line charts, image grids and text tables with PIL and numpy alone (no matplotlib),
for tiny_demo.py and results/study.py. Nothing here is part of the method."""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def line_chart(path, series, title, xlabel, ylabel, logy=False, note=None, size=(900, 560)):
    """series: (label, xs, ys[, color index[, thin]]). Thin lines (one seed beside a mean) are a
    lighter shade without markers; a None label has no legend entry. Markers up to 30 points.
    `note` is a red banner under the title (quick mode's)."""
    keep = lambda y: math.isfinite(y) and (y > 0 or not logy)
    series = [(label, [float(x) for x, y in zip(xs, ys) if keep(y)],
               [float(y) for y in ys if keep(y)], *style) for label, xs, ys, *style in series]
    (W, H), left, right, top, bottom = size, 80, 200, 68, 60
    image = Image.new("RGB", size, "white")
    draw, font = title_and_note(image, left, title, note), ImageFont.load_default(12)
    xs = [x for s in series for x in s[1]] or [0.0, 1.0]
    ys = [y for s in series for y in s[2]] or [1.0, 2.0]
    xticks, yticks = axis_ticks(min(0.0, min(xs)), max(xs)), axis_ticks(min(ys), max(ys), logy)
    fy = math.log10 if logy else float
    px = lambda x: left + (x - xticks[0]) / (xticks[-1] - xticks[0]) * (W - left - right)
    py = lambda y: H - bottom - (fy(y) - fy(yticks[0])) / (fy(yticks[-1]) - fy(yticks[0])) * (
        H - top - bottom)
    for v in yticks:
        draw.line([left, py(v), W - right, py(v)], fill=(225, 225, 225))
        draw.text((left - 8, py(v)), f"{v:g}", fill="black", font=font, anchor="rm")
    for v in xticks:
        draw.line([px(v), top, px(v), H - bottom], fill=(235, 235, 235))
        draw.text((px(v), H - bottom + 6), f"{v:g}", fill="black", font=font, anchor="ma")
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.text(((left + W - right) / 2, H - 22), xlabel, "black", ImageFont.load_default(16), "mm")
    draw.text((12, top - 22), ylabel, fill="black", font=font)
    legend = iter(range(len(series)))
    for i, (label, sx, sy, *style) in enumerate(series):
        index, thin = (style + [i, False][len(style):])[:2]
        color = COLORS[index % len(COLORS)]
        color = tuple(round(c + (255 - c) * 0.55) for c in color) if thin else color
        points = [(px(x), py(y)) for x, y in zip(sx, sy)]
        thick_line(image, points, color, 1.5 if thin else 2.5)
        for x, y in points if len(points) <= 30 and not thin else []:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        if label is not None:
            ly = top + 10 + 22 * next(legend)
            thick_line(image, [(W - right + 12, ly), (W - right + 36, ly)], color, 3)
            draw.text((W - right + 42, ly), label, fill="black", font=font, anchor="lm")
    image.save(path)


def axis_ticks(lo, hi, log=False):
    """Round ticks whose first is at or below lo and last at or above hi, so the axis spans them
    and every gridline is labelled: 1-2-5 per decade on a log axis over 5x or more, else steps
    of 1, 2 or 5 x 10^k (halved on a log axis until the first tick is above 0)."""
    if log and hi > 5 * lo:
        decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
        ticks = [m * 10.0 ** e for e in decades for m in (1, 2, 5)]
        first, last = max(v for v in ticks if v <= lo), min(v for v in ticks if v >= hi)
        return [v for v in ticks if first <= v <= last]
    raw = max(hi - lo, abs(hi) * 1e-6) / 4 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)),
               key=lambda v: abs(v - raw))
    while log and math.floor(lo / step) * step <= 0:
        step /= 2
    first, last = math.floor(lo / step), max(math.ceil(hi / step), math.floor(lo / step) + 1)
    first -= first * step > lo                                 # float rounding of lo / step
    last += last * step < hi
    return [k * step for k in range(first, last + 1)]


def thick_line(image, points, color, width):
    """A polyline of the same thickness at every slope: the pixels whose centres lie within
    width / 2 of a segment (pillow's wide lines come out thinner on shallow segments)."""
    r, mask = width / 2, np.zeros((image.height, image.width), bool)
    for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
        top, left = max(int(min(y0, y1) - r), 0), max(int(min(x0, x1) - r), 0)
        bottom = min(int(max(y0, y1) + r) + 2, image.height)
        yy, xx = np.mgrid[top:bottom, left:min(int(max(x0, x1) + r) + 2, image.width)] + 0.5
        dx, dy = x1 - x0, y1 - y0                      # nearest point: (x0, y0) + s (dx, dy)
        s = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy or 1), 0, 1)
        near = np.hypot(xx - x0 - s * dx, yy - y0 - s * dy) <= r
        mask[top:bottom, left:left + xx.shape[1]] |= near
    image.paste(color, mask=Image.fromarray(mask))


def panels(path, named_images, title, note=None, scale=2):
    """Image grids (uint8 (N, h, w, 3) each) side by side under their names, upscaled (nearest:
    pixels stay pixels)."""
    grids = [image_grid(np.asarray(images), min(10, len(images))) for _, images in named_images]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    canvas = Image.new("RGB", (sum(g.width + 20 for g in grids) + 20,
                               max(g.height for g in grids) + 96), "white")
    draw, x = title_and_note(canvas, 20, title, note), 20
    for (name, _), grid in zip(named_images, grids):
        draw.text((x, 62), name, fill="black", font=ImageFont.load_default(14))
        canvas.paste(grid, (x, 84))
        x += grid.width + 20
    canvas.save(path)


def title_and_note(image, x, title, note):
    """Every picture's title, and under it the note (quick mode's banner) in red."""
    draw = ImageDraw.Draw(image)
    draw.text((x, 12), title, fill="black", font=ImageFont.load_default(16))
    draw.text((x, 36), note or "", fill=(200, 0, 0), font=ImageFont.load_default(12))
    return draw


def image_grid(images, ncol=10, pad=2):
    """uint8 (N, h, w, 3) -> one PIL image, ncol per row."""
    n, h, w, _ = images.shape
    grid = np.full((-(-n // ncol) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = image
    return Image.fromarray(grid)


def table(headers, rows):
    """Plain-text table lines, columns padded to their widest cell."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]
