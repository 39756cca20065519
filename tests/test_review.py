"""The report page's review pictures (jobs.report.review) and its section of the night's highest-scoring scans.

The pictures are decoded with Pillow and checked against what numpy says of the planted data: where a bright cube
lies under the radiological display convention, which voxels the highest-scoring window covers, a brute-force 3-D
heat volume. The section is rendered from a hand-made report (no Ray), then by a real headless browser.
"""

import base64
import io
import re
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from jobs.inputs.windows import window_grid
from jobs.report import read_page_data, render, summarize
from jobs.report.review import data_uri, review_png, slice_heat

PANEL = 160
FIT = PANEL - 2  # a slice fits inside a 1-pixel black margin of its tile


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(np.int32)


def tiles(pixels: np.ndarray, panel: int = PANEL) -> list[np.ndarray]:
    """The three panels of a strip: axial, coronal, sagittal."""
    assert pixels.shape == (panel, 3 * panel, 3)
    return [pixels[:, n * panel : (n + 1) * panel] for n in range(3)]


def shown(lo: int, hi: int, n: int) -> tuple[float, float]:
    """Where voxels [lo, hi) of an axis of n voxels land in a tile holding a square slice (FIT pixels, centred),
    shown DESCENDING (the radiological convention for every axis of every view): the pixel interval [first, last)."""
    offset = (PANEL - FIT) / 2
    return offset + (n - hi) * FIT / n, offset + (n - lo) * FIT / n


def cyan(tile: np.ndarray) -> np.ndarray:
    return (tile[..., 0] < 90) & (tile[..., 1] > 170) & (tile[..., 2] > 170)


# Views: (fixed axis, row axis, column axis); volume axes are RAS x, y, z.
VIEWS = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


# --- the picture ----------------------------------------------------------------------------------------------


def test_three_panels_at_the_physical_aspect_and_a_constant_volume_is_mid_grey():
    """Anisotropic voxels: x 40 x 2 mm = 80 mm, y 60 x 1 mm = 60 mm, z 30 x 3 mm = 90 mm. Worked by hand, in
    158 x 158 pixels (the tile less its 1-pixel margin): axial (x wide, y high) 80 x 60 mm -> 158 x 118.5 px;
    coronal (x, z) 80 x 90 -> 140.4 x 158; sagittal (y, z) 60 x 90 -> 105.3 x 158; each centred in its tile,
    on black."""
    volume = np.full((40, 60, 30), 3.7, np.float32)
    pixels = decode(review_png(volume, (2.0, 1.0, 3.0), (20, 30, 15)))
    for tile, (width, height) in zip(tiles(pixels), ((158, 118.5), (140.4, 158), (105.3, 158)), strict=True):
        drawn = tile.max(axis=-1) > 0
        rows, cols = np.nonzero(drawn)
        assert (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1) == pytest.approx((width, height), abs=1)
        assert cols.min() == pytest.approx((PANEL - width) / 2, abs=1) and rows.min() == pytest.approx(
            (PANEL - height) / 2, abs=1
        )
        assert np.all(np.abs(tile[drawn] - 128) <= 2), "a constant volume is drawn mid-grey"
        assert not tile[[0, -1]].any() and not tile[:, [0, -1]].any(), "a black margin around each slice"
    # Bigger panels: the same proportions.
    big = decode(review_png(volume, (2.0, 1.0, 3.0), (20, 30, 15), panel=300))
    assert big.shape == (300, 900, 3)


