"""jobs.inputs.windows against MONAI itself: the same window starts as ``_get_scan_interval`` + ``dense_patch_slices``,
and the same windows, one by one and in the same order, as ``sliding_window_inference`` hands its predictor (padding
included). Also: the grid affine against the exact centres, windows as views (memory), and the score aggregates."""

import itertools
import tracemalloc

import numpy as np
import pytest

from jobs.inputs.windows import AGGREGATES, aggregate, heat_peak, iter_windows, pad_volume, window_grid

torch = pytest.importorskip("torch")
monai_data_utils = pytest.importorskip("monai.data.utils")
monai_inferers = pytest.importorskip("monai.inferers")
monai_inferer_utils = pytest.importorskip("monai.inferers.utils")

OVERLAPS = (0.0, 0.25, 0.5, 0.75)

# (image_size, roi_size): odd sizes, anisotropic windows, a window larger than the image on some axes or all (odd and
# even differences), a window exactly the image's size, windows of one voxel.
PLACEMENT_CASES = [
    ((97, 130, 61), (96, 64, 32)),
    ((97, 130, 61), (96, 96, 96)),
    ((512, 512, 300), (96, 96, 96)),
    ((40, 21, 10), (64, 64, 64)),
    ((63, 64, 65), (64, 64, 64)),
    ((96, 96, 96), (96, 96, 96)),
    ((7, 300, 5), (3, 17, 5)),
    ((1, 1, 1), (1, 1, 1)),
    ((9, 2, 33), (1, 4, 8)),
]

# Small enough to run sliding_window_inference on every overlap in well under a second each.
INFERENCE_CASES = [
    ((17, 23, 31), (8, 12, 16)),  # odd sizes, anisotropic window, last windows pulled back
    ((13, 9, 29), (16, 12, 8)),  # smaller than the window on two axes (odd differences: 3 and 3)
    ((5, 6, 7), (12, 11, 10)),  # smaller on all axes (differences 7, 5, 3)
    ((20, 20, 20), (20, 10, 7)),  # exactly one window on an axis
    ((37, 11, 23), (20, 4, 23)),
]

