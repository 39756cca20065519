"""Conformance of the DICOM reader against dcm2niix on every real multi-slice series that ships in the installed
packages (pydicom's test files, pydicom-data, nibabel's nicom test data).

Each series found (files grouped by SeriesInstanceUID per folder, two slice positions or more; or one multi-frame or
mosaic file) is read by our reader as a folder (or as the file itself) and as a .zip of its files, and converted by
dcm2niix. The verdict is one of:

- ``equal dcm2niix``: same shape, affine within 1e-3 mm and the same rescaled voxels as dcm2niix's NIfTI, both in
  the closest canonical (RAS+) voxel order;
- ``equal pydicom``: dcm2niix cannot read the series or is known wrong on it (:data:`DCM2NIIX_WRONG`), and the
  volume equals the one built here from pydicom's ``pixel_array``, frames ordered along the slice normal;
- ``refused``: our reader raised a ScanError; the reason is recorded.

Anything else (a volume that differs from the reference) fails. :data:`EXPECTED` holds every verdict, and
``docs/reference/dicom-conformance.md`` states the same table (checked by :func:`test_docs_table_states_the_verdicts`).
Regenerate the table with ``python tests/test_dicom_conformance.py`` after a change of the reader.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.nicom import dicomwrappers
from pydicom import uid as dcm_uid

from jobs.errors import ScanError
from jobs.inputs import formats

SITE = Path(pydicom.__file__).resolve().parent.parent
ROOTS = {
    "pydicom": SITE / "pydicom" / "data" / "test_files",
    "pydicom-data": SITE / "data_store" / "data",
    "nibabel": SITE / "nibabel" / "nicom" / "tests" / "data",
}
DCM2NIIX = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference" / "dicom-conformance.md"
AFFINE_TOL_MM = 1e-3

# Series dcm2niix cannot read or reads wrong (id -> why): compared instead with the volume built here from pydicom's
# pixel_array (a mosaic: its tiles, placed with nibabel's MosaicWrapper geometry).
_ODD_MOSAIC = (
    "a 256 x 256 mosaic of 7 x 7 tiles of 36 x 36 plus 4 pixels of padding: from its 8th slice on, dcm2niix's slices "
    "are none of the image's tiles (nibabel's MosaicWrapper geometry with the tiles cut out here agrees with ours)"
)
DCM2NIIX_WRONG: dict[str, str] = {"nibabel:0.dcm": _ODD_MOSAIC, "nibabel:1.dcm": _ODD_MOSAIC}

# Every series found, and its verdict: "equal dcm2niix", "equal pydicom", or "refused: <words of the reason>".
EXPECTED: dict[str, str] = {
    "nibabel:0.dcm": "refused: not a whole grid of tiles",
    "nibabel:0.dcm (zip)": "refused: not a whole grid of tiles",
    "nibabel:1.dcm": "refused: not a whole grid of tiles",
    "nibabel:1.dcm (zip)": "refused: not a whole grid of tiles",
    "nibabel:csa_slice_norm.dcm": "refused: truncated",
    "nibabel:csa_slice_norm.dcm (zip)": "refused: truncated",
    "nibabel:philips_mprage.dcm.gz": "equal dcm2niix",
    "nibabel:philips_mprage.dcm.gz (zip)": "equal dcm2niix",
    "nibabel:siemens_dwi_0.dcm.gz": "equal dcm2niix",
    "nibabel:siemens_dwi_0.dcm.gz (zip)": "equal dcm2niix",
    "nibabel:siemens_dwi_1000.dcm.gz": "equal dcm2niix",
    "nibabel:siemens_dwi_1000.dcm.gz (zip)": "equal dcm2niix",
    "pydicom-data:OBXXXX1A_2frame.dcm": "refused: colour image",
    "pydicom-data:OBXXXX1A_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:OBXXXX1A_expb_2frame.dcm": "refused: colour image",
    "pydicom-data:OBXXXX1A_expb_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:OBXXXX1A_rle_2frame.dcm": "refused: colour image",
    "pydicom-data:OBXXXX1A_rle_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:SC_rgb_16bit_2frame.dcm": "refused: colour image",
    "pydicom-data:SC_rgb_16bit_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:SC_rgb_2frame.dcm": "refused: colour image",
    "pydicom-data:SC_rgb_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:SC_rgb_32bit_2frame.dcm": "refused: colour image",
    "pydicom-data:SC_rgb_32bit_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:SC_rgb_expb_16bit_2frame.dcm": "refused: colour image",
    "pydicom-data:SC_rgb_expb_16bit_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:SC_rgb_expb_2frame.dcm": "refused: colour image",
    "pydicom-data:SC_rgb_expb_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:SC_rgb_expb_32bit_2frame.dcm": "refused: colour image",
    "pydicom-data:SC_rgb_expb_32bit_2frame.dcm (zip)": "refused: colour image",
    "pydicom-data:color3d_jpeg_baseline.dcm": "refused: colour image",
    "pydicom-data:color3d_jpeg_baseline.dcm (zip)": "refused: colour image",
    "pydicom-data:eCT_Supplemental.dcm": "equal dcm2niix",
    "pydicom-data:eCT_Supplemental.dcm (zip)": "equal dcm2niix",
    "pydicom-data:emri_small.dcm": "refused: without per-frame positions",
    "pydicom-data:emri_small.dcm (zip)": "refused: without per-frame positions",
    "pydicom-data:emri_small_RLE.dcm": "refused: without per-frame positions",
    "pydicom-data:emri_small_RLE.dcm (zip)": "refused: without per-frame positions",
    "pydicom-data:emri_small_big_endian.dcm": "refused: without per-frame positions",
    "pydicom-data:emri_small_big_endian.dcm (zip)": "refused: without per-frame positions",
    "pydicom-data:emri_small_jpeg_2k_lossless.dcm": "refused: without per-frame positions",
    "pydicom-data:emri_small_jpeg_2k_lossless.dcm (zip)": "refused: without per-frame positions",
    "pydicom-data:emri_small_jpeg_2k_lossless_too_short.dcm": "refused: without per-frame positions",
    "pydicom-data:emri_small_jpeg_2k_lossless_too_short.dcm (zip)": "refused: without per-frame positions",
    "pydicom-data:emri_small_jpeg_ls_lossless.dcm": "refused: without per-frame positions",
    "pydicom-data:emri_small_jpeg_ls_lossless.dcm (zip)": "refused: without per-frame positions",
    "pydicom-data:liver.dcm": "refused: non-image object",
    "pydicom-data:liver.dcm (zip)": "refused: non-image object",
    "pydicom-data:liver_expb.dcm": "refused: non-image object",
    "pydicom-data:liver_expb.dcm (zip)": "refused: non-image object",
    "pydicom:SC_rgb_rle_16bit_2frame.dcm": "refused: colour image",
    "pydicom:SC_rgb_rle_16bit_2frame.dcm (zip)": "refused: colour image",
    "pydicom:SC_rgb_rle_2frame.dcm": "refused: colour image",
    "pydicom:SC_rgb_rle_2frame.dcm (zip)": "refused: colour image",
    "pydicom:SC_rgb_rle_32bit_2frame.dcm": "refused: colour image",
    "pydicom:SC_rgb_rle_32bit_2frame.dcm (zip)": "refused: colour image",
    "pydicom:dicomdirtests/77654033/CT2": "refused: missing slice",
    "pydicom:dicomdirtests/77654033/CT2 (zip)": "refused: missing slice",
    "pydicom:dicomdirtests/98892001/CT2N": "refused: mixed orientations",
    "pydicom:dicomdirtests/98892001/CT2N (zip)": "refused: mixed orientations",
    "pydicom:dicomdirtests/98892001/CT5N": "equal dcm2niix",
    "pydicom:dicomdirtests/98892001/CT5N (zip)": "equal dcm2niix",
    "pydicom:dicomdirtests/98892003/MR2": "refused: mixed orientations",
    "pydicom:dicomdirtests/98892003/MR2 (zip)": "refused: mixed orientations",
    "pydicom:dicomdirtests/98892003/MR700": "refused: mixed orientations",
    "pydicom:dicomdirtests/98892003/MR700 (zip)": "refused: mixed orientations",
    "pydicom:examples_ybr_color.dcm": "refused: colour image",
    "pydicom:examples_ybr_color.dcm (zip)": "refused: colour image",
    "pydicom:rtdose.dcm": "refused: non-image object",
    "pydicom:rtdose.dcm (zip)": "refused: non-image object",
    "pydicom:rtdose_expb.dcm": "refused: non-image object",
    "pydicom:rtdose_expb.dcm (zip)": "refused: non-image object",
    "pydicom:rtdose_rle.dcm": "refused: non-image object",
    "pydicom:rtdose_rle.dcm (zip)": "refused: non-image object",
}


@dataclasses.dataclass
class Case:
    package: str
    where: str  # the folder (series) or file (one multi-frame or mosaic file), relative to the package's data root
    files: tuple[Path, ...]  # the files as installed (some gzipped)
    single: bool  # one file, read by its own path
    syntax: str  # transfer syntax UID(s) of the files, comma-separated
    mosaic: bool = False  # a Siemens mosaic (ImageType MOSAIC)

    @property
    def id(self) -> str:
        return f"{self.package}:{self.where}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.id)


def _dataset(path, stop_before_pixels=True):
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            return pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)


def _frames(ds):
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def discover() -> dict[str, Case]:
    """Every real multi-slice series of the installed packages, by id."""
    cases = {}
    for package, root in ROOTS.items():
        groups = {}
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                path = Path(folder) / name
                if name.upper() == "DICOMDIR":
                    continue
                try:
                    ds = _dataset(path)
                except Exception:
                    continue  # not DICOM (pydicom's test folder also holds other files)
                if "Rows" not in ds:
                    continue  # not an image
                syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
                where = str(path.relative_to(root))
                mosaic = "MOSAIC" in [str(v).upper() for v in ds.get("ImageType", [])]
                if _frames(ds) > 1 or mosaic:
                    cases[f"{package}:{where}"] = Case(package, where, (path,), True, syntax, mosaic)
                    continue
                key = (str(Path(where).parent), str(ds.get("SeriesInstanceUID", "")))
                groups.setdefault(key, []).append((path, ds, syntax))
        for (folder, series_uid), items in groups.items():
            positions = {tuple(float(v) for v in ds.get("ImagePositionPatient") or ()) for _, ds, _ in items}
            if len(items) < 2 or len(positions) < 2:
                continue  # one slice, or one slice in several encodings (pydicom's flat test folder)
            where = folder if folder != "." else f"series {series_uid}"
            syntaxes = ",".join(sorted({s for _, _, s in items}))
            cases[f"{package}:{where}"] = Case(package, where, tuple(p for p, _, _ in items), False, syntaxes)
    return dict(sorted(cases.items()))


def materialize(case: Case, tmp: Path) -> tuple[Path, Path, Path]:
    """(a folder holding only the series' files, what our reader is given, a .zip of the files) under ``tmp``."""
    folder = tmp / "series"
    folder.mkdir(parents=True, exist_ok=True)
    for path in case.files:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                (folder / path.stem).write_bytes(f.read())
        else:
            shutil.copyfile(path, folder / path.name)
    archive = tmp / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for target in sorted(folder.iterdir()):
            z.write(target, target.name)
    ours = next(folder.iterdir()) if case.single else folder
    return folder, ours, archive


def read_ours(path: Path):
    """Our reader, step by step as the pipeline runs it: the Volume, or a ScanError."""
    fmt, first = formats.format_for(str(path))
    raw = fmt.fetch(str(path), None, first)
    return fmt.decode(fmt.check(str(path), raw, {}))


def canonical(voxels, affine):
    """Voxels (float64) and affine in the closest canonical (RAS+) voxel order."""
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(voxels, np.float64), affine))
    return np.asarray(image.dataobj), image.affine