def test_a_bright_cube_shows_where_the_radiological_convention_puts_it():
    """A cube at high x (the patient's right), low y (posterior), high z (superior): on the LEFT of the axial and
    coronal panels, at the bottom of the axial one (anterior is up), at the top of the coronal and sagittal ones,
    on the right of the sagittal one (anterior is on the left)."""
    n = 48
    rng = np.random.default_rng(3)
    volume = np.clip(rng.normal(0, 1, (n, n, n)), -3, 3).astype(np.float32)
    cube = ((32, 40), (6, 14), (28, 36))  # voxels [lo, hi) along x, y, z
    volume[tuple(slice(lo, hi) for lo, hi in cube)] = 10.0
    centre = [np.mean(c) - 0.5 for c in cube]  # the cube's centre voxel coordinates: (35.5, 9.5, 31.5)
    for view, tile in zip(VIEWS, tiles(decode(review_png(volume, (1.0, 1.0, 1.0), centre))), strict=True):
        _, row_axis, col_axis = VIEWS[view]
        bright = tile.mean(axis=-1) > 200
        rows, cols = np.nonzero(bright)
        assert len(rows) > 300, view
        col_first, col_last = shown(*cube[col_axis], n)
        row_first, row_last = shown(*cube[row_axis], n)
        assert (cols.min(), cols.max() + 1) == pytest.approx((col_first, col_last), abs=2), view
        assert (rows.min(), rows.max() + 1) == pytest.approx((row_first, row_last), abs=2), view
        # Nothing bright elsewhere: the noise stays grey.
        assert bright.sum() == pytest.approx((col_last - col_first) * (row_last - row_first), rel=0.15), view
    axial, coronal, sagittal = (
        np.nonzero(t.mean(axis=-1) > 200) for t in tiles(decode(review_png(volume, (1, 1, 1), centre)))
    )
    assert axial[1].mean() < PANEL / 2 and coronal[1].mean() < PANEL / 2, "the patient's right on the viewer's left"
    assert axial[0].mean() > PANEL / 2, "posterior at the bottom of the axial panel"
    assert coronal[0].mean() < PANEL / 2 and sagittal[0].mean() < PANEL / 2, "superior up"
    assert sagittal[1].mean() > PANEL / 2, "posterior on the right of the sagittal panel"


def test_the_slices_cross_at_the_centre():
    """A cube the slices miss is not drawn; a centre outside the volume is clipped into it."""
    volume = np.zeros((30, 30, 30), np.float32)
    volume[2:6, 2:6, 2:6] = 1.0
    volume[20:24, 20:24, 20:24] = 0.5
    far = decode(review_png(volume, (1, 1, 1), (21.7, 22.2, 21.4)))
    near = decode(review_png(volume, (1, 1, 1), (-5, 3.4, 2.6)))  # x clipped to 0: the sagittal slice misses the cube
    for tile in tiles(far):
        assert tile.max() > 200, "the cube at (20..24) is in every slice through (22, 22, 21)"
    axial, coronal, sagittal = tiles(near)
    assert axial.max() > 200 and coronal.max() > 200 and sagittal.max() == 0


def test_grey_levels_are_windowed_robustly():
    """One extreme voxel neither blacks out the slices (1st-99th percentile window) nor, alone on a flat
    background, disappears (the full range when the percentiles coincide)."""
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, 32, dtype=np.float32)[None, :, None], (32, 32, 32)).copy()
    ramp[16, 16, 16] = 1e6
    axial, _, sagittal = tiles(decode(review_png(ramp, (1, 1, 1), (16, 16, 16))))
    for tile in (axial, sagittal):  # y varies in them
        grey = tile[1:-1, 1:-1, 0]
        assert grey.std() > 50 and grey.min() < 20 and grey.max() > 235, "the ramp spans black to white"
    flat = np.zeros((32, 32, 32), np.float32)
    flat[16, 16, 16] = 5.0
    for tile in tiles(decode(review_png(flat, (1, 1, 1), (16, 16, 16)))):
        assert tile.max() > 200 and np.median(tile) == 0


def grid_case(seed: int = 0, shape=(48, 48, 48), roi=(16, 16, 16), overlap=0.25):
    rng = np.random.default_rng(seed)
    volume = rng.normal(0, 1, shape).astype(np.float32)
    grid = window_grid(shape, roi, overlap)
    scores = rng.uniform(0.1, 0.5, grid.count)
    best = int(np.ravel_multi_index((2, 1, 2), grid.shape))
    scores[best] = 0.9
    return volume, grid, scores, best


def box_of(grid, index):
    start = grid.start_of(index)
    lo = [max(0, s - p) for s, p in zip(start, grid.pad_before, strict=True)]
    hi = [min(n, s - p + r) for s, p, r, n in zip(start, grid.pad_before, grid.roi_size, grid.image_size, strict=True)]
    return lo, hi