# An oblique (rotated about two axes), anisotropic, LPS-stored (x and y flipped) voxel-to-world affine.
_c, _s = np.cos(0.3), np.sin(0.3)
_ROT = np.array([[_c, -_s, 0.0], [_s, _c, 0.0], [0.0, 0.0, 1.0]]) @ np.array(
    [[1.0, 0.0, 0.0], [0.0, _c, -_s], [0.0, _s, _c]]
)
OBLIQUE_LPS = np.eye(4)
OBLIQUE_LPS[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ _ROT @ np.diag([0.7, 0.9, 2.5])
OBLIQUE_LPS[:3, 3] = [120.0, 95.5, -310.25]


def monai_starts(image_size, roi_size, overlap):
    """Window starts in the padded volume and the padded size, as sliding_window_inference computes them."""
    padded = tuple(max(n, r) for n, r in zip(image_size, roi_size, strict=True))
    interval = monai_inferer_utils._get_scan_interval(padded, roi_size, 3, (overlap,) * 3)
    slices = monai_data_utils.dense_patch_slices(padded, roi_size, interval)
    return [tuple(s.start for s in window) for window in slices], padded, interval


def all_starts(grid):
    return [grid.start_of(n) for n in range(grid.count)]


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize(("image_size", "roi_size"), PLACEMENT_CASES)
def test_starts_equal_monai(image_size, roi_size, overlap):
    grid = window_grid(image_size, roi_size, overlap)
    starts, padded, interval = monai_starts(image_size, roi_size, overlap)
    assert grid.padded_size == padded
    assert grid.interval == tuple(interval)
    assert all_starts(grid) == starts  # same starts, same (row-major) order
    assert grid.count == len(starts) and grid.shape == tuple(len(s) for s in grid.starts)
    assert [sorted({s[a] for s in starts}) for a in range(3)] == [list(s) for s in grid.starts]


def test_axis_starts_equal_monai_random_sweep():
    """Seeded sizes and overlaps, one axis at a time (the grid is the product of its axes, as MONAI's meshgrid):
    overlaps whose step truncates in float arithmetic, windows longer than, equal to and shorter than the axis."""
    rng = np.random.default_rng(22)
    fixed = [0.0, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99]
    for _ in range(3000):
        size, roi = (int(v) for v in rng.integers(1, 400, 2))
        overlap = float(rng.choice(fixed)) if rng.random() < 0.7 else float(rng.uniform(0, 1))
        grid = window_grid((size, 5, 5), (roi, 5, 5), overlap)
        padded = max(size, roi)
        (interval,) = monai_inferer_utils._get_scan_interval((padded,), (roi,), 1, (overlap,))
        expected = [window[0].start for window in monai_data_utils.dense_patch_slices((padded,), (roi,), (interval,))]
        assert list(grid.starts[0]) == expected, (size, roi, overlap)
        assert grid.interval[0] == interval and grid.padded_size[0] == padded


@pytest.mark.parametrize(("roi", "overlap", "step"), [(160, 0.8, 31), (20, 0.8, 3), (20, 0.9, 1), (10, 0.9, 1)])
def test_step_truncates_in_float_as_monai(roi, overlap, step):
    """int(roi * (1 - overlap)) in float: 160 * (1 - 0.8) is 31.999..., so the step is 31, not 32; 0 becomes 1."""
    grid = window_grid((400, 400, 400), (roi, roi, roi), overlap)
    assert grid.interval == (step,) * 3
    assert monai_inferer_utils._get_scan_interval((400,), (roi,), 1, (overlap,)) == (step,)


def monai_windows(volume, roi_size, overlap, cval):
    """The windows sliding_window_inference gives its predictor, in order (sw_batch_size=1)."""
    seen = []

    def predictor(batch):
        assert batch.shape[:2] == (1, 1)
        seen.append(batch[0, 0].detach().clone().numpy())
        return batch.clone()

    inputs = torch.from_numpy(volume)[None, None]
    monai_inferers.sliding_window_inference(inputs, roi_size, 1, predictor, overlap=overlap, cval=cval)
    return seen


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize(("image_size", "roi_size"), INFERENCE_CASES)
def test_windows_equal_what_monai_gives_its_predictor(image_size, roi_size, overlap):
    rng = np.random.default_rng(abs(hash((image_size, roi_size, overlap))) % 2**32)
    volume = rng.standard_normal(image_size).astype(np.float32)
    cval = -7.5 if overlap == 0.25 else 0.0  # MONAI's cval reaches the padding as pad_volume's value
    grid = window_grid(image_size, roi_size, overlap)

    expected = monai_windows(volume, roi_size, overlap, cval)
    padded = pad_volume(volume, grid, value=cval) if cval else pad_volume(volume, grid)
    got = list(iter_windows(padded, grid))
    assert len(got) == len(expected) == grid.count
    for n, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert mine.shape == tuple(roi_size)
        np.testing.assert_array_equal(mine, theirs, err_msg=f"window {n} at {grid.start_of(n)}")


def test_padding_split_and_value():
    """The odd voxel of padding goes after; pad_volume returns the volume itself when nothing needs padding."""
    grid = window_grid((5, 6, 64), (12, 11, 10))
    assert grid.pad_before == (3, 2, 0) and grid.padded_size == (12, 11, 64)
    volume = np.ones((5, 6, 64, 1), np.float32)  # a trailing channel axis comes along unpadded
    padded = pad_volume(volume, grid, value=-1.0)
    assert padded.shape == (12, 11, 64, 1)
    assert (padded[3:8, 2:8] == 1).all() and padded.sum() == volume.sum() - (padded.size - volume.size)
    assert padded[2, 2, 0, 0] == -1 and padded[8, 2, 0, 0] == -1 and padded[3, 1, 0, 0] == -1
    # iter_windows takes the unpadded volume too, and pads it the same way
    for a, b in zip(iter_windows(volume, grid), iter_windows(pad_volume(volume, grid), grid), strict=True):
        np.testing.assert_array_equal(a, b)
    unpadded_grid = window_grid((64, 64, 64), (32, 16, 64))
    cube = np.zeros((64, 64, 64), np.float32)
    assert pad_volume(cube, unpadded_grid) is cube
    with pytest.raises(ValueError, match="image size"):
        pad_volume(np.zeros((5, 6, 7)), grid)
    with pytest.raises(ValueError, match="padded size"):
        next(iter_windows(np.zeros((12, 11, 63)), grid))


def test_centre_voxel():
    grid = window_grid((10, 11, 40), (16, 16, 16), overlap=0.5)
    assert grid.pad_before == (3, 2, 0)
    np.testing.assert_array_equal(grid.centre_voxel(0), [4.5, 5.5, 7.5])  # even padding: the image's centre
    last = grid.count - 1
    np.testing.assert_array_equal(grid.centre_voxel(last), [4.5, 5.5, 40 - 8.5])  # pulled back to the edge
    with pytest.raises(IndexError):
        grid.centre_voxel(grid.count)


@pytest.mark.parametrize(
    ("image_size", "roi_size", "overlap"),
    [((97, 130, 61), (32, 24, 16), 0.25), ((37, 11, 23), (20, 16, 8), 0.5), ((50, 64, 70), (16, 16, 16), 0.0)],
)
def test_grid_affine_maps_grid_index_to_window_centre(image_size, roi_size, overlap):
    grid = window_grid(image_size, roi_size, overlap)
    affine = grid.grid_affine(OBLIQUE_LPS)
    step = np.asarray(grid.affine_step, dtype=np.float64)
    even = pulled_back = 0
    for n, ijk in enumerate(itertools.product(*(range(k) for k in grid.shape))):
        exact = OBLIQUE_LPS @ np.append(grid.centre_voxel(n), 1.0)
        mapped = affine @ np.append(np.asarray(ijk, dtype=np.float64), 1.0)
        if all(grid.starts[a][ijk[a]] == ijk[a] * grid.affine_step[a] for a in range(3)):
            np.testing.assert_allclose(mapped, exact, atol=1e-9)
            even += 1
        else:  # a window pulled back to the edge: before where the affine puts it, by less than one step
            off = np.linalg.solve(OBLIQUE_LPS, mapped)[:3] - grid.centre_voxel(n)
            assert (off > -1e-9).all() and (off < step).all() and off.max() > 0
            pulled_back += 1
    assert even and pulled_back


def test_grid_affine_is_exact_on_an_axis_of_two_windows():
    """Two windows, the second pulled back to the edge (18 voxels, roi 16: starts 0 and 2): both centres exact."""
    grid = window_grid((18, 40, 16), (16, 16, 16), overlap=0.25)
    assert grid.starts[0] == (0, 2) and grid.interval[0] == 12 and grid.affine_step[0] == 2
    affine = grid.grid_affine(OBLIQUE_LPS)
    for n, ijk in enumerate(itertools.product(*(range(k) for k in grid.shape))):
        if ijk[1] < grid.shape[1] - 1:  # axis 1 has 3 windows, its last pulled back: left to the test above
            np.testing.assert_allclose(
                affine @ [*ijk, 1.0], OBLIQUE_LPS @ np.append(grid.centre_voxel(n), 1.0), atol=1e-9
            )


def test_grid_affine_on_a_padded_axis():
    """One window on a padded axis: its centre maps exactly, and the affine stays invertible."""
    grid = window_grid((5, 40, 6), (8, 8, 8), overlap=0.5)
    affine = grid.grid_affine(OBLIQUE_LPS)
    assert abs(np.linalg.det(affine)) > 0
    for n in range(grid.count):
        i, j, k = n // grid.shape[1] // grid.shape[2], (n // grid.shape[2]) % grid.shape[1], n % grid.shape[2]
        np.testing.assert_allclose(
            affine @ [i, j, k, 1.0], OBLIQUE_LPS @ np.append(grid.centre_voxel(n), 1.0), atol=1e-9
        )


def test_windows_are_views_not_copies():
    """A large volume's windows are yielded one at a time as views: peak traced memory stays at a few windows."""
    volume = np.zeros((200, 200, 200), np.float32)
    grid = window_grid(volume.shape, (32, 32, 32), overlap=0.5)
    window_bytes = 32**3 * 4
    assert grid.count * window_bytes > 5 * volume.nbytes  # all windows at once: about 7 times the volume
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        seen = 0
        for window in iter_windows(volume, grid):
            assert np.shares_memory(window, volume)
            window.max()
            seen += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == grid.count == 12**3
    assert peak < 3 * window_bytes, f"peak {peak} bytes while iterating"


def test_window_grid_validation():
    for overlap in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="overlap"):
            window_grid((10, 10, 10), (4, 4, 4), overlap)
    for bad in ((4, 4), (4, 0, 4), (4.0, 4, 4), (4, -1, 4)):
        with pytest.raises(ValueError, match="roi_size"):
            window_grid((10, 10, 10), bad)
    with pytest.raises(ValueError, match="image_size"):
        window_grid((10, 10, 0), (4, 4, 4))
    assert window_grid(np.array([10, 10, 10]), [np.int64(4)] * 3).shape == (3, 3, 3)  # numpy integers are fine


