"""Pictures of a layout, its token regions and the attention rule (PIL + torch only).

The attention rule is easy to get subtly wrong and hard to read from numbers, so
each of its pieces is one call away from an image: the boxes over the depth map,
the token cells each instance covers, and the allowed matrix itself. They also go
into every run's output folder so a user can see what the engine was told.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from threedis.engine.layout import Layout
from threedis.kernels.rule import Phases, Schedule, TokenLayout, membership_order, query_restrictions

__all__ = ["draw_layout", "draw_regions", "draw_allowed", "instance_color", "rule_pictures", "save_rule_pictures"]

# Distinct, colour-blind-friendlier hues first; later instances get golden-ratio hues.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
)
_NEUTRAL = (128, 128, 128)
_REGION_BACKGROUND = (240, 240, 240)
_GRID_LINE = (165, 165, 165)
_CHUNK_LINE = (60, 120, 230)
_IMAGE_LINE = (230, 40, 40)
_LABEL_CHARS = 32
_PAIRS_PER_BLOCK = 1 << 20  # type pairs compared at once in draw_allowed (~8 MB of int64)


def instance_color(index: int) -> tuple[int, int, int]:
    """RGB colour of instance `index` (0-based, as in `instances[index]`), same in every picture."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, fill) -> None:
    try:
        draw.text(xy, text, font=font, fill=fill)
    except UnicodeEncodeError:  # the bitmap fallback font is latin-1 only
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), font=font, fill=fill)


