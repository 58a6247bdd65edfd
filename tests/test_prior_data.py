"""Training datasets: slab sampling, determinism, NIfTI pairs and MR-grid checks."""

import nibabel as nib
import numpy as np
import pytest
import torch

from sirf_ddip.errors import GeometryMismatchError, InputFileError
from sirf_ddip.prior.data import Augmentation, NiftiSlabDataset, SlabDataset, find_nifti_pairs

from _prior_helpers import blobs


def _ds(aug=None):
    vols = [blobs((8, 16, 16), seed=s) for s in range(2)]
    return SlabDataset([v[0] for v in vols], [v[1] for v in vols], augmentation=aug)


def test_sample_shapes_ranges_and_determinism():
    ds = _ds()
    g = torch.Generator().manual_seed(5)
    pet, mr = ds.sample(6, g)
    assert pet.shape == (6, 3, 16, 16) and mr.shape == (6, 3, 16, 16)
    assert float(pet.min()) >= -1.0 - 1e-6 and float(pet.max()) > 0.5  # background -1, hot ~ +1
    assert float(mr.min()) >= -1.0 - 1e-6
    pet2, mr2 = ds.sample(6, torch.Generator().manual_seed(5))
    assert torch.equal(pet, pet2) and torch.equal(mr, mr2)
    pet3, _ = ds.sample(6, g)
    assert not torch.equal(pet, pet3)


def test_no_augmentation_gives_exact_normalised_slabs():
    pet_v, mr_v = blobs((8, 16, 16), seed=1)
    ds = SlabDataset([pet_v], [mr_v], augmentation=Augmentation(False, 0.0, 0.0, 0.0))
    pet, mr = ds.sample(4, torch.Generator().manual_seed(0))
    s = ds.pet_scaling.fit(pet_v)
    full = torch.from_numpy(s.to_net(pet_v).astype(np.float32))
    for b in range(4):
        hits = [c for c in range(1, 7) if torch.allclose(pet[b], full[c - 1:c + 2], atol=1e-5)]
        assert hits, "sampled slab is not a normalised slab of the volume"


def _write_pair(folder, name, pet, mr, mr_affine=None):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(pet.transpose(2, 1, 0), aff), str(folder / f"{name}_pet.nii.gz"))
    nib.save(nib.Nifti1Image(mr.transpose(2, 1, 0), aff if mr_affine is None else mr_affine),
             str(folder / f"{name}_mr.nii.gz"))


def test_nifti_pairs_folder_csv_and_mismatch(tmp_path):
    pet, mr = blobs((6, 16, 16))
    _write_pair(tmp_path, "a", pet, mr)
    ds = NiftiSlabDataset(tmp_path)
    assert len(ds) == 1 and ds.uses_mr and ds.shape_hw == (16, 16)
    np.testing.assert_allclose(ds.pet[0].numpy() * ds.pet_scaling.fit(pet).scale, pet, rtol=1e-5)
    (tmp_path / "list.csv").write_text("pet,mr\na_pet.nii.gz,a_mr.nii.gz\n")
    assert len(find_nifti_pairs(tmp_path / "list.csv")) == 1
    # MR on another grid: clear error, or resampling on request
    other = tmp_path / "other"
    other.mkdir()
    mr_big = np.repeat(mr, 2, axis=2)  # x twice as many voxels of half size
    _write_pair(other, "b", pet, mr_big, mr_affine=np.diag([1.0, 2.0, 2.0, 1.0]) @ np.eye(4))
    with pytest.raises(GeometryMismatchError, match="resample_mr"):
        NiftiSlabDataset(other)
    ds2 = NiftiSlabDataset(other, resample_mr=True)
    assert ds2.mr[0].shape == ds2.pet[0].shape
    with pytest.raises(InputFileError):
        find_nifti_pairs(tmp_path / "missing")