def test_aggregate_against_numpy():
    rng = np.random.default_rng(3)
    for size in (1, 2, 3, 4, 7, 50, 1000):
        scores = rng.standard_normal(size).astype(np.float32)
        assert aggregate(scores, "max") == float(np.max(scores))
        assert aggregate(scores, "mean") == pytest.approx(float(np.mean(scores, dtype=np.float64)), rel=1e-12)
        top = np.sort(scores.astype(np.float64))[-3:]
        assert aggregate(scores, "top3") == pytest.approx(float(top.mean()), rel=1e-12)
    assert AGGREGATES == ("max", "mean", "top3")
    assert aggregate([0.1, 0.9, 0.5, 0.7], "top3") == pytest.approx(0.7)


def test_aggregate_refuses_bad_input():
    with pytest.raises(ValueError, match="max, mean, top3"):
        aggregate(np.ones(3), "median")
    with pytest.raises(ValueError, match="empty"):
        aggregate(np.array([]), "max")


@pytest.mark.parametrize(
    ("image_size", "roi_size", "overlap", "seed"),
    [((37, 11, 23), (20, 16, 8), 0.5, 0), ((50, 64, 70), (16, 16, 16), 0.25, 1), ((18, 40, 9), (16, 12, 12), 0.6, 2)],
)
def test_heat_peak_is_where_the_covering_windows_mean_is_highest(image_size, roi_size, overlap, seed):
    """Brute force over every voxel of the highest window: the mean score of the windows covering it. heat_peak's
    point lies in the highest window, and the voxels on both sides of it (a cell's centre) reach that maximum."""
    grid = window_grid(image_size, roi_size, overlap)
    scores = np.random.default_rng(seed).uniform(size=grid.count)
    best = int(np.argmax(scores))
    starts = [np.asarray(s) for s in grid.unpadded_starts]
    box = np.asarray(grid.start_of(best)) - np.asarray(grid.pad_before)

    def mean_heat(voxel):
        covering = [
            scores[n]
            for n, ijk in enumerate(itertools.product(*(range(k) for k in grid.shape)))
            if all(starts[a][ijk[a]] <= voxel[a] < starts[a][ijk[a]] + roi_size[a] for a in range(3))
        ]
        return float(np.mean(covering))

    heat = {v: mean_heat(v) for v in itertools.product(*(range(b, b + r) for b, r in zip(box, roi_size, strict=True)))}
    peak = heat_peak(grid, scores, best)
    assert all(box[a] <= peak[a] <= box[a] + roi_size[a] - 1 for a in range(3))
    corners = itertools.product(*[{int(np.floor(p)), int(np.ceil(p))} for p in peak])
    assert all(heat[c] >= max(heat.values()) - 1e-3 - 1e-12 for c in corners)


def test_heat_peak_of_equal_scores_is_the_window_centre():
    """A detector that saturates gives every window the same score: nothing tells the cells apart."""
    grid = window_grid((50, 64, 70), (16, 16, 16), 0.25)
    scores = np.full(grid.count, 0.998)
    scores[::7] -= 2e-4  # below the tie tolerance
    for best in (0, grid.count // 2, grid.count - 1):
        peak, centre = heat_peak(grid, scores, best), grid.centre_voxel(best)
        box = np.asarray(grid.start_of(best)) - np.asarray(grid.pad_before)
        for axis, starts in enumerate(grid.unpadded_starts):
            # The cell of this window (between consecutive window faces) that holds its centre holds the peak.
            faces = sorted({f for s in starts for f in (s, s + 16) if box[axis] <= f <= box[axis] + 16})
            low = max(f for f in faces if f <= centre[axis])
            high = min(f for f in faces if f > centre[axis])
            assert low <= peak[axis] <= high - 1, (best, axis, peak, centre, faces)
