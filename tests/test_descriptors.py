"""Lesion descriptors: geometry checked on shapes whose answers are known, colours on painted lesions, and the
columns wherever a mask is produced (predict, the API, the service, `describe`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import local_client
from lesionseg.cli import main
from lesionseg.errors import DataError
from lesionseg.segment.colours import COLOURS, grown, square_extreme, srgb_to_lab
from lesionseg.segment.descriptors import PixelSizes, describe, measure

SKIN = (205, 160, 135)
# A lesion of each dermoscopic colour as it looks on that skin: white lighter than the skin, red blood, light and
# dark brown darker by steps, blue-gray bluer than the skin, black.
PAINT = {
    "white": (232, 222, 214),
    "red": (200, 40, 60),
    "light_brown": (170, 115, 80),
    "dark_brown": (95, 55, 35),
    "blue_gray": (100, 110, 135),
    "black": (30, 28, 28),
}


def disc(size: int = 200, radius: float = 60, centre=(100, 100)) -> np.ndarray:
    rows, cols = np.indices((size, size))
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def painted(mask: np.ndarray, colour) -> np.ndarray:
    image = np.empty((*mask.shape, 3), np.uint8)
    image[:] = SKIN
    image[mask] = colour
    return image


def test_a_disc_is_round_symmetric_and_its_diameter_is_twice_the_radius():
    mask = disc()
    d = describe(painted(mask, PAINT["dark_brown"]), mask, pixel_mm=0.05)
    assert d["lesion_pixels"] == mask.sum()
    assert abs(d["diameter_max_px"] - 121) < 2 and abs(d["diameter_min_px"] - 121) < 2
    assert abs(d["diameter_max_mm"] - 121 * 0.05) < 0.1
    assert d["asymmetry_major"] < 0.03 and d["asymmetry_minor"] < 0.03 and d["asymmetry_axes"] == 0
    assert d["compactness"] > 0.95 and d["solidity"] > 0.98
    assert d["colours"] == 1 and d["colours_present"] == "dark_brown" and d["colour_dark_brown"] > 0.95
    assert d["border_abrupt_sectors"] == 8  # dark pigment against skin, cut off sharply all round


def test_an_ellipse_has_two_diameters_and_a_lopsided_shape_is_asymmetric():
    rows, cols = np.indices((200, 300))
    ellipse = ((rows - 100) / 40) ** 2 + ((cols - 150) / 100) ** 2 <= 1
    d = describe(painted(ellipse, PAINT["light_brown"]), ellipse)
    assert abs(d["diameter_max_px"] - 201) < 3 and abs(d["diameter_min_px"] - 81) < 3
    assert d["asymmetry_axes"] == 0
    lopsided = disc(size=200, radius=50) | (
        disc(size=200, radius=30, centre=(100, 160)) & (np.indices((200, 200))[0] < 100)
    )
    d = describe(painted(lopsided, PAINT["dark_brown"]), lopsided)
    assert d["asymmetry_shape_axes"] >= 1 and d["asymmetry_axes"] >= 1
    assert max(d["asymmetry_major"], d["asymmetry_minor"]) > 0.1
    assert d["solidity"] < 0.97


def test_a_wiggly_border_is_less_compact_than_a_smooth_one():
    rows, cols = np.indices((240, 240))
    angle, radius = np.arctan2(rows - 120, cols - 120), np.hypot(rows - 120, cols - 120)
    wiggly = radius <= 70 + 12 * np.sin(12 * angle)
    smooth = radius <= 70
    image = painted(smooth, PAINT["dark_brown"])
    assert describe(image, wiggly)["compactness"] < describe(image, smooth)["compactness"] - 0.2


@pytest.mark.parametrize("name", COLOURS)
def test_each_reference_colour_painted_on_skin_is_found(name):
    mask = disc()
    d = describe(painted(mask, PAINT[name]), mask)
    assert d[f"colour_{name}"] > 0.9 and name in d["colours_present"].split()


def test_two_colours_are_counted_with_their_shares():
    mask = disc()
    image = painted(mask, PAINT["light_brown"])
    image[mask & (np.indices(mask.shape)[1] < 100)] = PAINT["blue_gray"]
    d = describe(image, mask)
    assert d["colours"] == 2 and abs(d["colour_blue_gray"] - 0.5) < 0.05 and abs(d["colour_light_brown"] - 0.5) < 0.05


def test_white_is_lighter_than_the_skin_around_not_any_bright_pixel():
    mask = disc()
    on_tanned = describe(painted(mask, PAINT["white"]), mask)
    pale = np.empty((*mask.shape, 3), np.uint8)
    pale[:] = (244, 236, 230)  # the same lesion on paler skin is darker than its skin: not white
    pale[mask] = PAINT["white"]
    on_pale = describe(pale, mask)
    assert "white" in on_tanned["colours_present"] and "white" not in on_pale["colours_present"]


def test_a_brown_lesion_reads_the_same_under_a_pink_cast():
    mask = disc()
    image = painted(mask, PAINT["light_brown"])
    image[mask & (np.indices(mask.shape)[1] < 100)] = PAINT["dark_brown"]
    cast = np.clip(image * np.array([1.0, 0.85, 0.95]), 0, 255).astype(np.uint8)  # a camera's magenta tint
    assert describe(cast, mask)["colours_present"] == describe(image, mask)["colours_present"]


def test_reflections_hair_and_the_vignette_are_no_colour_of_the_lesion():
    mask = disc()
    image = painted(mask, PAINT["light_brown"])
    rows, cols = np.indices(mask.shape)
    image[(np.abs(rows - cols) <= 1) | (np.abs(rows + cols - 180) <= 1)] = (25, 20, 20)  # two hairs across
    image[(rows - 80) ** 2 + (cols - 90) ** 2 <= 36] = (255, 255, 255)  # a reflection
    image[np.hypot(rows - 100, cols - 100) > 120] = (5, 5, 5)  # the dermoscope's dark corners
    d = describe(image, mask)
    assert d["colours_present"] == "light_brown" and d["colour_black"] == 0 and d["colour_white"] == 0
    assert 0.02 < d["colour_unreadable"] < 0.2


def test_a_round_lesion_with_pigment_on_one_side_is_asymmetric_in_colour():
    mask = disc()
    image = painted(mask, PAINT["light_brown"])
    image[mask & (np.indices(mask.shape)[1] < 100)] = PAINT["dark_brown"]
    d = describe(image, mask)
    assert d["asymmetry_shape_axes"] == 0 and d["asymmetry_axes"] == 1
    assert max(d["asymmetry_colour_major"], d["asymmetry_colour_minor"]) > 0.9
    even = describe(painted(mask, PAINT["light_brown"]), mask)
    assert even["asymmetry_axes"] == 0 and even["asymmetry_colour_major"] < 0.05


def test_the_drawing_shows_the_axes_in_own_pixels_and_why_each_is_asymmetric():
    rows, cols = np.indices((200, 300))
    ellipse = ((rows - 100) / 40) ** 2 + ((cols - 150) / 100) ** 2 <= 1
    image = painted(ellipse, PAINT["light_brown"])
    image[ellipse & (rows < 100)] = PAINT["dark_brown"]  # the top half darker: asymmetric about the major axis
    drawing = measure(image, ellipse).drawing()
    major, minor = drawing["axes"]
    (x0, y0), (x1, y1) = sorted(major["ends"])
    assert abs(y0 - 100.5) < 2 and abs(y1 - 100.5) < 2 and abs(x1 - x0 - 200) < 6  # horizontal, 200 px long
    assert major["asymmetric_in"] == ["colour"] and minor["asymmetric_in"] == []
    width, height = drawing["classes_size"]
    classes = np.array(drawing["classes"]).reshape(height, width)
    assert set(np.unique(classes)) == {COLOURS.index("light_brown"), COLOURS.index("dark_brown"), 255}  # 255: outside


def test_the_lab_conversion_is_the_cie_one():
    assert np.allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=0.1)
    assert np.allclose(srgb_to_lab(np.array([255, 0, 0])), [53.24, 80.09, 67.20], atol=0.2)


def test_a_reduced_picture_gives_nearly_the_same_answers():
    mask = disc(size=400, radius=120, centre=(200, 200))
    full = describe(painted(mask, PAINT["dark_brown"]), mask)
    reduced = describe(painted(mask, PAINT["dark_brown"])[::4, ::4].copy(), mask)
    assert abs(reduced["diameter_max_px"] - full["diameter_max_px"]) < 0.02 * full["diameter_max_px"]
    assert reduced["lesion_pixels"] == full["lesion_pixels"] and reduced["colours"] == full["colours"]


def test_every_row_has_every_declared_column():
    from lesionseg.segment.descriptors import COLUMNS

    empty = describe(np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20), bool))
    assert list(empty) == list(COLUMNS) and empty["lesion_pixels"] == 0
    assert all(value is None for name, value in empty.items() if name != "lesion_pixels")
    mask = disc(size=60, radius=20, centre=(30, 30))
    full = describe(painted(mask, PAINT["dark_brown"]), mask)
    assert list(full) == list(COLUMNS) and full["area_mm2"] is None and full["diameter_max_px"] > 0


def test_pixel_sizes_from_a_number_or_a_csv(tmp_path):
    assert PixelSizes("0.02").of("x") == 0.02 and PixelSizes().of("x") is None
    table = tmp_path / "sizes.csv"
    table.write_text("image,pixel_mm\nISIC_1.jpg,0.03\n")
    assert PixelSizes(str(table)).of("ISIC_1") == 0.03 and PixelSizes(str(table)).of("other") is None
    table.write_text("image,pixel_mm\nISIC_1.jpg,abc\n")
    with pytest.raises(DataError, match="line 2: pixel_mm 'abc' is not a number"):
        PixelSizes(str(table))
    with pytest.raises(DataError, match="not in"):
        PixelSizes("-1")


def test_describe_reads_masks_from_anywhere_and_names_what_it_skips(tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    mask = disc()
    Image.fromarray(painted(mask, PAINT["dark_brown"])).save(images / "a.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(masks / "a_Segmentation.png")
    Image.fromarray(painted(mask, PAINT["red"])).save(images / "b.png")  # no mask
    Image.fromarray(painted(mask, PAINT["red"])).save(images / "c.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "c.png")  # wrong size
    out = tmp_path / "table.csv"
    assert (
        main(
            [
                "describe",
                "--images",
                str(images),
                "--masks",
                str(masks),
                "--out",
                str(out),
                "--pixel-size",
                "0.05",
                "--no-progress",
            ]
        )
        == 1
    )
    said = capsys.readouterr()
    assert "described 1 lesion(s)" in said.out and "b.png: no mask" in said.err and "mask is 10x10" in said.err
    rows = json.loads(out.with_suffix(".json").read_text())
    assert rows[0]["colours_present"] == "dark_brown" and abs(rows[0]["diameter_max_mm"] - 6.05) < 0.1


def test_predict_rows_the_api_and_the_service_carry_the_descriptors(tmp_path):

    import lesionseg
    from lesionseg.api import load_predictor
    from lesionseg.segment.serve import create_app

    mask = disc(size=160, radius=45, centre=(80, 80))
    photo = tmp_path / "photos" / "lesion.png"
    photo.parent.mkdir()
    Image.fromarray(painted(mask, PAINT["dark_brown"])).save(photo)
    out = tmp_path / "out"
    assert main(["predict", str(photo.parent), "--out", str(out), "--no-progress", "--pixel-size", "0.1"]) == 0
    row = json.loads((out / "predictions.json").read_text())[0]
    assert (
        list(row).count("lesion_pixels") == 1
        and "area_px" not in row
        and row["diameter_max_mm"] == pytest.approx(row["diameter_max_px"] * 0.1, abs=0.01)
    )
    result = lesionseg.load().segment(photo)
    assert result.descriptors["lesion_pixels"] == row["lesion_pixels"] and "colours" in result.descriptors
    reply = (
        local_client(create_app(load_predictor()))
        .post("/predict", files={"file": ("l.png", photo.read_bytes())})
        .json()
    )
    assert reply["descriptors"]["lesion_pixels"] == row["lesion_pixels"]
    axes = reply["drawing"]["axes"]  # the page draws the two axes and the colour regions
    assert [a["axis"] for a in axes] == ["major", "minor"] and len(reply["drawing"]["classes"]) == (
        reply["drawing"]["classes_size"][0] * reply["drawing"]["classes_size"][1]
    )
    assert math.isfinite(reply["descriptors"]["compactness"])


def test_a_one_or_two_pixel_lesion_is_symmetric_and_as_long_as_it_is(recwarn):
    image = np.full((20, 20, 3), 120, np.uint8)
    for cells, length in (
        ([(5, 5)], 1.0),
        ([(5, 5), (5, 6)], 2.0),
        ([(5, 5), (6, 6)], 2.41),
        ([(2, 2), (4, 4), (6, 6)], 6.66),
    ):
        mask = np.zeros((20, 20), bool)
        mask[tuple(np.array(cells).T)] = True
        described = describe(image, mask)
        assert described["diameter_max_px"] == pytest.approx(length, abs=0.01)
        assert described["asymmetry_axes"] == 0 or len(cells) == 3
    assert not [w for w in recwarn if "numpy" in str(w.filename) or "Degrees of freedom" in str(w.message)]


def test_describe_tells_masks_from_images_in_one_folder_and_names_what_it_cannot_read(tmp_path, capsys):
    both = tmp_path / "both"
    both.mkdir()
    image = np.full((40, 50, 3), 200, np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 10:40] = 255
    image[mask > 0] = 80
    for stem in ("a", "b"):
        Image.fromarray(image).save(both / f"{stem}.jpg")
        Image.fromarray(mask).save(both / f"{stem}_Segmentation.png")
    (both / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(both / "pipe.png")
    code = main(
        ["describe", "--images", str(both), "--masks", str(both), "--out", str(tmp_path / "d.csv"), "--no-progress"]
    )
    said = capsys.readouterr()
    assert "described 2 lesion(s)" in said.out and code == 1  # two described, two named as unreadable
    assert "gone.jpg: a broken symbolic link" in said.err and "pipe.png: not a regular file" in said.err
    assert (
        main(["describe", "--images", str(both / "a.jpg"), "--masks", str(both), "--out", str(tmp_path / "e.csv")]) == 2
    )
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="Debian's chromium is not installed")
def test_both_pages_draw_the_lesions_axes_and_colours(tmp_path):
    """The service's page: the table's per-axis rows, the colour view and the axes change the picture. The review
    page: L shows the measured lesion of the mask it holds, and measures again after a brush stroke."""
    from playwright.sync_api import sync_playwright

    from conftest import served
    from lesionseg.api import load_predictor
    from lesionseg.segment.serve import create_app
    from test_review import app_for, predicted_folder
    from test_review_door import launched

    shots = Path(os.environ.get("LESIONSEG_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    mask = disc(size=160, radius=45, centre=(80, 80))
    photo = painted(mask, PAINT["light_brown"])
    photo[mask & (np.indices(mask.shape)[1] < 80)] = PAINT["dark_brown"]
    Image.fromarray(photo).save(tmp_path / "lesion.png")
    with sync_playwright() as p, served(create_app(load_predictor())) as url:
        browser = launched(p)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(url)
        page.set_input_files("#file", str(tmp_path / "lesion.png"))
        page.wait_for_selector("section.result canvas")
        page.wait_for_function("document.querySelector('[data-descriptor=\"major axis\"]') !== null")
        table = page.text_content("table.lesion")
        assert "major axis" in table and "structure" in table and "dark brown" in table
        canvas = "document.querySelector('section.result canvas').toDataURL()"
        with_axes = page.evaluate(canvas)
        page.click("input.axes")
        assert page.evaluate(canvas) != with_axes
        page.click("input[value=colours]")
        page.click("input.axes")
        page.screenshot(path=shots / "serve-lesion.png")
        browser.close()
    (tmp_path / "review").mkdir()
    out = predicted_folder(tmp_path / "review", count=2)
    with sync_playwright() as p, served(app_for(out)) as url:
        browser = launched(p)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(url)
        page.wait_for_function("performance.getEntriesByName('opened-0').length === 1")
        page.keyboard.press("l")
        page.wait_for_function("performance.getEntriesByName('measured-0').length === 1")
        assert not page.locator("#measured").is_hidden() and "minor axis" in page.text_content("#measured")
        page.keyboard.press("b")
        box = page.locator("#overlay").bounding_box()
        page.mouse.move(box["x"] + 3, box["y"] + 3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + 8, steps=4)
        page.mouse.up()
        page.wait_for_function("performance.getEntriesByName('measured-0').length === 2")
        page.screenshot(path=shots / "review-lesion.png")
        assert not (out / "review" / "review.jsonl").exists()  # measuring saves nothing
        browser.close()


@pytest.mark.parametrize("shape", [(128, 128), (90, 170), (7, 3), (1, 1)])
def test_the_fast_morphology_equals_scipys(shape):
    """hair's closing and the halo of reflections and hair are written with slices for speed: the same pixels as
    ndimage's grey closing and binary dilation, on any picture size."""
    rng = np.random.default_rng(sum(shape))
    lightness = (rng.random(shape) * 100).astype(np.float32)
    closing = square_extreme(square_extreme(lightness, 7, np.maximum), 7, np.minimum)
    assert np.array_equal(closing, ndimage.grey_closing(lightness, size=(7, 7)))
    for share in (0.0, 0.05, 0.5):
        mask = rng.random(shape) < share
        assert np.array_equal(grown(mask), ndimage.binary_dilation(mask))
