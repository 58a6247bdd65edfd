"""Headers that do not describe their data file, wrong byte order, impossible scanner geometry, non-ASCII names.

Each test is one class of "silently wrong" input of issue 14: today's reader must refuse it, naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.data import Image, ProjData
from sirf_ddip.errors import DataValueError, GeometryError, InputFileError, UnknownScannerError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.geometry.scanner import Scanner, get_scanner
from sirf_ddip.io import read_image, read_projdata, write_image, write_projdata
from sirf_ddip.io.interfile import read_header_and_array
from sirf_ddip.utils.checks import require_finite

from toy_physics import tiny_geometry


def _edit(path: Path, key: str, value: str) -> None:
    text = path.read_text(encoding="utf-8")
    new, n = re.subn(rf"(?im)^(\s*!?{key}\s*:=).*$", lambda m: f"{m.group(1)} {value}", text)
    assert n == 1
    path.write_text(new, encoding="utf-8")


@pytest.fixture
def image(tmp_path):
    grid = ImageGrid((3, 8, 8), (2.0, 4.0, 4.0))
    arr = np.arange(grid.num_voxels, dtype=np.float32).reshape(grid.shape) / 7 + 1
    write_image(tmp_path / "img.hv", Image(arr, grid))
    return tmp_path / "img.hv", arr


@pytest.fixture
def sino(tmp_path):
    geo = tiny_geometry(num_tang=8)
    arr = np.random.default_rng(0).uniform(1, 5, geo.shape).astype(np.float32)
    write_projdata(tmp_path / "p.hs", ProjData(arr, geo))
    return tmp_path / "p.hs", arr


# ------------------------------------------------------------------------------- sizes: the key that is off
def test_image_data_longer_than_header_names_the_matrix_key(image):
    hv, _ = image
    _edit(hv, r"matrix size \[1\]", "7")  # 8 columns on disk, header says 7
    with pytest.raises(InputFileError, match=r"longer than its header.*'!matrix size \[1\] := 8' \(header: 7\)"):
        read_image(hv)


def test_image_wrong_number_format_names_bytes_per_pixel(image):
    hv, _ = image
    _edit(hv, "number format", "signed integer")
    _edit(hv, "number of bytes per pixel", "2")
    with pytest.raises(InputFileError, match=r"4 bytes per value, not 2.*number of bytes per pixel"):
        read_image(hv)


def test_trailing_bytes_are_refused_unless_the_format_allows_them(image):
    hv, arr = image
    with open(hv.with_suffix(".v"), "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(InputFileError, match=r"img\.v.*expected exactly 768 bytes.*found 772"):
        read_image(hv)
    _, vals = read_header_and_array(hv, arr.size, exact=False)  # a format with trailing data
    np.testing.assert_array_equal(vals, arr.ravel())


def test_projdata_half_the_views_names_the_view_key(sino):
    hs, _ = sino
    _edit(hs, r"matrix size \[3\]", "4")  # 8 views on disk
    with pytest.raises(InputFileError, match=r"'!matrix size \[3\] \(views\) := 8' \(header: 4\)"):
        read_projdata(hs)


def test_projdata_one_bin_short_names_the_tangential_key(sino):
    hs, _ = sino
    _edit(hs, r"matrix size \[1\]", "7")
    _edit(hs, "maximum number of non-arc-corrected bins", "7")
    with pytest.raises(InputFileError, match=r"'!matrix size \[1\] \(tangential positions\) := 8' \(header: 7\)"):
        read_projdata(hs)


# ------------------------------------------------------------------------------- byte order
def test_wrong_byte_order_is_named(image):
    hv, _ = image
    _edit(hv, "imagedata byte order", "BIGENDIAN")
    with pytest.raises(InputFileError, match=r"imagedata byte order.*wrong byte order.*LITTLEENDIAN"):
        read_image(hv)


def test_true_big_endian_data_read_fine(image):
    hv, arr = image
    arr.astype(">f4").tofile(hv.with_suffix(".v"))
    _edit(hv, "imagedata byte order", "BIGENDIAN")
    np.testing.assert_array_equal(read_image(hv).array, arr)


def test_mostly_zero_image_with_tiny_values_is_not_called_byte_swapped(tmp_path):
    grid = ImageGrid((3, 8, 8), (2.0, 4.0, 4.0))
    arr = np.zeros(grid.shape, np.float32)
    arr[1, 4, 4] = 3e-20  # odd but valid: swapped it would be absurd too
    write_image(tmp_path / "z.hv", Image(arr, grid))
    np.testing.assert_array_equal(read_image(tmp_path / "z.hv").array, arr)


# ------------------------------------------------------------------------------- against the scanner
def test_ring_difference_impossible_for_the_scanner(sino):
    hs, _ = sino  # 2 rings: |ring difference| <= 1
    _edit(hs, "minimum ring difference per segment", "{-5,0,1}")
    _edit(hs, "maximum ring difference per segment", "{-1,0,5}")
    with pytest.raises(InputFileError, match=r"ring difference per segment.*-5\.\.-1, impossible on a scanner "
                                             r"with 2 ring"):
        read_projdata(hs)


def test_axial_size_contradicting_the_rings(sino):
    hs, _ = sino
    _edit(hs, "number of rings", "3")  # the data are a 2-ring scanner's
    with pytest.raises(InputFileError, match=r"matrix size \[2\].*1 axial positions, but a scanner with 3 rings "
                                             r"gives 2"):
        read_projdata(hs)


def test_stir_span_geometries_pass_the_scanner_check(tmp_path):
    from sirf_ddip.geometry.sinogram import SinogramGeometry

    sc = get_scanner("mMR").with_rings(8)
    for span, mrd in ((1, 7), (3, 7), (5, 6)):
        geo = SinogramGeometry(sc, span=span, max_ring_diff=mrd, view_mashing=21, num_tangential=16)
        write_projdata(tmp_path / f"s{span}.hs", ProjData(np.ones(geo.shape, np.float32), geo), overwrite=True)
        assert read_projdata(tmp_path / f"s{span}.hs").geometry == geo


# ------------------------------------------------------------------------------- named errors at the source
def test_geometry_errors_are_named():
    with pytest.raises(GeometryError, match="voxel_size"):
        ImageGrid((3, 8, 8), (2.0, 0.0, 4.0))
    with pytest.raises(GeometryError, match="origin"):
        ImageGrid((3, 8, 8), (2.0, 4.0, 4.0), (0.0, float("nan"), 0.0))
    with pytest.raises(GeometryError, match="detectors_per_ring"):
        Scanner("odd", 2, 15, 60.0, 5.0, 4.0, 4.0)
    with pytest.raises(UnknownScannerError, match="unknown scanner 'nosuch'; known scanners: Siemens mMR"):
        get_scanner("nosuch")


def test_voxel_size_zero_in_header_names_the_key(image):
    hv, _ = image
    _edit(hv, r"scaling factor \(mm/pixel\) \[2\]", "0")
    with pytest.raises(InputFileError, match=r"scaling factor \(mm/pixel\) \[2\]"):
        read_image(hv)


def test_require_finite_names_source_and_index():
    a = np.ones((2, 3), np.float32)
    require_finite(a, "x.hv")
    a[1, 2] = np.inf
    with pytest.raises(DataValueError, match=r"x\.hv: 0 NaN and 1 Inf value\(s\) in the image \(first at "
                                             r"index \[1, 2\]\)"):
        require_finite(a, "x.hv", "image")


# ------------------------------------------------------------------------------- encodings
@pytest.mark.parametrize("name", ["bild_ü_λ", "名前", "café résumé"])
def test_non_ascii_names_round_trip(tmp_path, name, image, sino):
    _, arr = image
    grid = ImageGrid(arr.shape, (2.0, 4.0, 4.0))
    out = write_image(tmp_path / f"{name}.hv", Image(arr, grid))
    assert f"name of data file := {name}.v".encode("utf-8") in out.read_bytes()
    np.testing.assert_array_equal(read_image(out).array, arr)
    _, s = sino
    hs = write_projdata(tmp_path / f"{name}.hs", ProjData(s, tiny_geometry(num_tang=8)))
    np.testing.assert_array_equal(read_projdata(hs).array, s)


def test_latin1_header_still_reads(image):
    hv, arr = image
    text = hv.read_text(encoding="utf-8").replace("!INTERFILE  :=", "!INTERFILE  :=\n; patient: Müller")
    hv.write_bytes(text.encode("latin-1"))
    np.testing.assert_array_equal(read_image(hv).array, arr)
