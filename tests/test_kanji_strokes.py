"""kanji_strokes (experiments/data/kanji_strokes.py): the renderer is a pure function of (character,
drawer) whose drawers differ without losing the character, the tfds set holds exactly what it
renders, the program splits it 1200 / 100 / 323 as Omniglot, a missing Debian file is a clear
error, and `experiments.omniglot --quick --dataset=kanji_strokes` runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from experiments.data import tfds_offline
from experiments.models import fewshot as fsm
from experiments.data import kanji_strokes as K
from experiments.common import program
from experiments import omniglot as om
import program_runs  # noqa: E402

needs_kanjidraw = pytest.mark.skipif(not K.DATA_JSON.is_file(),
                                     reason=f"{K.DATA_JSON} is absent (apt-get install python3-kanjidraw)")


@pytest.fixture(scope="module")
def strokes() -> dict:
    return K.read_strokes()


@pytest.fixture(scope="module")
def characters(strokes) -> list:
    return K.choose_characters(strokes)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tfds data_dir holding the whole rendered set (prepared once per module: ~1-2 min)."""
    data_dir = tmp_path_factory.mktemp("kanji_tfds")
    K.prepare(str(data_dir))
    return data_dir


def to_28(images: np.ndarray) -> np.ndarray:
    """As the programs resize (the Omniglot path's preprocessing), ink in [0, 1]."""
    small = tfds_offline.preprocess_fn((28, 28), True)(tf.constant(images), 0)[0].numpy()
    return 1.0 - small.astype(np.float64) / 255.0


# --------------------------------------------------------------------------
# Characters and the renderer.
# --------------------------------------------------------------------------


@needs_kanjidraw
def test_characters_are_1623_distinct_seeded_kanji_of_few_strokes(strokes, characters):
    assert len(characters) == len(set(characters)) == K.NUM_CHARACTERS
    assert characters == sorted(characters) == K.choose_characters(K.read_strokes())
    assert max(len(strokes[c]) for c in characters) <= K.MAX_STROKES
    # No two chosen kanji are near-copies (same stroke count, every stroke end within the tolerance).
    by_count: dict = {}
    for c in characters:
        by_count.setdefault(len(strokes[c]), []).append(strokes[c])
    for group in by_count.values():
        s = np.stack(group)
        gap = np.abs(s[:, None] - s[None]).max(axis=(2, 3)) + np.diag(np.full(len(s), np.inf))
        assert gap.min() >= K.DUPLICATE_TOLERANCE
    # Another seed draws another set: the choice is the seed's, not the file order's.
    assert K.choose_characters(strokes, seed=K.SELECTION_SEED + 1) != characters


@needs_kanjidraw
def test_render_is_a_pure_function_of_character_and_drawer(strokes, characters):
    picks = characters[::400]
    first = {(c, d): K.render(strokes[c], c, d) for c in picks for d in (0, 7, 19)}
    # Again in another order, after other drawings, from a fresh read of the file.
    again = K.read_strokes()
    for (c, d) in reversed(list(first)):
        K.render(again[c], c, (d + 1) % K.NUM_DRAWERS)
        np.testing.assert_array_equal(K.render(again[c], c, d), first[(c, d)])
    image = first[(picks[0], 0)]
    assert image.shape == (105, 105, 1) and image.dtype == np.uint8
    assert image.max() == 255 and image.min() == 0  # white page, black ink, as Omniglot
    assert 0.02 < (image < 128).mean() < 0.4


@needs_kanjidraw
def test_drawers_differ_but_keep_the_character(strokes, characters):
    """Not copies: any two drawers' 105x105 ink overlaps less than 90% (IoU). Still the same
    character: 5-way 1-shot by the nearest neighbour in raw 28x28 pixels, with support and query
    by different drawers, is far above chance (20%); measured 57%."""
    rng = np.random.default_rng(0)
    picked = [characters[i] for i in rng.choice(len(characters), 60, replace=False)]
    images = np.stack([[K.render(strokes[c], c, d) for d in range(K.NUM_DRAWERS)] for c in picked])
    ink = images[..., 0] < 128  # [C, D, 105, 105]
    flat = ink.reshape(len(picked), K.NUM_DRAWERS, -1)
    inter = np.einsum("cip,cjp->cij", flat.astype(np.int32), flat.astype(np.int32))
    counts = flat.sum(-1)
    iou = inter / (counts[:, :, None] + counts[:, None, :] - inter)
    off_diagonal = iou[:, ~np.eye(K.NUM_DRAWERS, dtype=bool)]
    assert off_diagonal.max() < 0.9, off_diagonal.max()
    assert np.median(off_diagonal) < 0.5
    small = to_28(images.reshape(-1, 105, 105, 1)).reshape(len(picked), K.NUM_DRAWERS, -1)
    correct = []
    for _ in range(600):
        ways = rng.choice(len(picked), 5, replace=False)
        shot, query = rng.choice(K.NUM_DRAWERS, 2, replace=False)
        distance = ((small[ways, query][:, None] - small[ways, shot][None]) ** 2).sum(-1)
        correct.append(distance.argmin(axis=1) == np.arange(5))
    assert np.mean(correct) > 0.4, np.mean(correct)


