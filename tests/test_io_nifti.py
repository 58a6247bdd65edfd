"""NIfTI I/O: exact round trips and the STIR → RAS convention (x → L, y → P, z → I)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from sirf_ddip.data import Image
from sirf_ddip.errors import InputFileError, OutputExistsError, UnsupportedDataError
from sirf_ddip.geometry.image import ImageGrid
from sirf_ddip.io import read_image, write_image


def _img(rng):
    grid = ImageGrid((3, 4, 5), (2.03125, 2.08626, 2.08626), (-7.5, -4.2, -3.3))
    return Image(rng.random(grid.shape).astype(np.float32), grid)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_exact(tmp_path, rng, suffix):
    img = _img(rng)
    write_image(tmp_path / f"a{suffix}", img)
    back = read_image(tmp_path / f"a{suffix}")
    assert np.array_equal(back.array, img.array)
    assert back.grid == img.grid
    with pytest.raises(OutputExistsError):
        write_image(tmp_path / f"a{suffix}", img)


def test_affine_convention(tmp_path, rng):
    img = _img(rng)
    write_image(tmp_path / "a.nii", img)
    n = nib.load(tmp_path / "a.nii")
    assert nib.aff2axcodes(n.affine) == ("L", "P", "I")
    # voxel [z=2, y=1, x=3] sits at STIR (x, y, z) = origin + index * voxel; RAS = -(x, y, z)
    g = img.grid
    stir_xyz = np.array([g.origin[2] + 3 * g.voxel_size[2], g.origin[1] + 1 * g.voxel_size[1],
                         g.origin[0] + 2 * g.voxel_size[0]])
    ras = n.affine @ np.array([3, 1, 2, 1.0])
    np.testing.assert_allclose(ras[:3], -stir_xyz, rtol=1e-6)
    assert np.asarray(n.dataobj)[3, 1, 2] == img.array[2, 1, 3]


def test_reads_any_axis_order(tmp_path, rng):
    img = _img(rng)
    write_image(tmp_path / "a.nii", img)
    n = nib.load(tmp_path / "a.nii")
    canon = nib.as_closest_canonical(n)  # flips to RAS storage
    canon.header.extensions.clear()
    nib.save(canon, tmp_path / "ras.nii")
    back = read_image(tmp_path / "ras.nii")
    assert np.array_equal(back.array, img.array)
    assert back.grid.matches(img.grid)


def test_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        read_image(tmp_path / "missing.nii")
    with pytest.raises(InputFileError, match="unknown image format"):
        read_image(tmp_path / "x.img")
    aff = np.eye(4)
    aff[:3, :3] = [[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]]
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), aff), tmp_path / "obl.nii")
    with pytest.raises(UnsupportedDataError, match="obl.nii.*oblique"):
        read_image(tmp_path / "obl.nii")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(InputFileError, match="3-D"):
        read_image(tmp_path / "t.nii")
