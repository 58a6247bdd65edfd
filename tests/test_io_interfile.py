"""STIR Interfile images and projection data: STIR's own files, round trips, formats and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sirf_ddip.data import Image, ProjData
from sirf_ddip.errors import InputFileError, OutputExistsError, UnsupportedDataError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.io import read_image, read_projdata, write_image, write_projdata
from sirf_ddip.io.header import InterfileHeader
from sirf_ddip.io.interfile import file_to_memory_order, memory_to_file_order

from conftest import stir_case_dir
from toy_physics import tiny_geometry

IMAGE_HEADER = """!INTERFILE  :=
name of data file := {data}
imagedata byte order := {order}
!number format := {fmt}
!number of bytes per pixel := {nbytes}
number of dimensions := {ndim}
matrix axis label [1] := x
!matrix size [1] := 4
scaling factor (mm/pixel) [1] := 2.5
matrix axis label [2] := y
!matrix size [2] := 3
scaling factor (mm/pixel) [2] := 2.5
matrix axis label [3] := z
!matrix size [3] := 2
scaling factor (mm/pixel) [3] := 3.0
first pixel offset (mm) [1] := -3.75
first pixel offset (mm) [2] := -2.5
first pixel offset (mm) [3] := 1.5
{extra}number of time frames := {frames}
!END OF INTERFILE :=
"""


def _write_raw_image(tmp_path, values, dtype, order="LITTLEENDIAN", fmt="float", nbytes=4, extra="", frames=1,
                     ndim=3, offset=0, name="img"):
    data = tmp_path / f"{name}.v"
    raw = np.asarray(values).astype(dtype).tobytes()
    data.write_bytes(b"\0" * offset + raw)
    hv = tmp_path / f"{name}.hv"
    hv.write_text(IMAGE_HEADER.format(data=data.name, order=order, fmt=fmt, nbytes=nbytes, extra=extra,
                                      frames=frames, ndim=ndim))
    return hv


# ---------------------------------------------------------------------------------------------- STIR files
@pytest.mark.stir_reference
def test_reads_every_stir_reference_file(stir_case):
    case = json.loads((stir_case / "case.json").read_text())
    n_hv = n_hs = 0
    for hv in sorted(stir_case.glob("*.hv")):
        img = read_image(hv)
        assert img.array.shape == tuple(case["image_shape"]), hv
        np.testing.assert_allclose(img.grid.voxel_size, case["voxel_size_mm_zyx"], rtol=1e-5)
        raw = np.fromfile(InterfileHeader.read(hv).data_file(), "<f4")
        assert float(img.array.sum(dtype=np.float64)) == pytest.approx(float(raw.sum(dtype=np.float64)), rel=1e-12)
        n_hv += 1
    for hs in sorted(stir_case.glob("*.hs")):
        pd = read_projdata(hs)
        nsino = sum(case["rings"] - abs(d) for d in range(-case["max_ring_diff"], case["max_ring_diff"] + 1))
        assert pd.array.shape == (nsino, case["views"], case["tang"]), hs
        raw = np.fromfile(InterfileHeader.read(hs).data_file(), "<f4")
        assert float(pd.array.sum(dtype=np.float64)) == pytest.approx(float(raw.sum(dtype=np.float64)), rel=1e-12)
        n_hs += 1
    assert n_hv >= 7 and n_hs >= 5
    prompts = read_projdata(stir_case / "prompts.hs")
    assert float(prompts.array.sum(dtype=np.float64)) == case["total_prompts"]
    assert float(prompts.array.min()) >= 0
    assert np.all(prompts.array == np.round(prompts.array))  # counts


@pytest.mark.stir_reference
def test_segment_order_file_to_memory():
    d = stir_case_dir("mmr_3d6")
    pd = read_projdata(d / "prompts.hs")
    raw = np.fromfile(d / "prompts.s", "<f4")
    # file: segments -5..5, each (view, axial, tang); axial sizes 1..6..1
    sizes = [1, 2, 3, 4, 5, 6, 5, 4, 3, 2, 1]
    blocks, pos = {}, 0
    for seg, n in zip(range(-5, 6), sizes):
        blocks[seg] = raw[pos:pos + n * 252 * 128].reshape(252, n, 128).transpose(1, 0, 2)
        pos += n * 252 * 128
    seq = [0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5]
    expected = np.concatenate([blocks[s] for s in seq])
    assert np.array_equal(pd.array, expected)
    assert np.array_equal(pd.array[pd.geometry.file_to_memory_index()],
                          np.concatenate([blocks[s] for s in range(-5, 6)]))


@pytest.mark.stir_reference
def test_projdata_round_trip_is_stir_identical(tmp_path):
    d = stir_case_dir("mmr_3d6")
    pd = read_projdata(d / "prompts.hs")
    out = write_projdata(tmp_path / "copy.hs", pd)
    assert (tmp_path / "copy.s").read_bytes() == (d / "prompts.s").read_bytes()
    ours, stirs = InterfileHeader.read(out), InterfileHeader.read(d / "prompts.hs")
    assert set(ours.keys()) == set(stirs.keys())
    for k in stirs.keys():
        if k != "name of data file":
            assert " ".join(ours.get(k).split()) == " ".join(stirs.get(k).split()), k
    again = read_projdata(out)
    assert np.array_equal(again.array, pd.array) and again.geometry == pd.geometry
    with pytest.raises(OutputExistsError):
        write_projdata(tmp_path / "copy.hs", pd)
    (tmp_path / "copy.hs").unlink()
    with pytest.raises(OutputExistsError, match="copy.s"):  # the data file is protected too
        write_projdata(tmp_path / "copy.hs", pd)
    write_projdata(tmp_path / "copy.hs", pd, overwrite=True)


@pytest.mark.stir_reference
def test_image_round_trip_bit_exact(tmp_path):
    d = stir_case_dir("mmr_3d6")
    img = read_image(d / "phantom.hv")
    write_image(tmp_path / "p.hv", img)
    assert (tmp_path / "p.v").read_bytes() == (d / "phantom.v").read_bytes()
    back = read_image(tmp_path / "p.hv")
    assert np.array_equal(back.array, img.array) and back.grid == img.grid
    stir_keys = set(InterfileHeader.read(d / "phantom.hv").keys())
    assert stir_keys <= set(InterfileHeader.read(tmp_path / "p.hv").keys())


# ---------------------------------------------------------------------------------------------- layouts
def test_sinogram_by_sinogram_file_equals_view_by_view(tmp_path, rng):
    geo = tiny_geometry()
    arr = rng.random(geo.shape).astype(np.float32)
    pd = ProjData(arr, geo)
    write_projdata(tmp_path / "v.hs", pd)
    numbers = [s.number for s in geo.segments]
    axial = [s.num_axial for s in geo.segments]
    flat = memory_to_file_order(arr, numbers, axial, order="sinogram")
    assert np.array_equal(file_to_memory_order(flat, numbers, axial, geo.num_views, geo.num_tangential,
                                               "sinogram"), arr)
    (tmp_path / "sino.s").write_bytes(flat.astype("<f4").tobytes())
    (tmp_path / "sino.hs").write_text("\n".join(geo.header_lines(data_file="sino.s", storage="sinogram")) + "\n")
    hdr = InterfileHeader.read(tmp_path / "sino.hs")
    assert hdr.get("matrix axis label [3]") == "axial coordinate"
    back = read_projdata(tmp_path / "sino.hs")
    assert np.array_equal(back.array, arr)
    assert np.array_equal(read_projdata(tmp_path / "v.hs").array, arr)


@pytest.mark.parametrize("fmt,nbytes,dtype", [
    ("float", 4, "f4"), ("short float", 4, "f4"), ("long float", 8, "f8"), ("float", 8, "f8"),
    ("signed integer", 1, "i1"), ("signed integer", 2, "i2"), ("signed integer", 4, "i4"),
    ("unsigned integer", 1, "u1"), ("unsigned integer", 2, "u2"), ("unsigned integer", 4, "u4")])
@pytest.mark.parametrize("order", ["LITTLEENDIAN", "BIGENDIAN"])
def test_number_formats_and_byte_orders(tmp_path, fmt, nbytes, dtype, order):
    vals = np.arange(24).reshape(2, 3, 4) * (1 if dtype[0] == "u" else -1) + (3 if dtype[0] == "u" else 7)
    bo = "<" if order == "LITTLEENDIAN" else ">"
    hv = _write_raw_image(tmp_path, vals, bo + dtype, order=order, fmt=fmt, nbytes=nbytes)
    img = read_image(hv)
    assert img.array.dtype == np.float32
    assert np.array_equal(img.array, vals.astype(np.float32))
    assert img.grid == ImageGrid((2, 3, 4), (3.0, 2.5, 2.5), (1.5, -2.5, -3.75))


def test_offset_and_scaling_factor(tmp_path):
    vals = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    hv = _write_raw_image(tmp_path, vals, ">i2", order="BIGENDIAN", fmt="signed integer", nbytes=2, offset=100,
                          extra="data offset in bytes [1] := 100\nimage scaling factor [1] := 0.5\n")
    assert np.array_equal(read_image(hv).array, vals * np.float32(0.5))


def test_big_endian_default(tmp_path):
    vals = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    hv = _write_raw_image(tmp_path, vals, ">f4")
    txt = hv.read_text().replace("imagedata byte order := LITTLEENDIAN\n", "")
    hv.write_text(txt)
    assert np.array_equal(read_image(hv).array, vals)  # Interfile default: big endian


# ---------------------------------------------------------------------------------------------- errors
def test_error_messages_name_file_and_key(tmp_path):
    vals = np.zeros((2, 3, 4), np.float32)
    hv = _write_raw_image(tmp_path, vals, "<f4", frames=3, name="frames")
    with pytest.raises(UnsupportedDataError, match=r"frames.hv.*number of time frames.*3 time frames"):
        read_image(hv)
    hv = _write_raw_image(tmp_path, vals, "<f4", fmt="complex", name="fmt")
    with pytest.raises(InputFileError, match=r"fmt.hv.*number format.*unknown number format 'complex'"):
        read_image(hv)
    hv = _write_raw_image(tmp_path, vals, "<f4", ndim=4, name="dims")
    with pytest.raises(InputFileError, match=r"dims.hv.*number of dimensions.*3 dimensions"):
        read_image(hv)
    hv = _write_raw_image(tmp_path, vals[:1], "<f4", name="short")
    with pytest.raises(InputFileError, match=r"short.v.*expected at least 96 bytes.*found 48 bytes"):
        read_image(hv)
    hv = _write_raw_image(tmp_path, vals, "<f4", name="nosize")
    hv.write_text(hv.read_text().replace("!matrix size [2] := 3\n", ""))
    with pytest.raises(InputFileError, match=r"nosize.hv.*matrix size \[2\]"):
        read_image(hv)
    hv = _write_raw_image(tmp_path, vals, "<f4", name="nodata")
    (tmp_path / "nodata.v").unlink()
    with pytest.raises(InputFileError, match=r"nodata.hv.*name of data file.*not found"):
        read_image(hv)


def test_tof_and_bad_projdata_errors(tmp_path, rng):
    geo = tiny_geometry()
    write_projdata(tmp_path / "p.hs", ProjData(rng.random(geo.shape).astype(np.float32), geo))
    txt = (tmp_path / "p.hs").read_text()
    (tmp_path / "tof.hs").write_text(txt.replace("number of time frames := 1",
                                                 "%number of TOF time bins := 13\nnumber of time frames := 1"))
    with pytest.raises(UnsupportedDataError, match="tof.hs.*TOF.*not supported yet"):
        read_projdata(tmp_path / "tof.hs")
    (tmp_path / "d3.hs").write_text(txt.replace("number of dimensions := 4", "number of dimensions := 3"))
    with pytest.raises(InputFileError, match="d3.hs.*number of dimensions"):
        read_projdata(tmp_path / "d3.hs")
    data = (tmp_path / "p.s").read_bytes()
    (tmp_path / "short.s").write_bytes(data[:-8])
    (tmp_path / "short.hs").write_text(txt.replace("name of data file := p.s", "name of data file := short.s"))
    with pytest.raises(InputFileError, match=f"short.s.*expected at least {len(data)} bytes.*found {len(data) - 8}"):
        read_projdata(tmp_path / "short.hs")


def test_write_image_refuses_overwrite(tmp_path):
    img = Image(np.ones((2, 3, 4), np.float32), ImageGrid((2, 3, 4), (3.0, 2.5, 2.5)))
    write_image(tmp_path / "a.hv", img)
    with pytest.raises(OutputExistsError):
        write_image(tmp_path / "a.hv", img)
    (tmp_path / "a.hv").unlink()
    with pytest.raises(OutputExistsError, match="a.v"):
        write_image(tmp_path / "a.hv", img)
    write_image(tmp_path / "a.hv", img.with_array(img.array * 2), overwrite=True)
    assert read_image(tmp_path / "a.hv").array.max() == 2.0
