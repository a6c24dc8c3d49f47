"""kanji_strokes: an offline Omniglot-shaped character set (1 623 characters × 20 drawers).

Omniglot (paper §4.3) is 1 623 characters, each drawn stroke by stroke by 20 people, stored as
105×105 images. It cannot be downloaded on machines without internet access; Debian's
`python3-kanjidraw` ships `kanjidraw/data.json` (derived from KanjiVG, CC-BY-SA): 6 394 kanji,
each a list of strokes, each stroke a straight segment [x0, y0, x1, y1] on a 256 grid. This module
renders Omniglot's structure from it as the tfds dataset `kanji_strokes`:

* characters: 1 623 drawn with a fixed seed from the kanji of at most `MAX_STROKES` strokes
  (Omniglot's characters have few strokes; a 20-stroke kanji is a blot at 28×28), leaving out
  near-duplicates (kanji whose strokes all lie within `DUPLICATE_TOLERANCE` of another's);
* drawers: 20 per character. A drawer is a hand: a slant, size, aspect, pen width and
  sloppiness drawn from the drawer's index alone, the same in all characters. Each (character,
  drawer) image adds its own small affine transform, a smooth random warp of the page (it bends
  strokes and moves their junctions together), jitter of every stroke end, a slight bow of every
  stroke, and a per-stroke pen width: all seeded by (character, drawer), so an image is a pure
  function of them;
* images: 105×105×1 uint8, black ink on white as Omniglot, drawn by a NumPy anti-aliased
  rasteriser (`render`); the programs resize them to 28×28 exactly as the Omniglot path does
  (`tfds_offline.load_image_classification(..., image_size=28, grayscale=True)`);
* one tfds split, "train", holding every image; labels 0..1622 are the character ids (as the
  Omniglot path's labels after it concatenates tfds's two splits), so the programs split them
  1200 / 100 / 323 with `episodes.class_split`, as they split Omniglot.

tfds prepares the set once per data_dir (1-2 minutes) and reads it from there afterwards. The
contact sheet docs/figures/kanji_strokes_contact_sheet.png comes from
`python -c "from experiments.data import kanji_strokes as k; k.contact_sheet('docs/figures/kanji_strokes_contact_sheet.png', seed=1)"`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import sources, tfds_offline

__all__ = [
    "DATA_JSON",
    "KanjiStrokes",
    "NAME",
    "character_strokes",
    "choose_characters",
    "load_kanji_strokes",
    "prepare",
    "read_strokes",
    "render",
]

NAME = "kanji_strokes"
DATA_JSON = Path("/usr/lib/python3/dist-packages/kanjidraw/data.json")
DEBIAN_PACKAGE = "python3-kanjidraw"
# data.json of python3-kanjidraw 0.2.3 (Debian 0.2.3-2): another file would render another set.
DATA_SHA256 = "990f5ced54cf4ed2b3dbd404d854bf718ac5bfc67ba2e005061a345e602f8e71"

NUM_CHARACTERS = 1623
NUM_DRAWERS = 20
IMAGE_SIZE = 105
MAX_STROKES = 10
DUPLICATE_TOLERANCE = 24.0  # on the 256 grid
SELECTION_SEED = 1623
STYLE_SEED = 20
INSTANCE_SEED = 105
GRID = 256.0
_PIECES = 8  # straight pieces per drawn stroke (enough for a slight bow at 105 px)


def _missing_message(path: Path) -> str:
    return (f"{path} is missing: the kanji_strokes dataset is rendered from the stroke data of Debian's "
            f"{DEBIAN_PACKAGE} package. Install it with `apt-get install {DEBIAN_PACKAGE}`, or point "
            f"--data_dir at a tfds data_dir that already holds {NAME}.")


def read_strokes(path: Optional[os.PathLike] = None) -> dict[str, np.ndarray]:
    """{kanji: strokes [S, 4] float (x0, y0, x1, y1 on a 256 grid)} from kanjidraw's data.json.

    Raises tfds_offline.DataUnavailableError naming the Debian package when the file is absent."""
    path = Path(path or DATA_JSON)
    if not path.is_file():
        raise tfds_offline.DataUnavailableError(_missing_message(path))
    by_count = json.loads(path.read_bytes())
    return {kanji: np.asarray(strokes, np.float64)
            for group in by_count.values() for kanji, strokes in group.items()}


def choose_characters(strokes: dict[str, np.ndarray], num: int = NUM_CHARACTERS,
                      seed: int = SELECTION_SEED) -> list[str]:
    """`num` kanji of at most MAX_STROKES strokes, drawn with `seed`, no two near-duplicates; in
    code-point order (the label of a character is its index here)."""
    candidates = sorted(k for k, s in strokes.items() if len(s) <= MAX_STROKES)
    order = np.random.default_rng(seed).permutation(len(candidates))
    chosen: list[str] = []
    kept: dict[int, list[np.ndarray]] = {}  # stroke count -> strokes of the kept kanji
    for i in order:
        kanji = candidates[i]
        s = strokes[kanji]
        same = kept.setdefault(len(s), [])
        if same and np.abs(np.stack(same) - s).max(axis=(1, 2)).min() < DUPLICATE_TOLERANCE:
            continue
        same.append(s)
        chosen.append(kanji)
        if len(chosen) == num:
            return sorted(chosen)
    raise ValueError(f"only {len(chosen)} distinct kanji of <= {MAX_STROKES} strokes, {num} requested")


# --------------------------------------------------------------------------
# A drawer's hand and one drawing.
# --------------------------------------------------------------------------


def _style(drawer: int) -> dict:
    """The drawer's hand: the same in every character."""
    rng = np.random.default_rng([STYLE_SEED, drawer])
    return dict(
        slant=float(np.clip(rng.normal(0.0, 0.12), -0.25, 0.25)),  # x += slant * (y - centre)
        rotation=float(rng.normal(0.0, np.deg2rad(2.5))),
        scale=float(rng.uniform(0.72, 0.95)),
        aspect=float(np.exp(rng.normal(0.0, 0.06))),  # width / height
        width=float(rng.uniform(1.8, 3.4)),  # pen width in pixels at 105×105
        sloppiness=float(rng.uniform(0.6, 1.4)),  # scales jitter, warp and bow
    )


