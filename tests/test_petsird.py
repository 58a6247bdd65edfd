"""PETSIRD listmode: our reader against the ``petsird`` package's own writer and example generator."""

from __future__ import annotations

import numpy as np
import pytest

petsird = pytest.importorskip("petsird")

from sirf_ddip.errors import GeometryMismatchError, InputFileError, UnsupportedDataError  # noqa: E402
from sirf_ddip.geometry.detectors import crystals_for_view_tangential  # noqa: E402
from sirf_ddip.geometry.scanner import get_scanner  # noqa: E402
from sirf_ddip.geometry.sinogram import SinogramGeometry  # noqa: E402
from sirf_ddip.io.petsird_listmode import (PetsirdCylinder, iter_petsird_events, read_petsird_header,  # noqa: E402
                                           write_petsird_cylinder)
from sirf_ddip.physics.histogram import histogram_petsird  # noqa: E402


def _events_from_sinogram(counts: np.ndarray, geo: SinogramGeometry) -> np.ndarray:
    """One detector pair per count: for each bin, its first ring pair (r1 + r2 fixed by the axial position,
    r2 - r1 the segment's smallest difference present) and first uncompressed view, crystals by STIR's table."""
    out = []
    nr = geo.scanner.num_rings
    for sg in geo.segments:
        blk = counts[geo.segment_slice(sg.number)]
        for a, v, t in zip(*np.nonzero(blk)):
            r12 = 2 * a / sg.axial_poss_per_ring_inc + (nr - 1) - (sg.num_axial - 1) / sg.axial_poss_per_ring_inc
            r12 = int(round(r12))
            d = next(d for d in range(sg.min_ring_diff, sg.max_ring_diff + 1)
                     if (r12 - d) % 2 == 0 and 0 <= (r12 - d) // 2 and (r12 + d) // 2 < nr)
            c1, c2 = crystals_for_view_tangential(v * geo.view_mashing, t + geo.min_tangential_pos,
                                                  geo.scanner.detectors_per_ring)
            out += [((r12 - d) // 2, int(c1), (r12 + d) // 2, int(c2))] * int(blk[a, v, t])
    return np.asarray(out, dtype=np.int64).reshape(-1, 4)


def test_sinogram_written_as_petsird_histograms_back_exactly(tmp_path, rng):
    sc = get_scanner("Siemens mMR").with_rings(4)
    geo = SinogramGeometry(sc, span=3, max_ring_diff=3, view_mashing=2, num_tangential=121)
    truth = np.zeros(geo.shape, dtype=np.float32)
    hit = rng.integers(0, truth.size, 300)
    np.add.at(truth.reshape(-1), hit, 1)
    delayed = np.zeros_like(truth)
    delayed.reshape(-1)[rng.integers(0, truth.size, 40)] = 1
    ev, dv = _events_from_sinogram(truth, geo), _events_from_sinogram(delayed, geo)
    path = write_petsird_cylinder(tmp_path / "sino.petsird", sc,
                                  [(0, 1000, ev[:200], dv[:10]), (1000, 2000, ev[200:], dv[10:])])
    cyl = PetsirdCylinder.from_scanner_information(read_petsird_header(path).scanner, path)
    assert (cyl.scanner.num_rings, cyl.scanner.detectors_per_ring) == (4, 504)
    assert np.array_equal(histogram_petsird(path, geo).to_projdata().array, truth)
    assert np.array_equal(histogram_petsird(path, geo, events="delayeds").to_projdata().array, delayed)
    assert np.array_equal(histogram_petsird(path, geo, events="trues").to_projdata().array, truth - delayed)
    first = histogram_petsird(path, geo, start=0, end=1)  # first time block only
    assert first.stats["counted"] == 200 and first.stats["time_blocks_in_frame"] == 1
    with pytest.raises(GeometryMismatchError, match="rings"):
        histogram_petsird(path, SinogramGeometry("Siemens mMR", span=11))


def test_package_generator_files_load(tmp_path):
    from petsird.helpers import generator

    header = generator.get_header()  # the package's demo scanner (2 module types) and its random events
    blocks = []
    for t in range(3):
        prompts = [[list(generator.get_events(header, (0, 0), 25))],
                   [list(generator.get_events(header, (1, 0), 5)), list(generator.get_events(header, (1, 1), 5))]]
        blocks.append(petsird.TimeBlock.EventTimeBlock(petsird.EventTimeBlock(
            time_interval=petsird.TimeInterval(start=t, stop=t + 1), prompt_events=prompts)))
    # its (meaningless) module-pair efficiency tables take the package ~35 s to write and read back in
    # Python; they are not used here, so they are left out of the file
    header.scanner.detection_efficiencies = petsird.DetectionEfficiencies()
    path = tmp_path / "generated.petsird"
    with petsird.BinaryPETSIRDWriter(str(path)) as writer:
        writer.write_header(header)
        writer.write_time_blocks(blocks)
    info = read_petsird_header(path).scanner
    assert info.model_name == "PETSIRD_TEST" and info.scanner_geometry.number_of_module_types() == 2
    blocks = list(iter_petsird_events(path, (0, 0)))
    assert [b.start_ms for b in blocks] == [0, 1, 2]
    assert all(b.prompts.shape == (25, 2) and (b.prompts[:, 0] >= b.prompts[:, 1]).all() for b in blocks)
    # its module types are 2 crystal layers, and a half ring: not a cylinder of single crystals
    with pytest.raises(UnsupportedDataError, match="layers"):
        PetsirdCylinder.from_scanner_information(info, path, 0)
    with pytest.raises(UnsupportedDataError):
        PetsirdCylinder.from_scanner_information(info, path, 1)


def test_not_a_petsird_file(tmp_path):
    bad = tmp_path / "x.petsird"
    bad.write_bytes(b"not petsird at all")
    with pytest.raises(InputFileError, match="PETSIRD"):
        read_petsird_header(bad)


def test_cli_listmode_reads_petsird(tmp_path):
    from test_listmode import _template

    from sirf_ddip.cli import main
    from sirf_ddip.io import read_projdata

    sc = get_scanner("Siemens mMR").with_rings(2)
    geo = SinogramGeometry(sc, span=1, max_ring_diff=1)
    ev = np.array([[0, 0, 1, 252], [1, 10, 1, 262], [1, 10, 1, 262]])
    path = write_petsird_cylinder(tmp_path / "e.petsird", sc, [(0, 5, ev, ev[:0])])
    out = tmp_path / "p.hs"
    assert main(["listmode", str(path), "--template", str(_template(tmp_path, geo)), "--out", str(out),
                 "--no-progress"]) == 0
    got = read_projdata(out).array
    assert np.array_equal(got, histogram_petsird(path, geo).to_projdata().array) and got.sum() == 3
    # ring 1 - ring 1, crystals 10 and 262 (opposite): view 10, tangential position 0, twice
    assert got[geo.segment_offset(0) + 1, 10, geo.num_tangential // 2] == 2