def dcm2niix(folder: Path, out: Path):
    """dcm2niix's volumes of ``folder``: [(voxels rescaled, RAS affine, file name)], and what it printed."""
    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run(
        [DCM2NIIX, "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    volumes = []
    for path in sorted(out.glob("*.nii")):
        image = nib.load(path)
        data = image.get_fdata()
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        volumes.append((data, image.affine, path.name))
    return volumes, run.stdout + run.stderr


def _frame_geometry(ds):
    """[(position, orientation, pixel spacing, slope, inter)] of every frame of ``ds``: from the per-frame and
    shared functional groups of an enhanced file, else from the classic attributes."""

    def pick(frame, sequence, attribute):
        for groups in (frame, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
            if groups is not None and sequence in groups and attribute in groups[sequence][0]:
                return groups[sequence][0][attribute].value
        return ds.get(attribute)

    frames = ds.get("PerFrameFunctionalGroupsSequence") or [None] * _frames(ds)
    return [
        (
            np.array(pick(frame, "PlanePositionSequence", "ImagePositionPatient"), float),
            np.array(pick(frame, "PlaneOrientationSequence", "ImageOrientationPatient"), float),
            np.array(pick(frame, "PixelMeasuresSequence", "PixelSpacing"), float),
            float(pick(frame, "PixelValueTransformationSequence", "RescaleSlope") or 1.0),
            float(pick(frame, "PixelValueTransformationSequence", "RescaleIntercept") or 0.0),
        )
        for frame in frames
    ]


def pydicom_volume(folder: Path):
    """The reference built here with pydicom: every frame's ``pixel_array`` rescaled, ordered by its position along
    the slice normal; voxels [i, j, k] (i along a row) and the RAS affine from the first frame's geometry."""
    frames = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.reshape(_frames(ds), ds.Rows, ds.Columns)
        for pixel, (position, orientation, spacing, slope, inter) in zip(pixels, _frame_geometry(ds), strict=True):
            frames.append((position, orientation, spacing, pixel * slope + inter))
    orientation, spacing = frames[0][1], frames[0][2]
    normal = np.cross(orientation[:3], orientation[3:])
    frames.sort(key=lambda f: float(normal @ f[0]))
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing[1]  # along a row: the column index grows, PixelSpacing[1] apart
    lps[:3, 1] = orientation[3:] * spacing[0]
    lps[:3, 2] = (frames[-1][0] - frames[0][0]) / max(len(frames) - 1, 1)
    lps[:3, 3] = frames[0][0]
    voxels = np.stack([f[3] for f in frames]).transpose(2, 1, 0)
    return voxels, np.diag([-1.0, -1, 1, 1]) @ lps


def mosaic_volume(folder: Path):
    """The reference for one Siemens mosaic: its tiles cut out of pydicom's ``pixel_array`` (row-major, the tile
    size the image's size over ceil(sqrt(n)), rounded down), placed with nibabel's MosaicWrapper affine."""
    (path,) = folder.iterdir()
    ds = pydicom.dcmread(path)
    wrapper = dicomwrappers.wrapper_from_data(ds)
    n, side = wrapper.n_mosaic, wrapper.mosaic_size
    rows, cols = ds.Rows // side, ds.Columns // side
    pixels = ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    tiles = [pixels[(t // side) * rows :][:rows, (t % side) * cols :][:, :cols] for t in range(n)]
    # nibabel's voxels are [row, column, slice]; ours and this reference's are [column, row, slice]
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return np.stack(tiles).transpose(2, 1, 0), np.diag([-1.0, -1, 1, 1]) @ wrapper.affine @ swap


def compare(ours, reference):
    """None when the (voxels, affine) pairs agree in canonical order, else what differs."""
    a, affine_a = canonical(*ours)
    b, affine_b = canonical(*reference)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if not np.allclose(affine_a, affine_b, rtol=0, atol=AFFINE_TOL_MM):
        return f"affine differs by {np.abs(affine_a - affine_b).max():.4g} mm"
    close = np.isclose(a, b, rtol=1e-6, atol=1e-4)
    if not close.all():
        return f"voxels differ at {int((~close).sum())} of {a.size}"
    return None


def verdicts(case: Case, tmp: Path) -> dict[str, str]:
    """{id: verdict} for the case read as it is (folder or file) and as a .zip of its files."""
    folder, ours_path, archive = materialize(case, tmp)
    reference = None
    out = {}
    for case_id, path in ((case.id, ours_path), (f"{case.id} (zip)", archive)):
        try:
            volume = read_ours(path)
        except ScanError as e:
            out[case_id] = f"refused: {e.reason}"
            continue
        if reference is None:
            if case.id in DCM2NIIX_WRONG and case.mosaic:
                reference = ("nibabel", [(*mosaic_volume(folder), "nibabel")], "")
            elif case.id in DCM2NIIX_WRONG:
                reference = ("pydicom", [(*pydicom_volume(folder), "pydicom")], "")
            else:
                volumes, printed = dcm2niix(folder, tmp / "dcm2niix")
                reference = ("dcm2niix", volumes, printed)
        name, volumes, printed = reference
        if len(volumes) != 1:
            out[case_id] = f"DISAGREE: {name} wrote {[v[2] for v in volumes]}; {printed[-400:]}"
            continue
        mine = (np.asarray(volume.data, np.float64) * volume.slope + volume.inter, volume.affine)
        diff = compare(mine, volumes[0][:2])
        out[case_id] = f"equal {name}" if diff is None else f"DISAGREE with {name}: {diff}"
    return out


def _matches(verdict: str, expected: str) -> bool:
    if expected.startswith("refused:"):
        return verdict.startswith("refused:") and expected.removeprefix("refused:").strip() in verdict
    return verdict == expected


CASES = discover()


def test_every_real_series_is_found():
    """The packages' series are the ones the table lists (a new package version that adds some fails here)."""
    found = {i for case_id in CASES for i in (case_id, f"{case_id} (zip)")}
    assert found == set(EXPECTED), (sorted(found - set(EXPECTED)), sorted(set(EXPECTED) - found))


@pytest.mark.parametrize("case_id", list(CASES))
def test_real_series_equal_to_dcm2niix_or_refused(tmp_path, case_id):
    got = verdicts(CASES[case_id], tmp_path)
    for key, verdict in got.items():
        assert not verdict.startswith("DISAGREE"), f"{key}: {verdict}"
        assert _matches(verdict, EXPECTED[key]), f"{key}: expected {EXPECTED[key]!r}, got {verdict!r}"


def test_fallback_references_agree_with_dcm2niix_where_both_read(tmp_path):
    """The references used where dcm2niix is wrong are themselves checked: pydicom_volume (and mosaic_volume on a
    mosaic) equals dcm2niix on every series our reader and dcm2niix agree on."""
    checked = [key for key, verdict in EXPECTED.items() if verdict == "equal dcm2niix" and key in CASES]
    assert checked
    for case_id in checked:
        case = CASES[case_id]
        folder, _, _ = materialize(case, tmp_path / case.slug)
        (volume,), _ = dcm2niix(folder, tmp_path / case.slug / "dcm2niix")
        reference = mosaic_volume(folder) if case.mosaic else pydicom_volume(folder)
        assert compare(reference, volume[:2]) is None, case_id


@pytest.mark.parametrize("syntax", [dcm_uid.RLELossless, dcm_uid.JPEG2000Lossless])
def test_compressed_ect_supplemental_equals_pydicom_where_dcm2niix_reverses_its_frames(tmp_path, syntax):
    """A known dcm2niix fault, on lossless re-encodings of pydicom-data's eCT_Supplemental.dcm (2 frames): it
    writes the frames in reverse order with the affine of the uncompressed file. Ours equals the pydicom reference
    (and the uncompressed file, which dcm2niix reads right); dcm2niix's volume equals ours with k reversed. When a
    dcm2niix release fixes this, the last assertion fails: then drop the fault from the docs."""
    ds = pydicom.dcmread(ROOTS["pydicom-data"] / "eCT_Supplemental.dcm")
    ds.compress(syntax)
    folder = tmp_path / "series"
    folder.mkdir()
    ds.save_as(folder / "eCT.dcm", enforce_file_format=True)
    volume = read_ours(folder / "eCT.dcm")
    mine = (np.asarray(volume.data, np.float64) * volume.slope + volume.inter, volume.affine)
    assert compare(mine, pydicom_volume(folder)) is None
    uncompressed = read_ours(ROOTS["pydicom-data"] / "eCT_Supplemental.dcm")
    plain = np.asarray(uncompressed.data, np.float64) * uncompressed.slope + uncompressed.inter
    assert compare(mine, (plain, uncompressed.affine)) is None
    (theirs,), _ = dcm2niix(folder, tmp_path / "dcm2niix")
    assert compare((mine[0][..., ::-1], mine[1]), theirs[:2]) is None, "dcm2niix fixed? drop the fault from the docs"


# ---------------------------------------------------------------------------------------------- the docs table

TABLE_START, TABLE_END = "<!-- verdicts: start -->", "<!-- verdicts: end -->"
PHRASES = (  # the words of a refusal reason that EXPECTED keeps (the rest names UIDs and files)
    "single-slice series",
    "truncated",
    "without per-frame positions",
    "none of them a DICOM image",
    "missing slice",
    "mixed orientations",
    "cannot decode",
    "colour image",
    "non-image object",
    "not a whole grid of tiles",
)


def _syntax_names(syntaxes: str) -> str:
    return ", ".join(f"{dcm_uid.UID(s).name} (`{s}`)" for s in syntaxes.split(","))


def _docs_cell(verdict: str, case_id: str) -> str:
    if verdict == "equal dcm2niix":
        return "equal to dcm2niix"
    if verdict in ("equal pydicom", "equal nibabel"):
        why = DCM2NIIX_WRONG[case_id.removesuffix(" (zip)")]
        return f"equal to {verdict.removeprefix('equal ')} (dcm2niix wrong: {why})"
    return verdict.replace("|", "\\|")


def table(every: dict[str, str]) -> str:
    """The docs table of the verdicts ``every`` ({id: verdict})."""
    lines = ["| Series | Transfer syntax | Read as | Verdict |", "| --- | --- | --- | --- |"]
    for case_id, case in CASES.items():
        for key, read_as in ((case_id, "file" if case.single else "folder"), (f"{case_id} (zip)", "zip")):
            verdict = _docs_cell(every[key], case_id)
            lines.append(f"| `{case_id}` | {_syntax_names(case.syntax)} | {read_as} | {verdict} |")
    return "\n".join(lines)


def _docs_rows():
    text = DOCS.read_text()
    rows = {}
    for line in text[text.index(TABLE_START) : text.index(TABLE_END)].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`") + (" (zip)" if cells[2] == "zip" else "")] = cells[3]
    return rows


def test_docs_table_states_the_verdicts():
    rows = _docs_rows()
    assert set(rows) == set(EXPECTED)
    for key, expected in EXPECTED.items():
        if expected.startswith("refused:"):
            assert rows[key].startswith("refused: ") and _matches(rows[key], expected), (key, rows[key])
        else:
            assert rows[key].startswith(expected.replace("equal ", "equal to ")), (key, rows[key])


def _expected_of(verdict: str) -> str:
    if not verdict.startswith("refused:"):
        return verdict
    phrase = next((p for p in PHRASES if p in verdict), verdict.removeprefix("refused: "))
    return f"refused: {phrase}"


if __name__ == "__main__":  # rewrite EXPECTED here and the docs table from what the reader does now
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        every = {}
        for case in CASES.values():
            every.update(verdicts(case, Path(tmp) / case.slug))
    text = DOCS.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    DOCS.write_text(f"{head}{TABLE_START}\n{table(every)}\n{TABLE_END}{tail}")
    source = Path(__file__).read_text()
    head, found, rest = source.partition("EXPECTED: dict[str, str] = {\n")
    body, end, tail = rest.partition("\n}\n")
    assert found and end, "EXPECTED is not where it was"
    body = "".join(f"    {key!r}: {_expected_of(verdict)!r},\n" for key, verdict in every.items())
    Path(__file__).write_text(f"{head}EXPECTED: dict[str, str] = {{\n{body}}}\n{tail}")
    disagree = {key: verdict for key, verdict in every.items() if verdict.startswith("DISAGREE")}
    print(f"{len(every)} verdicts; disagreements: {disagree}")