def _smooth_warp(rng: np.random.Generator, amplitude: float):
    """A smooth random displacement of the page (3 plane waves per axis, wavelength ~ the
    character's size): nearby points move together, so strokes bend and junctions stay joined."""
    k = rng.normal(0.0, 2 * np.pi / 300.0, size=(2, 3, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(2, 3))
    amp = rng.normal(0.0, amplitude / np.sqrt(3), size=(2, 3))

    def warp(points: np.ndarray) -> np.ndarray:  # [N, 2] on the 256 grid
        shift = [(np.sin(points @ k[axis].T + phase[axis]) * amp[axis]).sum(axis=1) for axis in range(2)]
        return points + np.stack(shift, axis=1)

    return warp


def character_strokes(strokes: np.ndarray, character: str, drawer: int) -> tuple[np.ndarray, np.ndarray]:
    """The strokes of `character` as `drawer` draws them: (polylines [S, _PIECES + 1, 2] in pixel
    coordinates of the 105×105 image, pen widths [S] in pixels). A pure function of
    (strokes, character, drawer)."""
    style = _style(drawer)
    rng = np.random.default_rng([INSTANCE_SEED, ord(character), drawer])
    sloppy = style["sloppiness"]
    n = len(strokes)
    start, end = strokes[:, :2].copy(), strokes[:, 2:].copy()
    # Stroke ends land a little off (σ ≈ 1.4 px at 105 px, more for a sloppy hand).
    start += rng.normal(0.0, 3.5 * sloppy, size=(n, 2))
    end += rng.normal(0.0, 3.5 * sloppy, size=(n, 2))
    # A slight bow: a quadratic Bézier whose control point is off the midpoint by ~7 % of the length.
    mid = (start + end) / 2
    direction = end - start
    normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
    control = mid + normal * rng.normal(0.0, 0.07 * sloppy, size=(n, 1))
    t = np.linspace(0.0, 1.0, _PIECES + 1)[None, :, None]
    curve = (1 - t) ** 2 * start[:, None] + 2 * t * (1 - t) * control[:, None] + t ** 2 * end[:, None]
    flat = _smooth_warp(rng, 5.0 * sloppy)(curve.reshape(-1, 2))
    # The hand's affine transform and this drawing's own small one, about the page centre.
    rotation = style["rotation"] + rng.normal(0.0, np.deg2rad(3.0))
    slant = style["slant"] + rng.normal(0.0, 0.05)
    scale = style["scale"] * np.exp(rng.normal(0.0, 0.05, size=2)) * [np.sqrt(style["aspect"]),
                                                                     1 / np.sqrt(style["aspect"])]
    cos, sin = np.cos(rotation), np.sin(rotation)
    matrix = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, slant], [0.0, 1.0]]) @ np.diag(scale)
    shift = rng.normal(0.0, 9.0, size=2)
    centre = GRID / 2
    flat = (flat - centre) @ matrix.T + centre + shift
    pixels = flat * (IMAGE_SIZE / GRID)
    widths = style["width"] * np.exp(rng.normal(0.0, 0.12, size=n))
    return pixels.reshape(n, _PIECES + 1, 2), widths