@needs_kanjidraw
def test_a_drawer_keeps_a_hand_across_characters(strokes, characters):
    """The pen width is the drawer's (up to a per-stroke wobble): the ink per stroke length of
    the thickest- and thinnest-drawn hands is ordered the same in every character."""
    widths = np.array([K._style(d)["width"] for d in range(K.NUM_DRAWERS)])
    thick, thin = int(widths.argmax()), int(widths.argmin())
    for c in characters[::200]:
        assert (K.render(strokes[c], c, thick) < 128).mean() > (K.render(strokes[c], c, thin) < 128).mean()


def test_rasterizer_draws_a_segment_of_the_right_width_and_length():
    """A horizontal segment from x=20 to x=80 at y=50.5, pen width 4: coverage clip(2.5 - d, 0, 1)
    at distance d (full within 1.5 px, half at 2 px, none from 2.5 px), round caps, and an
    area of a 60 x 4 rectangle plus a disc of radius 2."""
    line = np.array([[[20.0, 50.5], [50.0, 50.5], [80.0, 50.5]]])
    ink = K.rasterize(line, np.array([4.0]), size=105)
    assert np.all(ink[49:52, 20:81] == 1.0)  # pixel centres within 1 of the line
    assert np.all(ink[[48, 52], 20:80] == 0.5)  # 2 px from the line: half covered
    assert np.all(ink[:48] == 0) and np.all(ink[53:] == 0)
    assert ink[50, 18] == 1 and ink[50, 17] == 0 and ink[50, 81] == 1 and ink[50, 82] == 0  # caps of radius 2
    area = ink.sum()  # a 60 x 4 rectangle plus a disc of radius 2
    assert abs(area - (60 * 4 + np.pi * 4)) < 3


