"""jobs.inputs.formats.nrrd on real files written with pynrrd (and by hand where pynrrd cannot write the flaw),
checked against NIfTI twins written with nibabel and against SimpleITK's reading of the same files."""

import bz2
import gzip
import json
import os

import nibabel as nib
import nrrd
import numpy as np
import pyarrow.dataset as pads
import pytest
import scipy.ndimage
import SimpleITK as sitk

import vit3d
from jobs import manifest as M
from jobs.errors import ScanError
from jobs.inputs import formats
from jobs.inputs.formats.nrrd import NrrdFormat, data_file_uri
from jobs.inputs.load import load_scan
from jobs.run.scorer import scores_from_logits
from jobs.score import run
from vit3d.preprocessing import normalize_spec

SHAPE = (12, 10, 8)
FLIPS = {"LPS": np.diag([-1.0, -1.0, 1.0]), "RAS": np.eye(3), "LAS": np.diag([-1.0, 1.0, 1.0])}
SPACE_NAMES = {"LPS": "left-posterior-superior", "RAS": "right-anterior-superior", "LAS": "left-anterior-superior"}
# voxel -> RAS mm. Entries exact in float32, so a NIfTI twin (float32 header) has the same geometry.
AFFINES = {
    "axial": np.array([[0.75, 0, 0, -10.0], [0, 1.25, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]]),
    "flipped": np.array([[-0.75, 0, 0, 10.0], [0, 0, 1.5, -20.0], [0, -1.25, 0, 30.0], [0, 0, 0, 1]]),
    "oblique": np.array([[0.875, 0.125, 0, -5.0], [-0.0625, -1.125, 0.25, 12.5], [0.125, 0, 2.0, 7.25], [0, 0, 0, 1]]),
}


def volume(seed, shape=SHAPE, dtype=np.int16):
    rng = np.random.default_rng(seed)
    vol = scipy.ndimage.gaussian_filter(rng.normal(0, 400, shape), 1.5) + rng.normal(0, 40, shape)
    if np.dtype(dtype).kind == "u":
        vol = vol - vol.min()
    if np.dtype(dtype).itemsize == 1:
        vol = vol * (120 / max(np.abs(vol).max(), 1))
    return vol.astype(dtype)


def spec(**kw):
    return normalize_spec(kw, size=kw.pop("size", [16, 16, 16]))


def geometry(affine, space="LPS"):
    """(space directions, space origin) of a RAS affine, in ``space``'s coordinates."""
    flip = FLIPS[space]
    return (flip @ affine[:3, :3]).T, flip @ affine[:3, 3]


def write_nrrd(path, data, affine, space="LPS", encoding="gzip", **fields):
    """``data`` (i, j, k) with the RAS ``affine`` as NRRD written by pynrrd (``.nhdr``: detached)."""
    directions, origin = geometry(affine, space)
    header = {"space": SPACE_NAMES[space], "space directions": directions, "space origin": origin}
    header.update(encoding=encoding, **fields)
    nrrd.write(str(path), data, header)
    return str(path)


def write_nifti(path, data, affine):
    image = nib.Nifti1Image(data, affine, dtype=data.dtype)
    nib.save(image, str(path))
    return str(path)


def header_text(*fields, magic="NRRD0004"):
    return ("\n".join([magic, *fields]) + "\n\n").encode()


def plain_fields(shape=SHAPE, kind="short", affine=AFFINES["axial"], space="LPS"):
    """Header fields by hand (for what pynrrd will not write): a valid LPS int16 3-D volume."""
    directions, origin = geometry(affine, space)
    return [
        f"type: {kind}",
        f"dimension: {len(shape)}",
        f"sizes: {' '.join(map(str, shape))}",
        "endian: little",
        "encoding: raw",
        f"space: {SPACE_NAMES[space]}",
        "space directions: " + " ".join("(" + ",".join(f"{x:.17g}" for x in row) + ")" for row in directions),
        "space origin: (" + ",".join(f"{x:.17g}" for x in origin) + ")",
    ]


def replace_field(fields, name, line):
    return [line if f.split(":")[0] == name else f for f in fields]


def body(data):
    return data.tobytes(order="F")


def expect_error(path, stage, *words):
    with pytest.raises(ScanError) as info:
        load_scan(str(path), spec())
    err = info.value
    assert err.stage == stage, str(err)
    assert err.path == str(path) and str(err).startswith(f"{path}: ")
    for word in words:
        assert word in err.reason, err.reason
    return err