def _ink_for(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _truncate(text: str, limit: int = _LABEL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _image_from_tensor(pixels: torch.Tensor) -> Image.Image:
    """uint8[H, W, 3] -> RGB image, without needing numpy."""
    height, width, _ = pixels.shape
    return Image.frombytes("RGB", (width, height), bytes(pixels.contiguous().reshape(-1).tolist()))


def _background_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Depth maps arrive as 8-bit, 16-bit or float images; stretch wide ones to 0..255 for display."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        image = image.convert("I")
    if image.mode in ("I", "F"):
        low, high = image.getextrema()
        scale = 255.0 / (high - low) if high > low else 0.0
        image = image.point(lambda v: v * scale - low * scale).convert("L")
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_layout(layout: Layout, background: Image.Image | None = None) -> Image.Image:
    """Boxes (and masks) with their instance index and prompt, over the depth map or a grey canvas.

    Returns an RGB image of the layout's size. Labels are `index: prompt` with the
    0-based index used in error messages (`instances[index]`).
    """
    size = (layout.width, layout.height)
    canvas = _background_rgb(background, size) if background is not None else Image.new("RGB", size, _NEUTRAL)
    short = min(size)
    line = max(2, short // 256)
    font = _font(max(10, short // 48))
    composed = canvas.convert("RGBA")
    for i, mask in enumerate(layout.load_masks()):
        if mask is not None:  # tint the mask's inside (value > 0, as the rule reads it)
            tint = Image.new("RGBA", size, (*instance_color(i), 0))
            tint.putalpha(mask.resize(size, Image.Resampling.BILINEAR).point(lambda v: 96 if v > 0 else 0))
            composed = Image.alpha_composite(composed, tint)
    draw = ImageDraw.Draw(composed)
    placed: list[tuple[int, int, int, int]] = []
    for i, inst in enumerate(layout.instances):
        colour = instance_color(i)
        x0, y0, x1, y1 = inst.box
        px0, py0 = round(x0 * size[0]), round(y0 * size[1])
        px1, py1 = max(px0 + 1, round(x1 * size[0]) - 1), max(py0 + 1, round(y1 * size[1]) - 1)
        draw.rectangle((px0, py0, px1, py1), outline=(*colour, 255), width=line)
        label = f"{i}: {_truncate(inst.prompt)}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = max(2, line)
        box_w, box_h = right - left + 2 * pad, bottom - top + 2 * pad
        lx = min(max(px0, 0), max(size[0] - box_w, 0))
        ly = min(max(py0, 0), max(size[1] - box_h, 0))
        while any(_overlaps((lx, ly, lx + box_w, ly + box_h), other) for other in placed) and ly + 2 * box_h <= size[1]:
            ly += box_h  # step below labels of boxes that start at the same place
        placed.append((lx, ly, lx + box_w, ly + box_h))
        draw.rectangle((lx, ly, lx + box_w - 1, ly + box_h - 1), fill=(*colour, 255))
        _text(draw, (lx + pad - left, ly + pad - top), label, font, (*_ink_for(colour), 255))
    return composed.convert("RGB")


def draw_regions(
    regions: torch.Tensor,
    labels: Sequence[str] | None = None,
    scale: int | None = None,
) -> Image.Image:
    """Token cells each instance covers: tinted in its colour, overlaps blended, grid lines between cells.

    regions: BoolTensor[N, h, w] (from box_regions / mask_regions). The picture is
    (w * scale) x (h * scale); scale defaults to about 512 pixels on the long side.
    labels default to the instance indices; pass empty strings to hide them.
    """
    if regions.dim() != 3:
        raise ValueError(f"regions must be a [N, h, w] tensor, got shape {tuple(regions.shape)}")
    n, h, w = regions.shape
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels given for {n} regions")
    scale = max(1, 512 // max(h, w, 1)) if scale is None else int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    covered = regions.detach().cpu().to(torch.float64)  # [N, h, w]
    colours = torch.tensor([instance_color(i) for i in range(n)], dtype=torch.float64).reshape(n, 3)
    count = covered.sum(0)  # [h, w]
    mean = torch.einsum("nhw,nc->hwc", covered, colours) / count.clamp(min=1)[..., None]
    background = torch.tensor(_REGION_BACKGROUND, dtype=torch.float64)
    tint = 0.3 * background + 0.7 * mean
    cells = torch.where(count[..., None] > 0, tint, background).round().to(torch.uint8)  # [h, w, 3]
    pixels = cells.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # [h*s, w*s, 3]
    if scale >= 4:  # grid lines on each cell's first pixel row/column, plus the closing border
        grid = torch.tensor(_GRID_LINE, dtype=torch.uint8)
        pixels[::scale, :] = grid
        pixels[:, ::scale] = grid
        pixels[-1, :] = grid
        pixels[:, -1] = grid
    image = _image_from_tensor(pixels)
    names = [str(i) for i in range(n)] if labels is None else list(labels)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, min(24, 2 * scale)))
    placed: list[tuple[int, int, int, int]] = []
    for i, name in enumerate(names):
        cells_i = regions[i].nonzero()
        if not name or cells_i.numel() == 0:
            continue
        r0, c0 = int(cells_i[:, 0].min()), int(cells_i[:, 1].min())
        label = _truncate(name)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        box_w, box_h = right - left + 4, bottom - top + 4
        x = min(c0 * scale + 1, max(image.width - box_w, 0))
        y = min(r0 * scale + 1, max(image.height - box_h, 0))
        while any(_overlaps((x, y, x + box_w, y + box_h), other) for other in placed) and y + 2 * box_h <= image.height:
            y += box_h  # labels of regions that start in the same place stack instead of overprinting
        placed.append((x, y, x + box_w, y + box_h))
        draw.rectangle((x, y, x + box_w - 1, y + box_h - 1), fill=instance_color(i))
        _text(draw, (x + 2 - left, y + 2 - top), label, font, _ink_for(instance_color(i)))
    return image


def _allowed_fraction(tokens: TokenLayout, phases: Phases, bins: int) -> torch.Tensor:
    """float64[bins, bins]: share of allowed (q, k) pairs per pixel, without an L x L mask.

    Whether q may see k depends only on (restriction, membership, kind) of each, and a
    layout has few distinct such triples ("types"), so the pooled matrix is
    counts @ allowed_between_types @ counts^T. Types are compared in row blocks of
    ~1M pairs, so even a layout where every token is its own type stays small.
    All sums are integer-valued float64, so the result is exact.
    """
    tokens = tokens if tokens.device.type == "cpu" else tokens.to("cpu")
    length = tokens.length
    restricted = query_restrictions(tokens, phases).to(torch.int64)  # [L] restricted key-kind bits
    triples = torch.stack([restricted, tokens.member, tokens.kind.to(torch.int64)], 1)  # [L, 3]
    types, type_of = torch.unique(triples, dim=0, return_inverse=True)  # [U, 3], [L]
    t_restricted, t_member, t_kind = types.unbind(1)
    t_kind_bit = torch.bitwise_left_shift(torch.ones_like(t_kind), t_kind)  # [U]
    pixel_of = torch.arange(length, dtype=torch.int64) * bins // length  # [L] token -> pixel bin
    count = torch.zeros(bins, types.shape[0], dtype=torch.float64)  # [bins, U] tokens of each type per pixel
    count.index_put_((pixel_of, type_of), torch.ones(length, dtype=torch.float64), accumulate=True)
    allowed_to = torch.zeros(bins, types.shape[0], dtype=torch.float64)  # [bins, U] allowed pairs per key type
    block = max(1, _PAIRS_PER_BLOCK // types.shape[0])
    for start in range(0, types.shape[0], block):
        rows = slice(start, start + block)
        restricted_here = (t_restricted[rows, None] & t_kind_bit[None, :]) != 0  # [b, U]
        shares = (t_member[rows, None] & t_member[None, :]) != 0  # [b, U]
        allowed_to += count[:, rows] @ (~restricted_here | shares).to(torch.float64)
    per_bin = count.sum(1)  # [bins]
    return (allowed_to @ count.T) / (per_bin[:, None] * per_bin[None, :])


def draw_allowed(
    tokens: TokenLayout,
    phases: Phases | None,
    size: int = 512,
    separators: bool = True,
) -> Image.Image:
    """The allowed[q, k] matrix (rows = queries) as an RGB picture: white = allowed, black = masked.

    Longer sequences are mean-pooled to size x size (grey = partly allowed); shorter
    ones are enlarged by a whole factor so each token is a clean square. With
    separators, blue lines mark the text-chunk boundaries and a red line the
    text/image boundary (drawn on the first pixel of the chunk that follows).
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    length = tokens.length
    bins = min(length, size)
    factor = max(1, size // length)
    if phases is None:
        fraction = torch.ones(bins, bins, dtype=torch.float64)
    else:
        fraction = _allowed_fraction(tokens, phases, bins)
    grey = (fraction * 255).round().to(torch.uint8)  # [bins, bins]
    grey = grey.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    pixels = grey[..., None].expand(-1, -1, 3).clone()  # [S, S, 3]
    if separators:
        bounds = [(b, _CHUNK_LINE) for b in range(tokens.chunk, tokens.text_len, tokens.chunk)]
        if tokens.text_len < length:
            bounds.append((tokens.text_len, _IMAGE_LINE))
        for boundary, colour in bounds:
            at = (boundary * bins // length) * factor
            pixels[at, :] = torch.tensor(colour, dtype=torch.uint8)
            pixels[:, at] = torch.tensor(colour, dtype=torch.uint8)
    return _image_from_tensor(pixels)


def rule_pictures(
    regions: torch.Tensor,
    prompts: Sequence[str],
    chunk: int,
    schedule: Schedule,
    permute_tokens: bool = False,
    size: int = 512,
) -> dict[str, Image.Image]:
    """What a render's attention rule was told, as pictures: name -> image.

    "regions": the token cells of each instance (labelled `index: prompt`).
    "attention": the allowed matrix at step 0, plus "attention-step<s>" for each
    later step of the hard-control window where the phases change (e.g. when I2I
    ends). Token order as the engine used it (grouped by instance if permute_tokens).
    """
    labels = [f"{i}: {prompt}" for i, prompt in enumerate(prompts)]
    out = {"regions": draw_regions(regions, labels=labels)}
    tokens = TokenLayout.build(regions, chunk=chunk, order=membership_order(regions) if permute_tokens else None)
    previous = None
    for step in range(min(schedule.hard, schedule.steps)):
        phases = schedule.at(step)
        if phases == previous:
            continue
        out["attention" if step == 0 else f"attention-step{step}"] = draw_allowed(tokens, phases, size=size)
        previous = phases
    return out


def save_rule_pictures(result: Any, image_path: str | os.PathLike) -> dict[str, Path]:
    """Write rule_pictures of a render beside its saved image, sharing the image's numbered suffix.

    result: an engine RenderResult (its layout, per-instance masks and settings say
    what the rule saw). image_path: where its image.png went (image-3.png -> regions-3.png).
    Returns name -> path; a name that already exists is left alone and not returned.
    """
    from threedis.engine.denoise import regions_for  # the engine's own regions, masks included

    image_path = Path(image_path)
    suffix = image_path.stem.removeprefix("image")
    layout, settings = result.layout, result.settings
    masks = list(result.masks or []) or [None] * len(layout.instances)
    regions = regions_for(layout.boxes, masks, layout.grid)
    schedule = Schedule(**settings["schedule"])
    pictures = rule_pictures(regions, [inst.prompt for inst in layout.instances], settings["chunk"], schedule,
                             bool(settings.get("permute_tokens", False)))
    written: dict[str, Path] = {}
    for name, picture in pictures.items():
        path = image_path.with_name(f"{name}{suffix}.png")
        try:
            with open(path, "xb") as handle:  # never replace a file that is already there
                picture.save(handle, format="PNG")
        except FileExistsError:
            continue
        written[name] = path
    return written