def test_the_heat_is_warmer_in_the_highest_scoring_window_and_its_box_is_outlined():
    volume, grid, scores, best = grid_case()
    assert grid.shape == (4, 4, 4)
    centre = grid.centre_voxel(best)
    plain = tiles(decode(review_png(volume, (1, 1, 1), centre)))
    hot = tiles(decode(review_png(volume, (1, 1, 1), centre, grid=grid, window_scores=scores, max_window=best)))
    lo, hi = box_of(grid, best)
    n = volume.shape[0]
    for view, before, after in zip(VIEWS, plain, hot, strict=True):
        _, row_axis, col_axis = VIEWS[view]
        c0, c1 = shown(lo[col_axis], hi[col_axis], n)
        r0, r1 = shown(lo[row_axis], hi[row_axis], n)
        rr, cc = np.mgrid[:PANEL, :PANEL]
        inside = (cc >= c0 + 3) & (cc < c1 - 3) & (rr >= r0 + 3) & (rr < r1 - 3)
        outside = (cc < c0 - 3) | (cc >= c1 + 3) | (rr < r0 - 3) | (rr >= r1 + 3)
        warmth = (after[..., 0] - after[..., 2]) - (before[..., 0] - before[..., 2])
        change = np.abs(after - before).sum(axis=-1)
        assert warmth[inside].mean() > warmth[outside].mean() + 60, view
        assert change[inside].mean() > change[outside].mean() + 60, view
        assert np.all(np.abs(before[..., 0] - before[..., 2]) <= 2), "without scores: grey, no heat"
        # The outline: cyan pixels on the box's edges, none far from them, none without a max window.
        edges = cyan(after)
        rows, cols = np.nonzero(edges)
        assert len(rows) > 100, view
        assert (cols.min(), cols.max() + 1) == pytest.approx((c0, c1), abs=2), view
        assert (rows.min(), rows.max() + 1) == pytest.approx((r0, r1), abs=2), view
        assert not edges[inside].any()
        assert not cyan(before).any()


def test_the_box_is_drawn_only_where_a_slice_cuts_it():
    volume, grid, scores, best = grid_case()
    corner = 0  # window (0, 0, 0): voxels 0..16 on every axis; the slices cross at the volume centre, 24
    hot = tiles(decode(review_png(volume, (1, 1, 1), (24, 24, 24), grid=grid, window_scores=scores, max_window=corner)))
    assert not any(cyan(tile).any() for tile in hot)
    hot = tiles(decode(review_png(volume, (1, 1, 1), (8, 24, 24), grid=grid, window_scores=scores, max_window=corner)))
    assert [bool(cyan(tile).any()) for tile in hot] == [False, False, True], "only the sagittal slice x=8 cuts it"


def test_equal_scores_give_a_uniform_light_overlay():
    volume = np.full((40, 40, 40), 1.0, np.float32)
    grid = window_grid(volume.shape, (16, 16, 16), 0.5)
    pixels = tiles(
        decode(review_png(volume, (1, 1, 1), (20, 20, 20), grid=grid, window_scores=np.full(grid.count, 0.8)))
    )
    for tile in pixels:
        colours = tile[1:-1, 1:-1].reshape(-1, 3)  # inside the black margin
        assert np.ptp(colours, axis=0).max() <= 3, "one colour over the whole slice"
        r, g, b = colours.mean(axis=0)
        assert r > b + 10, "warm"
        assert np.abs(colours.mean(axis=0) - 128).max() < 80, "light: the grey still shows"