# ------------------------------------------------------------------------------------------------ round trip


CASES = [
    # (space, affine, dtype, encoding, detached)
    ("LPS", "axial", np.int16, "gzip", False),
    ("RAS", "axial", np.int16, "raw", False),
    ("LAS", "axial", np.float32, "gzip", True),
    ("LPS", "flipped", np.uint8, "raw", True),
    ("RAS", "flipped", np.float64, "bzip2", False),
    ("LPS", "oblique", np.int16, "raw", True),
    ("RAS", "oblique", np.uint16, "gzip", True),
    ("LPS", "oblique", np.int32, "bzip2", True),
    ("RAS", "oblique", np.int8, "gzip", False),
    ("LPS", "axial", np.dtype(">i2"), "raw", False),  # big-endian
    ("RAS", "oblique", np.dtype(">f4"), "gzip", True),
    ("LPS", "flipped", np.uint32, "raw", False),
    ("LPS", "axial", np.int64, "gzip", False),
]


@pytest.mark.parametrize(("space", "orientation", "dtype", "encoding", "detached"), CASES)
def test_same_tensor_as_the_nifti_twin(tmp_path, space, orientation, dtype, encoding, detached):
    affine = AFFINES[orientation]
    data = volume(7, dtype=dtype)
    path = write_nrrd(tmp_path / ("scan.nhdr" if detached else "scan.nrrd"), data, affine, space, encoding)
    twin = write_nifti(tmp_path / "twin.nii.gz", data.astype(data.dtype.newbyteorder("=")), affine)
    if detached:
        suffix = {"raw": ".raw", "gzip": ".raw.gz", "bzip2": ".raw.bz2"}[encoding]
        assert os.path.exists(tmp_path / f"scan{suffix}")

    for model_spec in (spec(), spec(spacing=[1.0, 1.0, 1.0], size=[12, 14, 10], interpolation_order=3)):
        tensor, provenance = load_scan(path, model_spec)
        expected, twin_provenance = load_scan(twin, model_spec)
        assert tensor.shape == expected.shape and tensor.dtype == np.float32
        np.testing.assert_allclose(tensor, expected, atol=1e-6, rtol=0)
        for key in ("original_shape", "orientation", "source_dtype"):
            assert provenance[key] == twin_provenance[key], key
        np.testing.assert_allclose(provenance["voxel_spacing"], twin_provenance["voxel_spacing"], rtol=1e-6)


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_geometry_and_voxels_match_pynrrd_and_simpleitk(tmp_path, orientation):
    """The volume is pynrrd's own array; the affine is SimpleITK's (LPS) geometry taken to RAS; the LPS, RAS and
    LAS spellings of one geometry give the same affine."""
    affine = AFFINES[orientation]
    data = volume(3)
    fmt = NrrdFormat()
    volumes = []
    for space in ("LPS", "RAS", "LAS"):
        path = write_nrrd(tmp_path / f"{space}.nrrd", data, affine, space, "raw")
        v = fmt.decode(fmt.check(path, fmt.fetch(path, None), {}))
        np.testing.assert_array_equal(v.data, nrrd.read(path)[0])
        assert v.data.dtype == np.int16 and not v.data.flags.writeable and v.data.flags.f_contiguous
        assert (v.slope, v.inter, v.dtype) == (1.0, 0.0, "int16")
        volumes.append(v)
    for v in volumes:
        np.testing.assert_allclose(v.affine, affine, atol=1e-12)
        np.testing.assert_allclose(v.zooms, np.linalg.norm(affine[:3, :3], axis=0))
        assert v.orientation == "".join(nib.orientations.aff2axcodes(affine))

    image = sitk.ReadImage(str(tmp_path / "LPS.nrrd"))
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, volumes[0].affine, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).T, volumes[0].data)


@pytest.mark.parametrize("axis", [0, 3])
def test_4d_with_one_size_1_non_spatial_axis_is_the_3d_volume(tmp_path, axis):
    affine = AFFINES["oblique"]
    data = volume(5)
    directions, origin = geometry(affine)
    none = np.full((1, 3), np.nan)
    rows = np.vstack([none, directions] if axis == 0 else [directions, none])
    kinds = ["domain"] * 3
    kinds.insert(axis, "list")
    path = str(tmp_path / "four.nrrd")
    header = {"space": "left-posterior-superior", "space directions": rows, "space origin": origin, "kinds": kinds}
    nrrd.write(path, np.expand_dims(data, axis), header)
    assert nrrd.read_header(path)["dimension"] == 4
    tensor, provenance = load_scan(path, spec())
    expected, _ = load_scan(write_nifti(tmp_path / "twin.nii", data, affine), spec())
    np.testing.assert_allclose(tensor, expected, atol=1e-6, rtol=0)
    assert provenance["original_shape"] == list(SHAPE)


