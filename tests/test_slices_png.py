"""The slice PNG of ``sirf-ddip recon`` (issue 35): a few-plane volume shows its axial planes at a readable size."""

from __future__ import annotations

import numpy as np
import pytest

from sirf_ddip.cli.recon import MIN_PLANES_FOR_ORTHOGONAL, save_slices_png, slice_panels


def _panels_in_png(path):
    """Bounding boxes (height, width in pixels) of the uniform bright image regions of a PNG (the panels of a
    constant volume at the colour map's top; the colour bar is a gradient, thin and tall)."""
    import matplotlib.image
    from scipy import ndimage

    rgb = matplotlib.image.imread(path)[..., :3]
    top = np.array([0.988, 1.0, 0.643])            # inferno(1.0)
    bright = np.abs(rgb - top).max(axis=-1) < 0.02
    lab, n = ndimage.label(bright)
    boxes = [(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(lab)]
    return rgb.shape[:2], [b for b in boxes if b[0] > 5 and b[1] > 5 and 0.5 < b[0] / b[1] < 2.0]


def test_seven_planes_show_every_axial_plane_at_a_readable_height(tmp_path):
    vol = np.ones((7, 64, 64), np.float32)       # mMR 4 rings: 7 planes of 2.03 mm, 2.09 mm in-plane
    vox = (2.03125, 2.08626, 2.08626)
    panels = slice_panels(vol, vox)
    assert [p[0] for p in panels] == [f"z = {k}" for k in range(7)]
    assert all(p[1].shape == (64, 64) and p[2] == pytest.approx(1.0) for p in panels)
    path = save_slices_png(vol, vox, tmp_path / "x.png", title="t")
    (h, w), boxes = _panels_in_png(path)
    assert len(boxes) == 7                        # 7 square panels, 2 rows of 4 (measured ~150 px each at 100 dpi)
    assert min(min(b) for b in boxes) >= 100, boxes
    assert h < w < 2.5 * h                        # 2 rows of 4 panels + colour bar


def test_a_full_volume_keeps_the_three_orthogonal_views(tmp_path):
    vol = np.ones((MIN_PLANES_FOR_ORTHOGONAL + 1, 40, 40), np.float32)
    panels = slice_panels(vol, (2.0, 2.0, 2.0))
    assert [p[0].split()[0] for p in panels] == ["axial", "coronal", "sagittal"]
    assert [p[1].shape for p in panels] == [(40, 40), (17, 40), (17, 40)]
    (h, w), boxes = _panels_in_png(save_slices_png(vol, (2.0, 2.0, 2.0), tmp_path / "y.png"))
    assert len(boxes) == 1 and (h, w) == (420, 1200)   # the axial panel; the other two are 17 x 40 voxels (< 2:1)