@pytest.mark.parametrize(
    "shape, roi, overlap",
    [((48, 40, 56), (16, 16, 16), 0.25), ((20, 33, 12), (16, 16, 16), 0.5), ((9, 30, 17), (12, 10, 8), 0.3)],
)
def test_slice_heat_is_the_max_over_the_windows_containing_each_voxel(shape, roi, overlap):
    """Against a brute-force 3-D heat volume (small shapes; padded axes in the last two: MONAI pads an axis
    shorter than the window)."""
    grid = window_grid(shape, roi, overlap)
    scores = np.random.default_rng(1).random(grid.count).astype(np.float32)
    heat = np.full(shape, -np.inf, np.float32)
    for index in range(grid.count):
        lo, hi = box_of(grid, index)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        heat[box] = np.maximum(heat[box], scores[index])
    assert np.isfinite(heat).all(), "MONAI's windows cover the whole volume"
    for axis in range(3):
        for at in sorted({0, shape[axis] // 3, shape[axis] - 1}):
            expected = np.take(heat, at, axis=axis)
            np.testing.assert_array_equal(slice_heat(grid, scores, axis, at), expected, err_msg=f"axis {axis} at {at}")


def test_the_png_is_small_and_the_volume_is_never_copied():
    n = 200
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 1, (n, n, n)).astype(np.float32)  # 32 MB
    grid = window_grid(volume.shape, (96, 96, 96), 0.25)
    scores = rng.random(grid.count)
    best = int(np.argmax(scores))
    review_png(volume[:20, :20, :20], (1, 1, 1), (5, 5, 5))  # imports (matplotlib, Pillow) outside the measure
    tracemalloc.start()
    try:
        png = review_png(volume, (0.9, 0.9, 1.1), grid.centre_voxel(best), grid=grid, window_scores=scores,
                         max_window=best)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < volume.nbytes / 4, f"peak {peak / 1e6:.1f} MB while drawing a {volume.nbytes / 1e6:.0f} MB volume"
    # White noise, the worst case for PNG: still a few tens of kB.
    assert len(png) < 80_000, len(png)
    assert decode(png).shape == (PANEL, 3 * PANEL, 3)


def test_data_uri_and_refusals():
    png = review_png(np.zeros((4, 5, 6), np.float32), (1, 1, 1), (2, 2, 3))
    uri = data_uri(png)
    assert uri.startswith("data:image/png;base64,") and base64.b64decode(uri.split(",", 1)[1]) == png
    volume, grid, scores, best = grid_case()
    with pytest.raises(ValueError, match="one per window"):
        review_png(volume, (1, 1, 1), (1, 1, 1), grid=grid, window_scores=scores[:-1])
    with pytest.raises(ValueError, match="grid is for a volume"):
        review_png(volume[:, :, :40], (1, 1, 1), (1, 1, 1), grid=grid, window_scores=scores)
    with pytest.raises(IndexError):
        review_png(volume, (1, 1, 1), (1, 1, 1), grid=grid, window_scores=scores, max_window=grid.count)
    with pytest.raises(ValueError, match="spacing"):
        review_png(volume, (1, 0, 1), (1, 1, 1))
    with pytest.raises(ValueError, match="need the grid"):
        review_png(volume, (1, 1, 1), (1, 1, 1), window_scores=scores)


# --- the page's section -----------------------------------------------------------------------------------------


def night_review():
    """What the driver puts in report["review"]: a windowed scan and a whole-volume one, highest first."""
    volume, grid, scores, best = grid_case(seed=5)
    windowed = review_png(volume, (1.2, 1.2, 1.5), grid.centre_voxel(best), grid=grid, window_scores=scores,
                          max_window=best)  # fmt: skip
    whole = np.random.default_rng(6).normal(0, 1, (40, 44, 36)).astype(np.float32)
    whole[14:26, 18:24, 12:20] = 6.0  # a bright block where the slices through (20, 22, 18) cross
    return [
        {"scan_id": 'scan-<b>&"7', "score": 0.9, "voxel": [61, 40, 12], "ras": [-12.25, 30.5, 4.0],
         "windowed": True, "image": data_uri(windowed)},
        {"scan_id": "scan-0042", "score": 0.71234, "voxel": [20, 22, 18], "ras": None, "windowed": False,
         "image": data_uri(review_png(whole, (1.0, 1.0, 1.0), (20, 22, 18)))},
    ]  # fmt: skip


def night_report(review=None, mode="score"):
    now = "2026-11-25T02:00:00+00:00"
    report = {
        "run_id": "night-9", "status": "ok", "exit_code": 0, "error_rate": 0.0, "wall_s": 60.0,
        "throughput_scans_per_s": 5.0, "startup_s": 10.0, "started_at": now, "finished_at": now,
        "counts": {"manifest": 2, "skipped_done": 0, "skipped_known_bad": 0, "ok": 2, "error": 0,
                   "deferred_unsettled": 0},
        "config": {"mode": mode, "max_error_rate": 0.01}, "model": {"sha256": "ab" * 32, "uri": "m.keras"},
        "output": {"uri": "out"},
    }  # fmt: skip
    if review is not None:
        report["review"] = review
    return report


def page_of(report):
    data = summarize(report, None, None, [], None)
    return render(report, data, {})


def test_the_review_section_comes_first_with_a_card_per_scan():
    review = night_review()
    page = page_of(night_report(review))
    section = re.search(r'<section id="review">.*?</section>', page, re.S)
    assert section, "no review section"
    sections = re.findall(r'<section id="([a-z]+)"', page)
    assert sections[0] == "review" and sections[1] == "summary"
    assert page.index("</h1>") < section.start()
    html = section.group(0)
    assert "<h2>The 2 highest-scoring scans of the night</h2>" in html
    cards = re.findall(r'<div class="card" id="review-(\d)">(.*?)</div>', html, re.S)
    assert [rank for rank, _ in cards] == ["1", "2"]
    first, second = (body for _, body in cards)
    assert "scan-&lt;b&gt;&amp;&quot;7" in first and "<b>&" not in first, "scan ids escaped"
    assert 'score <b class="score">0.900</b>' in first and "0.712" in second
    positions = [re.search(r'<span class="muted">(.*?)</span>', body).group(1) for body in (first, second)]
    assert positions == [
        "in the highest window, slices at voxel (61, 40, 12) · RAS (-12.2, 30.5, 4.0) mm",
        "volume centre, voxel (20, 22, 18)",
    ]
    for entry, (_, body) in zip(review, cards, strict=True):
        assert f'src="{entry["image"]}"' in body
    assert "radiological" in html and "heat" in html.lower()
    # The data block: the same entries, without their pictures.
    data = read_page_data(page)
    assert data["review"] == [{k: v for k, v in e.items() if k != "image"} for e in review]
    block = re.search(r'<script type="application/json".*?</script>', page, re.S).group(0)
    assert "data:image" not in block
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the page must not need the network"


def test_no_review_no_section():
    review = night_review()
    for report in (night_report(), night_report([]), night_report(review, mode="embed")):
        page = page_of(report)
        assert 'id="review"' not in page and "data:image" not in page
        assert read_page_data(page)["review"] == []
    # Anything but an inline PNG is not shown (the page never fetches): the card says so.
    page = page_of(night_report([{**review[1], "image": "https://example.com/x.png"}]))
    assert "example.com" not in page.split('<script type="application/json"')[0]
    assert "no picture" in page and "<h2>The highest-scoring scan of the night</h2>" in page


def test_the_review_section_in_a_headless_browser(tmp_path):
    from test_report import chromium, headless

    browser = chromium()
    review = night_review()
    path = tmp_path / "night-9.html"
    path.write_text(page_of(night_report(review)))
    url = path.as_uri()

    dom = headless(browser, "--dump-dom", url)
    section = re.search(r'<section id="review">.*?</section>', dom, re.S)
    assert section, "the browser's DOM has no review section"
    images = re.findall(r'<img [^>]*src="(data:image/png;base64,[^"]+)"', section.group(0))
    assert images == [e["image"] for e in review]
    assert read_page_data(dom)["review"][0]["voxel"] == [61, 40, 12]

    shot = tmp_path / "page.png"
    headless(browser, f"--screenshot={shot}", "--window-size=1100,900", url)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    assert pixels.shape[:2] == (900, 1100)
    # The cards sit right under the header: the top of the page is where the pictures are.
    top = pixels[:600]
    assert top.reshape(-1, 3).std(axis=0).min() > 30, "no pictures drawn at the top of the page"
    dark = (top.max(axis=-1) < 60).sum()
    assert dark > 5000, "the slices' dark background (the black panels) is not on screen"
    warm = (top[..., 0] - top[..., 2] > 60) & (top[..., 0] > 120)
    assert warm.sum() > 1000, "no heat overlay on screen"
    assert cyan(top).sum() > 50, "no outline of the highest-scoring window on screen"