def test_line_skip_byte_skip_and_data_at_the_end(tmp_path):
    """A detached header over another program's file: line skip, byte skip, byte skip -1 (data at the end), and
    a gzip byte skip counted in the inflated bytes, as teem (NrrdIO, in ITK and Slicer) reads them."""
    affine = AFFINES["flipped"]
    data = volume(11)
    twin, _ = load_scan(write_nifti(tmp_path / "twin.nii", data, affine), spec())
    fields = plain_fields(affine=affine)
    prefix = b"FOREIGN HEADER\nline two\n" + bytes(range(62))
    cases = {
        "skips": (["line skip: 2", "byte skip: 62"], prefix + body(data)),
        "end": (["byte skip: -1"], prefix + b"\n\n" + body(data)),
        "gz": (["line skip: 2", "byte skip: 62"], b"A\nB\n" + gzip.compress(bytes(range(62)) + body(data))),
    }
    for name, (skips, blob) in cases.items():
        (tmp_path / f"{name}.dat").write_bytes(blob)
        extra = [f"data file: ./{name}.dat", *skips]
        lines = replace_field(fields, "encoding", "encoding: gzip") if name == "gz" else fields
        (tmp_path / f"{name}.nhdr").write_bytes(header_text(*lines, *extra))
        tensor, _ = load_scan(str(tmp_path / f"{name}.nhdr"), spec())
        np.testing.assert_allclose(tensor, twin, atol=1e-6, rtol=0)
        if name != "gz":  # pynrrd skips a gzip byte skip twice (in the file, then inflated); teem, once inflated
            np.testing.assert_array_equal(nrrd.read(str(tmp_path / f"{name}.nhdr"))[0], data)
    # attached: the header's blank line, then two lines to skip, then the voxels
    attached = tmp_path / "attached.nrrd"
    attached.write_bytes(header_text(*fields, "line skip: 2") + b"junk\n\n" + body(data))
    np.testing.assert_allclose(load_scan(str(attached), spec())[0], twin, atol=1e-6, rtol=0)


def test_claims_sniff_and_registry_order(tmp_path):
    fmt = NrrdFormat()
    for path in ("a.nrrd", "b/c.NHDR", "s3://bucket/x/scan.nrrd?endpoint_override=h:1&scheme=http"):
        assert fmt.claims(path), path
    for path in ("a.raw", "a.raw.gz", "a.nrrd.gz", "a.nii.gz", "s3://bucket/x.nii?x=.nrrd"):
        assert not fmt.claims(path), path
    assert fmt.sniff("x", b"NRRD0004\ntype: short") and not fmt.sniff("x", b"\x1f\x8b")
    names = [f.name for f in formats.registered()]
    assert names.index("nrrd") < names.index("nifti") == len(names) - 1
    # a NRRD file under another name is recognised by its magic
    path = write_nrrd(tmp_path / "scan.bin", volume(1), AFFINES["axial"], "RAS", "raw")
    chosen, first = formats.format_for(path)
    assert chosen.name == "nrrd" and first is not None
    expected, _ = load_scan(write_nifti(tmp_path / "twin.nii", volume(1), AFFINES["axial"]), spec())
    np.testing.assert_allclose(load_scan(path, spec())[0], expected, atol=1e-6, rtol=0)


def test_data_file_names_stay_in_the_header_folder():
    assert data_file_uri("/d/h.nhdr", "x.raw") == "/d/x.raw"
    assert data_file_uri("/d/h.nhdr", "./sub/x.raw") == "/d/sub/x.raw"
    assert data_file_uri("h.nhdr", "x.raw") == "./x.raw"
    assert data_file_uri("s3://b/p/h.nhdr?scheme=http", "./x.raw.gz") == "s3://b/p/x.raw.gz?scheme=http"
    for name, words in (
        ("/etc/x.raw", "absolute"),
        ("C:\\x.raw", "absolute"),
        ("s3://other/x.raw", "absolute"),
        ("../x.raw", "leaves"),
        ("sub/../../x.raw", "leaves"),
        ("LIST", "LIST"),
        ("slice%03d.raw 1 10 1", "numbered sequence"),
        ("", "empty"),
    ):
        with pytest.raises(ValueError, match=words):
            data_file_uri("/d/h.nhdr", name)


