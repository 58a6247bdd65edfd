"""Training data for the prior: random 3-plane PET slabs (+ MR slabs) in network units.

Two sources, one sampler:

- :class:`PhantomSlabDataset` — subjects from :func:`sirf_ddip.sim.phantoms.make_subject` (MNI152-based brains,
  random anatomy/pose/uptakes/lesions), generated **once** at construction and kept in memory (normalised).
- :class:`NiftiSlabDataset` — the user's own co-registered PET/MR NIfTI pairs: a folder of ``*_pet.nii.gz`` with
  matching ``*_mr.nii.gz`` (same prefix), or a CSV with ``pet,mr`` columns (paths relative to the CSV). An MR on
  another grid than its PET is a :class:`~sirf_ddip.errors.GeometryMismatchError` unless ``resample_mr=True``
  (trilinear resampling of the MR onto the PET grid through the NIfTI affines, scipy).

Each volume is normalised with a per-volume fitted :class:`~sirf_ddip.prior.scaling.PETScaler` /
:class:`~sirf_ddip.prior.scaling.MRScaler` (the same fit that inference uses). :meth:`SlabDataset.sample` draws a
batch with a ``torch.Generator`` only (so the sampler state is that generator's state, saved in checkpoints):
random volume, random slab (centre plane weighted towards planes with signal), random left-right flip, random
in-plane rotation/translation (PET and MR together) and a random global PET intensity factor (robustness to the
per-image scale fit on noisy data).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import GeometryMismatchError, InputFileError
from .scaling import MRScaler, PETScaler


@dataclass
class Augmentation:
    """Random augmentation of training slabs.

    Attributes
    ----------
    flip_lr : bool
        Mirror x with probability 1/2.
    rotate_deg : float
        Uniform in-plane rotation in ``[-rotate_deg, rotate_deg]``.
    translate_vox : float
        Uniform in-plane shift (voxels) in ``[-translate_vox, translate_vox]``.
    intensity : float
        PET activity multiplied by ``exp(U(-intensity, intensity))`` before normalisation.
    """

    flip_lr: bool = True
    rotate_deg: float = 8.0
    translate_vox: float = 4.0
    intensity: float = 0.15


def _arr(x) -> np.ndarray:
    return np.asarray(getattr(x, "array", x), dtype=np.float32)


class SlabDataset:
    """In-memory normalised volumes and a random slab sampler.

    Parameters
    ----------
    pet_volumes, mr_volumes : lists of float32 arrays [Z, H, W] in **image units** (MR list may be None)
    pet_scaling, mr_scaling : unfitted scalers (each volume gets its own fit)
    slab : int
    augmentation : Augmentation
    description : dict
        What the data are (goes into the weights card).
    """

    def __init__(self, pet_volumes: Sequence[np.ndarray], mr_volumes: Sequence[np.ndarray] | None,
                 pet_scaling: PETScaler | None = None, mr_scaling: MRScaler | None = None, slab: int = 3,
                 augmentation: Augmentation | None = None, description: dict[str, Any] | None = None):
        if len(pet_volumes) == 0:
            raise ValueError("SlabDataset: no volumes")
        self.slab = int(slab)
        self.aug = augmentation or Augmentation()
        self.pet_scaling = pet_scaling or PETScaler()
        self.mr_scaling = mr_scaling if mr_volumes is not None else None
        if mr_volumes is not None and self.mr_scaling is None:
            self.mr_scaling = MRScaler()
        self.description = dict(description or {})
        self.pet: list[torch.Tensor] = []
        self.mr: list[torch.Tensor] | None = [] if mr_volumes is not None else None
        self.weights: list[torch.Tensor] = []
        shape_hw = None
        for i, pv in enumerate(pet_volumes):
            pv = _arr(pv)
            if pv.ndim != 3 or pv.shape[0] < self.slab:
                raise ValueError(f"SlabDataset: volume {i} has shape {pv.shape}; need [Z>={self.slab}, H, W]")
            if shape_hw is None:
                shape_hw = pv.shape[1:]
            elif pv.shape[1:] != shape_hw:
                raise ValueError(f"SlabDataset: volume {i} is {pv.shape[1:]} transaxially, others {shape_hw}; "
                                 "resample to one transaxial size first")
            ps = self.pet_scaling.fit(pv)
            # keep the image-unit volume divided by its scale: value/scale (the intensity augmentation multiplies
            # this before the affine map to network units)
            self.pet.append(torch.from_numpy((pv / ps.scale).astype(np.float32)))
            # centre-plane sampling weights: planes with signal (≥ 1 % of voxels in the head mask) dominate
            head = ps.head_mask(pv)
            frac = head.reshape(head.shape[0], -1).mean(axis=1)
            w = np.where(frac > 0.01, 1.0, 0.05)[self.slab // 2: pv.shape[0] - self.slab // 2]
            self.weights.append(torch.as_tensor(w, dtype=torch.float64))
            if self.mr is not None:
                mv = _arr(mr_volumes[i])
                if mv.shape != pv.shape:
                    raise GeometryMismatchError(f"SlabDataset: MR volume {i} shape {mv.shape} != PET {pv.shape}")
                ms = self.mr_scaling.fit(mv)
                self.mr.append(torch.from_numpy(ms.to_net(mv).astype(np.float32)))
        self.shape_hw = tuple(shape_hw)
        self.description.setdefault("num_volumes", len(self.pet))
        self.description.setdefault("slab", self.slab)

    def __len__(self) -> int:
        return len(self.pet)

    @property
    def uses_mr(self) -> bool:
        return self.mr is not None

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A random batch: PET slabs ``[B, slab, H, W]`` (network units) and MR slabs (or None), on CPU."""
        B = int(batch_size)
        vol_idx = torch.randint(len(self.pet), (B,), generator=generator)
        lo, hi = self.pet_scaling.lo, self.pet_scaling.hi
        pets, mrs = [], []
        half = self.slab // 2
        for b in range(B):
            i = int(vol_idx[b])
            c = int(torch.multinomial(self.weights[i], 1, generator=generator)) + half
            pets.append(self.pet[i][c - half:c + half + 1])
            if self.mr is not None:
                mrs.append(self.mr[i][c - half:c + half + 1])
        pet = torch.stack(pets)
        mr = torch.stack(mrs) if self.mr is not None else None
        a = self.aug
        gain = torch.exp((torch.rand(B, generator=generator, dtype=torch.float64) * 2 - 1) * a.intensity)
        flip = torch.rand(B, generator=generator) < 0.5
        ang = (torch.rand(B, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(a.rotate_deg)
        shift = (torch.rand(B, 2, generator=generator, dtype=torch.float64) * 2 - 1) * a.translate_vox
        pet = pet * gain.to(pet.dtype).reshape(B, 1, 1, 1)
        if a.flip_lr:
            pet = torch.where(flip.reshape(B, 1, 1, 1), pet.flip(-1), pet)
            if mr is not None:
                mr = torch.where(flip.reshape(B, 1, 1, 1), mr.flip(-1), mr)
        if a.rotate_deg > 0 or a.translate_vox > 0:
            H, W = pet.shape[-2:]
            cos, sin = torch.cos(ang), torch.sin(ang)
            theta = torch.zeros(B, 2, 3, dtype=torch.float64)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin * H / W, sin * W / H, cos
            theta[:, 0, 2] = 2 * shift[:, 0] / W
            theta[:, 1, 2] = 2 * shift[:, 1] / H
            grid = F.affine_grid(theta.to(pet.dtype), list(pet.shape), align_corners=False)
            pet = F.grid_sample(pet, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if mr is not None:
                # MR background in net units is lo: resample (mr - lo) with zero padding
                mlo = self.mr_scaling.lo
                mr = F.grid_sample(mr - mlo, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + mlo
        pet = lo + (hi - lo) * pet
        return pet.contiguous(), (mr.contiguous() if mr is not None else None)


class PhantomSlabDataset(SlabDataset):
    """Slabs from simulated brain subjects (generated once, in memory).

    Parameters
    ----------
    num_subjects : int
    tracer : str or list of str
        Tracer(s) of :data:`sirf_ddip.sim.phantoms.TRACERS`; subjects cycle through the list.
    seed : int
        First subject seed (subjects ``seed … seed + num_subjects − 1`` of the ``"train"`` split).
    grid : ImageGrid, optional
        Default :func:`~sirf_ddip.sim.phantoms.mmr_brain_grid`.
    use_mr : bool
    subject_options : dict
        Extra keyword arguments of ``make_subject`` (e.g. ``lesions``, ``deform``).
    template_cache : path, optional
        ``.npz`` cache for :func:`~sirf_ddip.sim.phantoms.load_templates` (machines without nilearn).
    subjects_cache : path, optional
        ``.npz`` of the generated subjects (PET and MR, float16 compressed, with a JSON description). Read when it
        exists *and* describes the same subjects (else a :class:`ValueError` naming the difference); written
        after generation when it does not exist. Lets a GPU machine without nilearn train on subjects made
        elsewhere, and avoids regenerating subjects between runs.
    show_progress : bool
    workers : int
        Processes generating subjects in parallel (1: in this process).
    """

    def __init__(self, num_subjects: int = 8, tracer: str | Sequence[str] = "fdg", seed: int = 0, grid=None,
                 use_mr: bool = True, subject_options: dict[str, Any] | None = None,
                 template_cache: str | None = None, pet_scaling: PETScaler | None = None,
                 mr_scaling: MRScaler | None = None, slab: int = 3, augmentation: Augmentation | None = None,
                 show_progress: bool = True, subjects_cache: str | None = None, workers: int = 1):
        import json

        from ..geometry.image import ImageGrid
        from ..utils.progress import progress

        tracers = [tracer] if isinstance(tracer, str) else list(tracer)
        if grid is None:
            grid = ImageGrid((90, 128, 128), (2.03125, 2.08626, 2.08626))  # = sim.phantoms.mmr_brain_grid()
        opts = dict(subject_options or {})
        desc = {"source": "phantom", "generator": "sirf_ddip.sim.phantoms.make_subject (MNI152 2009a)",
                "tracers": tracers, "num_subjects": int(num_subjects), "seeds": [int(seed), int(seed) + int(num_subjects) - 1],
                "split": opts.get("split", "train"), "subject_options": opts,
                "grid": grid.to_dict() if hasattr(grid, "to_dict") else str(grid)}
        cache = Path(subjects_cache) if subjects_cache else None
        if cache is not None and cache.is_file():
            with np.load(cache) as z:
                cached = json.loads(str(z["description"]))
                if cached != json.loads(json.dumps(desc)):
                    diff = sorted(k for k in set(desc) | set(cached) if cached.get(k) != json.loads(json.dumps(desc)).get(k))
                    raise ValueError(f"{cache}: cached subjects differ from the requested ones in {diff}; "
                                     "delete the cache or point data.subjects_cache elsewhere")
                pets = [a.astype(np.float32) for a in z["pet"]]
                mrs = [a.astype(np.float32) for a in z["mr"]]
            desc["subjects_cache"] = str(cache.name)
        else:
            jobs = [(grid, tracers[k % len(tracers)], int(seed) + k, opts, template_cache)
                    for k in range(int(num_subjects))]
            if int(workers) > 1:
                from concurrent.futures import ProcessPoolExecutor

                with ProcessPoolExecutor(max_workers=int(workers)) as ex:
                    made = list(progress(ex.map(_make_subject_arrays, jobs), total=len(jobs), desc="phantom subjects",
                                         enabled=None if show_progress else False))
            else:
                made = [_make_subject_arrays(j) for j in progress(jobs, total=len(jobs), desc="phantom subjects",
                                                                  enabled=None if show_progress else False)]
            pets = [m[0] for m in made]
            mrs = [m[1] for m in made]
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + ".tmp.npz")
                np.savez_compressed(tmp, pet=np.stack(pets).astype(np.float16), mr=np.stack(mrs).astype(np.float16),
                                    description=json.dumps(desc))
                tmp.replace(cache)
        super().__init__(pets, mrs if use_mr else None, pet_scaling, mr_scaling, slab, augmentation, desc)


def _make_subject_arrays(job) -> tuple[np.ndarray, np.ndarray]:
    """(activity, MR) arrays of one phantom subject (a top-level function, for process pools)."""
    from ..sim import phantoms

    grid, tracer, seed, opts, template_cache = job
    subj = phantoms.make_subject(grid, tracer, seed=seed, templates=phantoms.load_templates(template_cache), **opts)
    return _arr(subj.activity), _arr(subj.mr)


def find_nifti_pairs(source: str | Path) -> list[tuple[Path, Path]]:
    """PET/MR pairs from a folder (``X_pet.nii[.gz]`` + ``X_mr.nii[.gz]``) or a CSV (``pet,mr`` columns)."""
    source = Path(source)
    pairs: list[tuple[Path, Path]] = []
    if source.is_dir():
        for pet in sorted(list(source.glob("*_pet.nii.gz")) + list(source.glob("*_pet.nii"))):
            stem = pet.name[: pet.name.rindex("_pet.nii")]
            cands = [source / f"{stem}_mr.nii.gz", source / f"{stem}_mr.nii"]
            mr = next((c for c in cands if c.is_file()), None)
            if mr is None:
                raise InputFileError(pet, f"no matching MR ({stem}_mr.nii.gz) next to this PET")
            pairs.append((pet, mr))
        if not pairs:
            raise InputFileError(source, "no *_pet.nii.gz files in this folder")
    elif source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"pet", "mr"} <= set(reader.fieldnames):
                raise InputFileError(source, "CSV must have a header with columns 'pet' and 'mr'")
            for row in reader:
                pet = (source.parent / row["pet"]).resolve()
                mr = (source.parent / row["mr"]).resolve()
                for p in (pet, mr):
                    if not p.is_file():
                        raise InputFileError(source, f"listed file {p} not found")
                pairs.append((pet, mr))
        if not pairs:
            raise InputFileError(source, "CSV lists no pairs")
    else:
        raise InputFileError(source, "expected a folder of *_pet.nii.gz/*_mr.nii.gz or a .csv list")
    return pairs


def _load_zyx(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001
        raise InputFileError(path, f"cannot read NIfTI: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputFileError(path, f"expected a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputFileError(path, "contains NaN or Inf")
    return data, img.affine


def resample_to(data_ijk: np.ndarray, affine_src: np.ndarray, shape_dst: tuple, affine_dst: np.ndarray) -> np.ndarray:
    """Trilinear resampling of a NIfTI-ordered volume onto another NIfTI grid (through the affines)."""
    from scipy.ndimage import affine_transform

    m = np.linalg.inv(affine_src) @ affine_dst
    return affine_transform(data_ijk, m[:3, :3], offset=m[:3, 3], output_shape=tuple(shape_dst), order=1,
                            mode="constant", cval=0.0).astype(np.float32)


class NiftiSlabDataset(SlabDataset):
    """Slabs from the user's co-registered PET/MR NIfTI pairs (see :func:`find_nifti_pairs`).

    NIfTI arrays ``[i, j, k]`` are used as ``[z, y, x] = [k, j, i]`` (axial planes along the third axis).
    """

    def __init__(self, source: str | Path, use_mr: bool = True, resample_mr: bool = False,
                 pet_scaling: PETScaler | None = None, mr_scaling: MRScaler | None = None, slab: int = 3,
                 augmentation: Augmentation | None = None):
        pairs = find_nifti_pairs(source)
        pets, mrs = [], []
        for pet_p, mr_p in pairs:
            pd, pa = _load_zyx(pet_p)
            if use_mr:
                md, ma = _load_zyx(mr_p)
                same = md.shape == pd.shape and np.allclose(ma, pa, atol=1e-3)
                if not same:
                    if not resample_mr:
                        raise GeometryMismatchError(
                            f"{mr_p}: MR grid (shape {md.shape}, affine diag {np.round(np.diag(ma)[:3], 3)}) differs "
                            f"from PET {pet_p} (shape {pd.shape}, affine diag {np.round(np.diag(pa)[:3], 3)}); "
                            "resample the MR onto the PET grid (set data.resample_mr: true to do it here)")
                    md = resample_to(md, ma, pd.shape, pa)
                mrs.append(np.ascontiguousarray(md.transpose(2, 1, 0)))
            pets.append(np.ascontiguousarray(pd.transpose(2, 1, 0)))
        desc = {"source": "nifti", "location": str(source), "num_pairs": len(pairs),
                "files": [[str(p), str(m)] for p, m in pairs], "resample_mr": bool(resample_mr)}
        super().__init__(pets, mrs if use_mr else None, pet_scaling, mr_scaling, slab, augmentation, desc)