@needs_kanjidraw
def test_contact_sheet_is_written(tmp_path):
    path = tmp_path / "sheet.png"
    K.contact_sheet(str(path), num_characters=2, num_drawers=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_png_bytes_decode_to_the_same_pixels():
    image = np.random.default_rng(3).integers(0, 256, size=(105, 105, 1), dtype=np.uint8)
    np.testing.assert_array_equal(tf.io.decode_png(K.png_bytes(image)).numpy(), image)


# --------------------------------------------------------------------------
# A missing or different file.
# --------------------------------------------------------------------------


def test_missing_file_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(K, "DATA_JSON", tmp_path / "absent" / "data.json")
    with pytest.raises(tfds_offline.DataUnavailableError, match=r"apt-get install python3-kanjidraw"):
        K.prepare(str(tmp_path / "tfds"))
    with pytest.raises(tfds_offline.DataUnavailableError, match=r"absent/data.json is missing"):
        K.read_strokes()
    with pytest.raises(tfds_offline.DataUnavailableError, match="python3-kanjidraw"):  # what the program calls
        fsm.load_meta_data("kanji_strokes", data_dir=str(tmp_path / "tfds"), local_dir=None, image_size=28,
                           class_split=(1200, 100, 323), rotations=False, seed=0)
    assert not (tmp_path / "tfds" / "kanji_strokes").exists()


def test_another_data_json_is_refused_by_checksum(tmp_path, monkeypatch):
    other = tmp_path / "data.json"
    other.write_text(json.dumps({"1": {"一": [[25, 126, 226, 116]]}}))
    monkeypatch.setattr(K, "DATA_JSON", other)
    with pytest.raises(tfds_offline.DataUnavailableError, match="sha256"):
        K.prepare(str(tmp_path / "tfds"))


# --------------------------------------------------------------------------
# The prepared tfds set and the program's split (slow: renders all 32 460 images once).
# --------------------------------------------------------------------------


@needs_kanjidraw
@pytest.mark.slow
def test_prepared_set_holds_what_render_draws(prepared, strokes, characters):
    builder = K.prepare(str(prepared))
    assert builder.info.splits["train"].num_examples == K.NUM_CHARACTERS * K.NUM_DRAWERS
    checked = 0
    for example in builder.as_dataset(split="train", shuffle_files=False).take(40).as_numpy_iterator():
        label, drawer = int(example["label"]), int(example["drawer"])
        character = example["character"].decode()
        assert characters[label] == character
        np.testing.assert_array_equal(example["image"], K.render(strokes[character], character, drawer))
        checked += 1
    assert checked == 40


@needs_kanjidraw
@pytest.mark.slow
def test_program_splits_1200_100_323_disjoint_characters(prepared):
    fv = flags.FlagValues()
    program.define_flags(om.PROGRAM, fv)
    fv(["omniglot", "--dataset=kanji_strokes", f"--data_dir={prepared}"])
    cfg = program.config_from_flags(om.PROGRAM, fv)
    assert cfg.class_split == (1200, 100, 323) and cfg.rotations is False and cfg.eval_tasks >= 600
    data = fsm.load_meta_data(cfg.dataset, data_dir=cfg.data_dir, local_dir=None, image_size=cfg.image_size,
                              class_split=cfg.class_split, rotations=cfg.rotations, seed=cfg.seed)
    assert data.images.shape == (K.NUM_CHARACTERS * K.NUM_DRAWERS, 28, 28, 1) and data.images.dtype == np.uint8
    assert np.array_equal(np.bincount(data.labels), np.full(K.NUM_CHARACTERS, K.NUM_DRAWERS))
    pools = {name: set(pool.tolist()) for name, pool in data.pools.items()}
    assert {name: len(pool) for name, pool in pools.items()} == {"train": 1200, "val": 100, "test": 323}
    assert not (pools["train"] & pools["val"] or pools["train"] & pools["test"] or pools["val"] & pools["test"])
    assert pools["train"] | pools["val"] | pools["test"] == set(range(K.NUM_CHARACTERS))
    # Resized exactly as the Omniglot path resizes (tfds_offline.preprocess_fn on the stored image).
    builder = K.prepare(str(prepared))
    example = next(builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator())
    index = np.flatnonzero(data.labels == example["label"])
    resized = tfds_offline.preprocess_fn((28, 28), True)(tf.constant(example["image"]), 0)[0].numpy()
    assert any(np.array_equal(data.images[i], resized) for i in index)


@needs_kanjidraw
@pytest.mark.slow
def test_quick_run_of_the_one_shot_program_on_kanji_strokes(prepared, tmp_path):
    # The kanji data through the program: 1-RMD and the short-horizon baseline. The program's other
    # parts run on other data: full RMD in test_omniglot's kill/resume test, Fig. 7 plot 4 and the
    # interleaved timing in its real-MNIST run (each method traces its own trainer: ~20 CPU s).
    out = tmp_path / "out"
    code, output = program_runs.run(
        ["-m", "experiments.omniglot", "--quick", "--dataset=kanji_strokes", f"--data_dir={prepared}",
         f"--output_dir={out}", "--truncate=1", "--relerr_truncations=", "--timing_rounds=0"],
        tmp_path / "run.log", timeout=1200)
    assert code == 0, output[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"] == "kanji_strokes"
    assert results["config"]["class_split"] == [1200, 100, 323] and results["config"]["rotations"] is False
    assert "kanji_strokes" in results["data_description"] and "python3-kanjidraw" in results["data_source"]
    assert set(results["runs"]) == {"1", "short_horizon"}
    for run in results["runs"].values():
        assert run["test_tasks"] == 4 and 0.0 <= run["test_accuracy"] <= 1.0
        assert np.isfinite(run["test_accuracy_ci95"]) and run["record"]["sec_per_iter"] > 0
    assert results["runs"]["1"]["record"]["cosine"]  # the cosine to full RMD (--exact_every)
    assert results["export"]["bit_identical_to_meta_training_representation"]
    assert (out / "fig7_one_shot.png").stat().st_size > 0
    assert "Short horizon (T=1)" in output and "Paper (Omniglot)" in output