# ------------------------------------------------------------------------------------------------ bad files


def build_bad_files(folder):
    """One real bad file per flaw: {name: (path, stage, words)}."""
    folder.mkdir(parents=True, exist_ok=True)
    data = volume(2)
    affine = AFFINES["oblique"]
    good_raw = folder / "good-raw.nrrd"
    write_nrrd(good_raw, data, affine, encoding="raw")
    good_gz = folder / "good-gz.nrrd"
    write_nrrd(good_gz, data, affine, encoding="gzip")
    gz = good_gz.read_bytes()
    start = gz.index(b"\n\n") + 2
    fields = plain_fields(affine=affine)
    bad = {}

    def add(name, blob, stage, *words):
        path = folder / name
        path.write_bytes(blob)
        bad[name] = (str(path), stage, words)

    raw = good_raw.read_bytes()
    add("truncated.nrrd", raw[: len(raw) - 100], "validate", "truncated", "needs 12x10x8 int16 = 1920 bytes")
    add("truncated-gz.nrrd", gz[: start + (len(gz) - start) // 2], "validate", "truncated", "gzip trailer")
    corrupt = bytearray(gz)
    middle = start + (len(gz) - start) // 2
    corrupt[middle : middle + 16] = bytes(16)
    add("corrupt-gz.nrrd", bytes(corrupt), "decode", "gzip")
    add("extra.nrrd", raw + b"\0" * 40, "validate", "40 bytes more than the header describes")
    write_nrrd(folder / "tmp.nrrd", data, affine, encoding="bzip2")
    bz = (folder / "tmp.nrrd").read_bytes()
    os.remove(folder / "tmp.nrrd")
    bz_start = bz.index(b"\n\nBZh") + 2
    add("truncated-bz2.nrrd", bz[: bz_start + (len(bz) - bz_start) // 2], "decode", "bzip2")
    add("wrong-magic.nrrd", b"P5\n12 10\n255\n" + bytes(960), "validate", "not a NRRD file")
    add("empty.nrrd", b"", "validate", "empty file")
    add("version6.nrrd", header_text(*fields, magic="NRRD0006") + body(data), "validate", "version")
    no_geometry = [f for f in fields if not f.startswith("space")]
    add("no-space.nrrd", header_text(*no_geometry) + body(data), "validate", "no world geometry", "never guessed")
    add("spacings-only.nrrd", header_text(*no_geometry, "spacings: 1 1 2") + body(data), "validate", "'spacings'")
    unnamed = replace_field(fields, "space", "space dimension: 3")
    add("unnamed-space.nrrd", header_text(*unnamed) + body(data), "validate", "without a 'space' field")
    scanner = replace_field(fields, "space", "space: scanner-xyz")
    add("scanner-xyz.nrrd", header_text(*scanner) + body(data), "validate", "'scanner-xyz'", "LPS")
    no_origin = [f for f in fields if not f.startswith("space origin")]
    add("no-origin.nrrd", header_text(*no_origin) + body(data), "validate", "space origin")
    no_dirs = [f for f in fields if not f.startswith("space directions")]
    add("no-directions.nrrd", header_text(*no_dirs) + body(data), "validate", "no 'space directions'")
    singular = replace_field(fields, "space directions", "space directions: (1,0,0) (0,1,0) (2,0,0)")
    add("singular.nrrd", header_text(*singular) + body(data), "validate", "singular")
    zero = replace_field(fields, "space directions", "space directions: (1,0,0) (0,0,0) (0,0,2)")
    add("zero-direction.nrrd", header_text(*zero) + body(data), "validate", "singular")
    cm = [*fields, 'space units: "cm" "cm" "cm"']
    add("centimetres.nrrd", header_text(*cm) + body(data), "validate", "only mm")
    add("block.nrrd", header_text(*plain_fields(kind="block")) + body(data), "validate", "unsupported type 'block'")
    ascii_ = replace_field(fields, "encoding", "encoding: ascii")
    add("ascii.nrrd", header_text(*ascii_) + b"1 2 3\n", "validate", "unsupported encoding 'ascii'")
    no_endian = [f for f in fields if not f.startswith("endian")]
    add("no-endian.nrrd", header_text(*no_endian) + body(data), "validate", "'endian'")
    skip_gz = replace_field(fields, "encoding", "encoding: gzip") + ["byte skip: -1"]
    add("skip-gz.nrrd", header_text(*skip_gz) + gz[start:], "validate", "byte skip -1", "raw")
    add("no-sizes.nrrd", header_text(*[f for f in fields if not f.startswith("sizes")]), "validate", "'sizes'")
    zero_size = plain_fields(shape=(12, 0, 8))
    add("zero-size.nrrd", header_text(*zero_size), "validate", ">= 1")
    huge = plain_fields(shape=(4096, 4096, 4096))
    add("huge.nrrd", header_text(*huge), "validate", "GiB")

    two_d = folder / "two-d.nrrd"
    nrrd.write(str(two_d), data[:, :, 0], {"space": "left-posterior-superior", "encoding": "raw"})
    bad["two-d.nrrd"] = (str(two_d), "validate", ("2-D image", "12x10"))
    color = folder / "rgb.nrrd"
    directions, origin = geometry(affine)
    rows = np.vstack([np.full((1, 3), np.nan), directions[:2]])
    header = {"space": "left-posterior-superior", "space directions": rows, "space origin": origin}
    nrrd.write(str(color), np.zeros((3, 12, 10), np.uint8), dict(header, kinds=["RGB-color", "domain", "domain"]))
    bad["rgb.nrrd"] = (str(color), "validate", ("axis 0 has no space direction", "RGB-color"))
    multi = folder / "multi.nrrd"
    rows = np.vstack([directions, np.full((1, 3), np.nan)])
    header = {"space": "left-posterior-superior", "space directions": rows, "space origin": origin}
    nrrd.write(str(multi), np.stack([data] * 3, axis=-1), dict(header, kinds=["domain"] * 3 + ["list"]))
    bad["multi.nrrd"] = (str(multi), "validate", ("4-D image with 3 volumes", "axis 3", "'list'"))

    # detached headers
    missing = folder / "missing.nhdr"
    write_nrrd(missing, data, affine, encoding="raw")
    os.remove(folder / "missing.raw")
    bad["missing.nhdr"] = (str(missing), "read", ("data file", str(folder / "missing.raw"), "not found"))
    short = folder / "short.nhdr"
    write_nrrd(short, data, affine, encoding="raw")
    (folder / "short.raw").write_bytes(body(data)[:1000])
    bad["short.nhdr"] = (str(short), "validate", ("truncated", str(folder / "short.raw"), "holds 1000 bytes"))
    # a refused header never has its data file read: this one's is missing too, and the error is the header's
    refused = [f for f in fields if not f.startswith("space origin")] + ["data file: nowhere.raw"]
    add("refused.nhdr", header_text(*refused), "validate", "space origin")
    add("list.nhdr", header_text(*fields, "data file: LIST", "a.raw", "b.raw"), "validate", "LIST")
    add("list-last.nhdr", header_text(*fields, "data file: LIST"), "validate", "LIST")
    add("parent.nhdr", header_text(*fields, "data file: ../good.raw"), "validate", "leaves the header's folder")
    add("absolute.nhdr", header_text(*fields, f"data file: {folder}/x.raw"), "validate", "absolute path")
    add("numbered.nhdr", header_text(*fields, "data file: s%03d.raw 1 8 1 2"), "validate", "numbered sequence")
    os.remove(good_raw)
    os.remove(good_gz)
    return bad


def test_bad_files_are_one_clear_error_each(tmp_path):
    for name, (path, stage, words) in build_bad_files(tmp_path / "bad").items():
        err = expect_error(path, stage, *words)
        assert "\n" not in str(err) and len(err.reason) < 400, (name, str(err))


@pytest.mark.parametrize("shape", [(12, 10, 1), (1, 10, 8)])
def test_a_single_slice_is_not_a_3d_scan(tmp_path, shape):
    """As NIfTI and DICOM: one slice is refused from the header, never scored as a volume."""
    path = tmp_path / "slice.nrrd"
    write_nrrd(path, volume(3, shape), AFFINES["oblique"])
    expect_error(path, "validate", "2-D image", "expected a 3-D volume")


def test_inflation_is_bounded_by_the_header(tmp_path):
    """A gzip stream holding more than the header says (its size trailer forged to pass the pre-check): the
    inflation stops one byte past the expected size instead of inflating everything."""
    data = volume(4)
    fields = replace_field(plain_fields(), "encoding", "encoding: gzip")
    stream = bytearray(gzip.compress(body(data) + bytes(10_000_000)))
    stream[-4:] = (data.nbytes % 2**32).to_bytes(4, "little")
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(header_text(*fields) + bytes(stream))
    expect_error(path, "decode", "more than the 1920 bytes")
    # the same for bzip2 (no size trailer: only the bound)
    fields = replace_field(plain_fields(), "encoding", "encoding: bzip2")
    path.write_bytes(header_text(*fields) + bz2.compress(body(data) + bytes(10_000_000)))
    expect_error(path, "decode", "more than the 1920 bytes")
    path.write_bytes(header_text(*fields) + bz2.compress(body(data)) + b"junk")
    expect_error(path, "decode", "trailing data")


# ------------------------------------------------------------------------------------------------ fingerprint, listing


def test_fingerprint_of_a_detached_header_covers_its_data_file(tmp_path):
    data = volume(6)
    header = write_nrrd(tmp_path / "scan.nhdr", data, AFFINES["axial"], encoding="raw")
    raw = tmp_path / "scan.raw"
    os.utime(header, ns=(1_000_000_000_000_000, 1_000_000_000_000_000))
    os.utime(raw, ns=(2_000_000_000_000_000, 2_000_000_000_000_000))
    expected = (os.path.getsize(header) + os.path.getsize(raw), 2_000_000_000_000)
    assert formats.fingerprint(header) == NrrdFormat().fingerprint(header) == expected
    raw.write_bytes(body(data))  # rewritten: same size, new mtime -> another fingerprint
    assert formats.fingerprint(header) != expected
    os.remove(raw)
    assert formats.fingerprint(header) is None  # the source cannot be stat'ed as a whole
    attached = write_nrrd(tmp_path / "scan.nrrd", data, AFFINES["axial"])
    stat = os.stat(attached)
    assert formats.fingerprint(attached) == (stat.st_size, stat.st_mtime_ns // 1000)
    (tmp_path / "bad.nhdr").write_bytes(header_text(*plain_fields(), "data file: ../x.raw"))
    stat = os.stat(tmp_path / "bad.nhdr")  # names no usable data file: the header alone is judged
    assert formats.fingerprint(str(tmp_path / "bad.nhdr")) == (stat.st_size, stat.st_mtime_ns // 1000)


def test_manifest_lists_nrrd_and_nhdr_but_not_data_files(tmp_path, capsys):
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    write_nrrd(root / "a.nrrd", volume(1), AFFINES["axial"])
    write_nrrd(root / "sub" / "b.nhdr", volume(1), AFFINES["axial"], encoding="gzip")
    write_nrrd(root / "sub" / "c.nhdr", volume(1), AFFINES["axial"], encoding="raw")
    write_nifti(root / "d.nii.gz", volume(1), AFFINES["axial"])
    out = tmp_path / "m.csv"
    assert M.main(["--root", str(root), "--nrrd", "--out", str(out)]) == 0
    assert "3 scans listed" in capsys.readouterr().out
    table = M.read_manifest(str(out))
    assert table["scan_id"].to_pylist() == ["a.nrrd", "sub/b.nhdr", "sub/c.nhdr"]
    assert sorted(os.listdir(root / "sub")) == ["b.nhdr", "b.raw.gz", "c.nhdr", "c.raw"]
    assert M.main(["--help"]) == 0
    assert "--nrrd" in capsys.readouterr().out
    for path in table["path"].to_pylist():
        load_scan(path, spec())


def test_detached_header_on_object_storage(tmp_path, s3_env, s3_bucket):
    client, bucket = s3_bucket
    data = volume(9)
    write_nrrd(tmp_path / "scan.nhdr", data, AFFINES["oblique"], "RAS", "gzip")
    for name in ("scan.nhdr", "scan.raw.gz"):
        client.upload_file(str(tmp_path / name), bucket, f"nrrd/{name}")
    expected, _ = load_scan(write_nifti(tmp_path / "twin.nii", data, AFFINES["oblique"]), spec())
    uri = f"s3://{bucket}/nrrd/scan.nhdr"
    query = f"?endpoint_override=127.0.0.1:{s3_env['port']}&scheme=http"
    for path in (uri, uri + query):
        np.testing.assert_allclose(load_scan(path, spec())[0], expected, atol=1e-6, rtol=0)
    size = os.path.getsize(tmp_path / "scan.nhdr") + os.path.getsize(tmp_path / "scan.raw.gz")
    assert formats.fingerprint(uri)[0] == size
    client.delete_object(Bucket=bucket, Key="nrrd/scan.raw.gz")
    err = expect_error(uri, "read", "not found")
    assert f"s3://{bucket}/nrrd/scan.raw.gz" in err.reason


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_score_nrrd_beside_nifti_twins_end_to_end(ray_cluster, tiny_model, tmp_path):
    """One jobs.score run: good NRRD files (attached/detached, LPS/RAS, raw/gzip/bzip2) scored as the model scores
    their NIfTI twins, each bad file one error row naming it; a rerun skips the known-bad ones while unchanged and
    scores a detached header whose data file was re-sent intact."""
    model_path, _ = tiny_model
    rows, twins = [], {}
    good = [
        ("lps-gz", "nrrd", "LPS", "axial", "gzip"),
        ("ras-raw", "nhdr", "RAS", "oblique", "raw"),
        ("lps-bz2", "nhdr", "LPS", "flipped", "bzip2"),
        ("las-raw", "nrrd", "LAS", "oblique", "raw"),
    ]
    for n, (name, ext, space, orientation, encoding) in enumerate(good):
        data = volume(20 + n, shape=(14 + n, 12, 10))
        path = write_nrrd(tmp_path / f"{name}.{ext}", data, AFFINES[orientation], space, encoding)
        twins[name] = write_nifti(tmp_path / f"{name}.nii.gz", data, AFFINES[orientation])
        rows += [{"scan_id": name, "path": path}, {"scan_id": f"twin-{name}", "path": twins[name]}]
    bad = build_bad_files(tmp_path / "bad")
    chosen = ["truncated.nrrd", "corrupt-gz.nrrd", "no-space.nrrd", "multi.nrrd", "missing.nhdr", "short.nhdr"]
    chosen += ["singular.nrrd", "block.nrrd"]
    rows += [{"scan_id": f"bad-{name}", "path": bad[name][0]} for name in chosen]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    output = str(tmp_path / "out")
    report = run(  # float32: the twins and the model called directly are compared to 1e-5
        str(manifest),
        model_path,
        output,
        device="cpu",
        precision="float32",
        batch_size=4,
        max_error_rate=0.6,
        progress=False,
    )
    results = {r["scan_id"]: r for r in pads.dataset(output + "/results", format="parquet").to_table().to_pylist()}
    errors = {r["scan_id"]: r for r in pads.dataset(output + "/errors", format="parquet").to_table().to_pylist()}
    assert set(errors) == {f"bad-{name}" for name in chosen} and report["counts"]["error"] == len(chosen)
    for name in chosen:
        path, stage, words = bad[name]
        err = errors[f"bad-{name}"]
        assert err["stage"] == stage and err["error"].startswith(f"{path}: "), err
        assert all(w in err["error"] for w in words), err["error"]
        assert err["permanent"] == (stage != "read")

    model, info = vit3d.load_with_info(model_path)
    for name, *_ in good:
        row, twin = results[name], results[f"twin-{name}"]
        assert abs(row["score"] - twin["score"]) <= 1e-5, name
        np.testing.assert_allclose(row["probabilities"], twin["probabilities"], atol=1e-5)
        direct = float(scores_from_logits(np.asarray(model(load_scan(row["path"], info.preprocessing)[0][None])))[0][0])
        assert abs(row["score"] - direct) <= 1e-5
        for key in ("original_shape", "orientation", "source_dtype"):
            assert row[key] == twin[key], (name, key)

    again = run(str(manifest), model_path, output, device="cpu", batch_size=4, max_error_rate=0.6, progress=False)
    counts = again["counts"]
    assert (counts["skipped_done"], counts["skipped_known_bad"], counts["error"]) == (len(results), len(chosen) - 1, 1)

    # short.nhdr's data file re-sent whole: the header is unchanged but the fingerprint covers the data file
    (tmp_path / "bad" / "short.raw").write_bytes(body(volume(2)))
    third = run(str(manifest), model_path, output, device="cpu", batch_size=4, max_error_rate=0.6, progress=False)
    assert third["counts"]["ok"] == 1 and third["counts"]["skipped_known_bad"] == len(chosen) - 2