def rasterize(polylines: np.ndarray, widths: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Ink coverage [size, size] in [0, 1] of polylines [S, P, 2] (x, y pixel coordinates; pixel
    (i, j) has its centre at x = j + 0.5, y = i + 0.5) drawn with round pens of `widths` [S]:
    a pixel's coverage is clip(w/2 + 1/2 − distance to the polyline, 0, 1), a box-filtered
    anti-aliased edge one pixel wide."""
    ink = np.zeros((size, size))
    for line, width in zip(polylines, widths):
        radius = width / 2
        lo = np.maximum(np.floor(line.min(axis=0) - radius - 1).astype(int), 0)
        hi = np.minimum(np.ceil(line.max(axis=0) + radius + 1).astype(int), size)
        if np.any(hi <= lo):
            continue  # entirely off the page
        xs = np.arange(lo[0], hi[0]) + 0.5
        ys = np.arange(lo[1], hi[1]) + 0.5
        px = np.broadcast_to(xs[None, :], (len(ys), len(xs))).reshape(1, -1)
        py = np.broadcast_to(ys[:, None], (len(ys), len(xs))).reshape(1, -1)
        a, b = line[:-1], line[1:]  # pieces [P-1, 2]
        d = b - a
        length2 = np.maximum((d ** 2).sum(axis=1), 1e-12)[:, None]
        t = np.clip(((px - a[:, :1]) * d[:, :1] + (py - a[:, 1:]) * d[:, 1:]) / length2, 0.0, 1.0)
        dist2 = (px - a[:, :1] - t * d[:, :1]) ** 2 + (py - a[:, 1:] - t * d[:, 1:]) ** 2
        dist = np.sqrt(dist2.min(axis=0)).reshape(len(ys), len(xs))
        cover = np.clip(radius + 0.5 - dist, 0.0, 1.0)
        window = ink[lo[1]:hi[1], lo[0]:hi[0]]
        np.maximum(window, cover, out=window)
    return ink


def render(strokes: np.ndarray, character: str, drawer: int) -> np.ndarray:
    """The image of `character` (its `strokes` [S, 4] from data.json) by `drawer`: uint8
    [105, 105, 1], black ink (0) on white (255) as Omniglot's images."""
    ink = rasterize(*character_strokes(strokes, character, drawer))
    return np.round(255.0 * (1.0 - ink)).astype(np.uint8)[..., None]


# --------------------------------------------------------------------------
# The tfds builder.
# --------------------------------------------------------------------------


def png_bytes(image: np.ndarray) -> bytes:
    """A grayscale uint8 image [H, W, 1] as an 8-bit PNG file: handed to tfds pre-encoded, which
    prepares the set about 3x faster than tfds's own per-image encode op (same pixels)."""
    height, width = image.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


class KanjiStrokes(tfds.core.GeneratorBasedBuilder):
    """tfds `kanji_strokes`: 1 623 characters × 20 drawers rendered from python3-kanjidraw's strokes
    (module docstring). Prepared from the local file only; nothing is downloaded."""

    # tfds reuses a prepared set of the same version: bump it with any change to what is rendered.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "1623 kanji of <= 10 strokes x 20 drawers, 105x105."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                "label": tfds.features.ClassLabel(num_classes=NUM_CHARACTERS),
                "drawer": tfds.features.ClassLabel(num_classes=NUM_DRAWERS),
                "character": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/obfusk/kanjidraw",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        strokes = read_strokes()  # names the Debian package if the file is missing
        digest = hashlib.sha256(DATA_JSON.read_bytes()).hexdigest()
        if digest != DATA_SHA256:
            raise tfds_offline.DataUnavailableError(
                f"{DATA_JSON} has sha256 {digest}, not that of the {DEBIAN_PACKAGE} release this dataset "
                f"version was made from ({DATA_SHA256}): it would render another character set. "
                f"Install that release, or update DATA_SHA256 and KanjiStrokes.VERSION together.")
        return {"train": self._generate_examples(strokes)}

    def _generate_examples(self, strokes: dict[str, np.ndarray]) -> Iterator[tuple[str, dict]]:
        for label, character in enumerate(choose_characters(strokes)):
            for drawer in range(NUM_DRAWERS):
                yield f"{label:04d}_{drawer:02d}", {
                    "image": png_bytes(render(strokes[character], character, drawer)), "label": label,
                    "drawer": drawer, "character": character,
                }


def prepare(data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
    """The prepared `kanji_strokes` builder in `data_dir` (default tfds_offline.default_data_dir()),
    rendered there first if needed (one process at a time per data_dir)."""
    data_dir = data_dir or tfds_offline.default_data_dir()
    builder = KanjiStrokes(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if not DATA_JSON.is_file():  # before taking the lock: the message must name the package
        raise tfds_offline.DataUnavailableError(_missing_message(DATA_JSON))
    with sources.exclusive(data_dir, NAME):
        builder = KanjiStrokes(data_dir=data_dir)  # re-read: another process may have prepared it
        if not builder.is_prepared():
            builder.download_and_prepare()
            sources.record_source(NAME, data_dir, f"{DEBIAN_PACKAGE}'s {DATA_JSON}, rendered by experiments.data.kanji_strokes",
                                  prepared_now=True)
    return builder


def load_kanji_strokes(*, data_dir: Optional[str] = None, image_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """All 1 623 × 20 images [N, image_size, image_size, 1] uint8 and labels [N] (0..1622), resized
    as `episodes.load_omniglot` resizes Omniglot; rendered and cached by tfds on first use."""
    prepare(data_dir)
    data = tfds_offline.load_image_classification(NAME, data_dir=data_dir, splits=("train",),
                                              image_size=image_size, grayscale=True)
    return data["train"]


# --------------------------------------------------------------------------
# Contact sheet: characters × drawers, so a reader can judge the variation.
# --------------------------------------------------------------------------


def contact_sheet(path: str, *, num_characters: int = 8, num_drawers: int = NUM_DRAWERS, seed: int = 0) -> None:
    """Writes a PNG: `num_characters` characters (rows, drawn with `seed` from the 1 623) ×
    `num_drawers` drawers (columns), at 105×105 as stored and at 28×28 as the programs see them."""
    import tensorflow as tf

    from experiments.common.plotting import plt, save_figure

    strokes = read_strokes()
    characters = choose_characters(strokes)
    picked = sorted(np.random.default_rng(seed).choice(len(characters), num_characters, replace=False))
    images = np.stack([[render(strokes[characters[c]], characters[c], d) for d in range(num_drawers)]
                       for c in picked])  # [C, D, 105, 105, 1]
    small = tfds_offline.preprocess_fn((28, 28), True)(tf.constant(images.reshape(-1, *images.shape[2:])), 0)[0]
    small = small.numpy().reshape(num_characters, num_drawers, 28, 28, 1)

    def mosaic(block: np.ndarray, gap: int) -> np.ndarray:
        c, d, h, w, _ = block.shape
        out = np.full((c * (h + gap) - gap, d * (w + gap) - gap), 160, np.uint8)
        for i in range(c):
            for j in range(d):
                out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = block[i, j, ..., 0]
        return out

    big, little = mosaic(images, 3), mosaic(small, 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(num_drawers * 0.9, num_characters * 1.45 + 2),
                                      gridspec_kw={"height_ratios": [big.shape[0] / big.shape[1],
                                                                     little.shape[0] / little.shape[1]]})
    for ax, sheet, size in ((top, big, IMAGE_SIZE), (bottom, little, 28)):
        ax.imshow(sheet, cmap="gray", vmin=0, vmax=255, interpolation="nearest" if size == 28 else "antialiased")
        step = sheet.shape[0] / num_characters
        ax.set_yticks([(i + 0.5) * step for i in range(num_characters)],
                      [f"U+{ord(characters[c]):04X} (label {c}, {len(strokes[characters[c]])} strokes)"
                       for c in picked], fontsize=8)
        step = sheet.shape[1] / num_drawers
        ax.set_xticks([(j + 0.5) * step for j in range(num_drawers)], [str(j) for j in range(num_drawers)], fontsize=8)
        ax.set_xlabel("drawer")
        ax.set_title(f"{size}×{size}" + (" (as stored)" if size == IMAGE_SIZE else
                                         " (as the programs see it: tf.image.resize, antialias, as for Omniglot)"))
    fig.suptitle(f"kanji_strokes: {num_characters} of the {NUM_CHARACTERS} characters × {num_drawers} drawers, "
                 f"rendered from {DEBIAN_PACKAGE}'s strokes")
    fig.tight_layout()
    save_figure(fig, path)

