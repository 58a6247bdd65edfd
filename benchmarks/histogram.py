"""Speed of the Siemens listmode histogrammer (``sirf_ddip.physics.histogram``): events per second.

Writes a synthetic mMR PETLINK listmode (random span-1 offsets over the whole sinogram, 70 % prompts, a time
tag every millisecond) to a temporary folder, then histograms it into the mMR span-11 template (and, with
``--span1``, into the full span-1 geometry). The compiled kernels are loaded (or compiled, the first time)
by a warm-up call on a tiny file first; that one-off cost is printed separately. For the whole call (lookup
tables, allocation of the sinogram(s), file reading, decoding, binning, accumulation, adding the threads'
sinograms, re-ordering to file order) it prints

- records/s of wall time, and CPU time per record (all threads of the process);
- the figure for an idle machine, ``records / (CPU time / threads)``: wall time on a shared machine counts
  the time the threads wait for a core, CPU time does not; with the work split evenly and nothing else
  running, the wall time is the CPU time divided by the threads (an estimate: it ignores the serial parts
  and memory bandwidth shared by the cores, so it is an upper bound).

    python benchmarks/histogram.py [--words 50e6] [--span1] [--threads 2] [--repeat 1]

The goal (issue 10) is >= 50 M events/s on 2 cores, i.e. a 10-minute mMR study in well under a minute.
Records are events plus the time tags (one per ms, about 0.3 % here).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_listmode(folder: Path, num_words: int, seed: int = 0, events_per_ms: int = 300) -> Path:
    """A PETLINK 32-bit listmode in ``folder`` (header from the mMR's, data random); returns the header."""
    from sirf_ddip.geometry.scanner import get_scanner
    from sirf_ddip.io.siemens_listmode import ecat_segment_sequence

    sc = get_scanner("Siemens mMR")
    table = [sc.num_rings - abs(d) for d in ecat_segment_sequence(60)]
    nmax = sum(table) * 252 * 344
    rng = np.random.default_rng(seed)
    data = folder / "bench.l"
    written = 0
    t_ms = 0
    with open(data, "wb") as f:
        while written < num_words:
            n_ms = 1000
            ev = rng.integers(0, nmax, size=(n_ms, events_per_ms), dtype=np.uint32)
            prompt = rng.random((n_ms, events_per_ms)) < 0.7
            ev |= (prompt.astype(np.uint32) << np.uint32(30))
            tags = (np.uint32(1 << 31) | (np.arange(t_ms, t_ms + n_ms, dtype=np.uint32)))[:, None]
            block = np.concatenate([tags, ev], axis=1).reshape(-1)[: num_words - written]
            block.astype("<u4").tofile(f)
            written += block.size
            t_ms += n_ms
    hdr = folder / "bench.l.hdr"
    hdr.write_text("\n".join([
        "!INTERFILE :=", "!originating system :=2008", "%SMS-MI header name space :=PETLINK bin address",
        "!data offset in bytes :=0", "name of data file:=bench.l", "data format :=CoincidenceList",
        "number of rings :=64", "%number of TOF time bins:=1", f"image duration (sec) :={t_ms // 1000}",
        f"%total listmode word counts :={num_words}", "%LM event and tag words format (bits) :=32",
        "%axial compression :=1", "%maximum ring difference :=60", "%number of projections :=344",
        "%number of views :=252", f"%number of segments :={len(table)}",
        "%segment table :={" + ", ".join(map(str, table)) + "}", ""]))
    return hdr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=float, default=50e6, help="listmode words to write (default 5e7, 200 MB)")
    ap.add_argument("--span1", action="store_true", help="also histogram into full span 1 (1.4 GB sinogram)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the kernels (default 2)")
    ap.add_argument("--repeat", type=int, default=1, help="histogram the file this many times (default 1)")
    args = ap.parse_args()
    os.environ.setdefault("SIRF_DDIP_PROGRESS", "0")
    from sirf_ddip.geometry.sinogram import SinogramGeometry
    from sirf_ddip.io.siemens_listmode import read_listmode_header
    from sirf_ddip.physics.histogram import ListmodeHistogrammer

    tmp = Path(tempfile.mkdtemp(prefix="sirf_ddip_lmbench_"))
    try:
        t = time.perf_counter()
        hdr_path = write_listmode(tmp, int(args.words))
        print(f"wrote {int(args.words):,} words in {time.perf_counter() - t:.1f} s")
        header = read_listmode_header(hdr_path)
        cases = [("span 11", SinogramGeometry("Siemens mMR", span=11, max_ring_diff=60))]
        if args.span1:
            cases.append(("span 1", SinogramGeometry("Siemens mMR", span=1, max_ring_diff=60)))
        small = tmp / "warm"
        small.mkdir()
        t = time.perf_counter()
        ListmodeHistogrammer(read_listmode_header(write_listmode(small, 1000)), cases[0][1]).histogram(
            events="prompts", end=0.5, threads=args.threads)
        print(f"kernel load/compile (once per process): {time.perf_counter() - t:.2f} s")
        for name, geo in cases:
            for _ in range(args.repeat):
                t = time.perf_counter()
                c = time.process_time()
                hist = ListmodeHistogrammer(header, geo).histogram(events="prompts", threads=args.threads)
                total = time.perf_counter() - t
                cpu = time.process_time() - c
                n = hist.stats["records_in_frame"]
                nt = hist.stats["threads"]
                loop_cpu = hist.stats["cpu_seconds"]
                print(f"{name} ({geo.num_sinograms * geo.num_views * geo.num_tangential:,} bins, {nt} threads, "
                      f"{hist.stats['private_sinograms']} sinogram(s)), {n:,} records, "
                      f"{hist.stats['counted']:,.0f} prompts:\n"
                      f"  whole call     {total:6.2f} s wall {n / total / 1e6:6.1f} M records/s | {cpu:6.2f} s CPU "
                      f"{cpu / n * 1e9:5.1f} ns/record | idle-machine estimate "
                      f"{n / (cpu / nt) / 1e6:6.1f} M records/s\n"
                      f"  streaming loop {hist.stats['seconds']:6.2f} s wall {n / hist.stats['seconds'] / 1e6:6.1f} M "
                      f"records/s | {loop_cpu:6.2f} s CPU {loop_cpu / n * 1e9:5.1f} ns/record | idle-machine estimate "
                      f"{n / (loop_cpu / nt) / 1e6:6.1f} M records/s")
                hist = None  # free the sinogram before the next call
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
