#!/usr/bin/env bash
# Prepare, on a machine with PyPI access (the development machine), what benchmarks/gpu_session.sh needs on a GPU
# machine that cannot reach the internet: wheels of the packages its image lacks (.whl/), the MNI template cache,
# the span-11 template header and validation study folders (.devcarry/). Both folders are git-ignored and travel
# with the device tool's `carry`. Usage, from the repository root:
#   bash benchmarks/gpu_session_prepare.sh [SHARED_DIR] CASE_DIR [CASE_DIR ...]
# SHARED_DIR defaults to ../shared; CASE_DIRs are `sirf-ddip simulate` folders with lesions (validation cases,
# never the demo or test cases), with their baselines.json from benchmarks/ddip_sweep.py (else recomputed there).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=../shared
if [ $# -gt 0 ] && [ -d "$1/real-mmr" ]; then SHARED=$1; shift; fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p .whl .devcarry/cases
rm -f .whl/*.whl
# the GPU image (KINDS.md) has torch, numpy, scipy, numba, peft, einops, safetensors, scikit-image, pyyaml, tqdm,
# matplotlib, pytest; these are missing there (pure-Python wheels, same versions as here)
pkgs=()
for p in monai nibabel petsird; do
  v=$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))")
  pkgs+=("$p==$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${pkgs[@]}"
# brain phantoms without nilearn there: the templates as a lossless uint8 cache (~5 MB)
"$PY" -c "from sirf_ddip.sim.phantoms import save_template_cache as s; s('.devcarry/templates.npz', overwrite=True)"
cp "$SHARED/real-mmr/templates/template_span11.hs" .devcarry/
for c in "$@"; do
  name=$(basename "$c")
  rm -rf ".devcarry/cases/$name"; mkdir -p ".devcarry/cases/$name"
  for f in prompts additive_term mult_factors; do cp "$c/$f.hs" "$c/$f.s" ".devcarry/cases/$name/"; done
  for f in mr truth mask_brain mask_lesion; do cp "$c/$f.hv" "$c/$f.v" ".devcarry/cases/$name/"; done
  cp "$c/case.json" ".devcarry/cases/$name/"
  [ -f "$c/baselines.json" ] && cp "$c/baselines.json" ".devcarry/cases/$name/"
done
tree_mb=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carry_mb=$(du -cb .whl .devcarry | tail -1 | cut -f1)
total=$(( (tree_mb + carry_mb) / 1048576 ))
echo "prepared: .whl ($(ls .whl | tr '\n' ' ')), .devcarry ($(ls .devcarry/cases | tr '\n' ' ')); about ${total} MiB travel (limit 64)"
[ "$total" -lt 62 ] || { echo "too much to travel: carry fewer cases" >&2; exit 1; }
