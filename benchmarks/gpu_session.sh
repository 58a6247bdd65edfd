#!/usr/bin/env bash
# One prepared GPU session for the figures that need CUDA (issue 11: correctness and speed; issue 9: a prior
# fine-tuned on hot and cold lesions, scored on validation cases). Prepare first, here:
#   bash benchmarks/gpu_session_prepare.sh CASE_DIR [CASE_DIR ...]
# then on the GPU machine, ONE device call (a session has 15 min of device time in all, the machine's start
# included, and one call runs <= 10 min; the steps' own limits add up to ~9.4 min):
#   run(command="bash benchmarks/gpu_session.sh all", carry=[".whl", ".devcarry"], timeout_s=600)
# ("speed" or "lesions" runs one half.) The full-size DDIP (issue 33) is its own call, ~6 min of limits:
#   run(command="bash benchmarks/gpu_session.sh ddip", carry=[".whl", ".devcarry"], timeout_s=600)
# It simulates benchmarks/full_size_study.yaml there (127 x 285 x 285, span 11: too big to carry), runs the whole
# DDIP on it with the settings of DDIP_SET (default: the shipped ones + the subsets of the full-size study) and
# prints the run split by part, the image metrics against the truth and OSEM 2 x 21's; the output image comes back
# as ddip_full_size.npy (float16) with ddip.log.
# Everything it prints also goes to $OUT (at most 8 files come back): speed.log, cuda_check.json, lesions.log,
# lesions_sweep.jsonl (prior_lesions.py and DDIP lines), prior.safetensors + prior.card.json + train_log.csv (the fine-tuned prior, to score on
# the CPU afterwards). Each step has its own time limit so that one slow step does not lose the others.
# SMOKE=1 DEV=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh all   runs every step at toy sizes on a
# CPU (a check of the script itself; its figures mean nothing).
set -u -o pipefail
PART=${1:-speed}
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export SIRF_DDIP_PROGRESS=0 PYTHONUNBUFFERED=1 SIRF_DDIP_TEMPLATE_CACHE=$PWD/.devcarry/templates.npz SIRF_DDIP_CACHE=/tmp/sirf_ddip_cache
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
shopt -s nullglob
CASES=(.devcarry/cases/*)
[ ${#CASES[@]} -gt 0 ] || [ "$PART" = ddip ] || { echo "no study folders in .devcarry/cases (run benchmarks/gpu_session_prepare.sh)" >&2; exit 2; }
NCPU=$(nproc)
DEV=${DEV:-cuda}
if [ "${SMOKE:-0}" = 1 ]; then
  SIZE=(--rings 6 --xy 128); DDIP=(--ddip-steps 1 --ddip-paper-steps 1); CHECK=(--ddip-steps 1 --osem-iterations 1)
  FT=(--set train.steps=2 --set data.num_subjects=2 --set train.batch_size=2); SWEEP=(--set num_steps=1)
  CASES=("${CASES[@]:0:1}"); TSCALE=${TSCALE:-4}
  FULL=(--set num_rings=2 --set max_ring_diff=1 --set span=1 --set view_mashing=4 --set image_xy=128)
  FULL_DDIP=(--set num_steps=2 --set n_init=2); OSEM_SUBSETS=1
else
  SIZE=(--xy 344); DDIP=(--ddip-steps 50 --ddip-paper-steps 10); CHECK=(--ddip-steps 10)
  FT=(--set train.steps="${FINETUNE_STEPS:-750}"); SWEEP=(); TSCALE=${TSCALE:-1}
  FULL=(); FULL_DDIP=(); OSEM_SUBSETS=21
fi
read -r -a DDIP_SET_ARGS <<< "$(for kv in ${DDIP_SET:-}; do printf -- '--set %s ' "$kv"; done)"
step() { echo; echo "== $(date +%T) $*"; }
lim() { echo $(( $1 * TSCALE )); }   # a step's time limit (s); SMOKE on a CPU gets 4x, to check every step runs through
quiet() { tr "\r" "\n" | grep -v -E "(it/s|s/it)[],]" ; }   # progress bars (off: SIRF_DDIP_PROGRESS=0) never hide a result line

speed() {
  step "machine"; nvidia-smi -L; "$PY" -c "import torch, numba, numpy; print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
  step "CUDA correctness: projector / operator tests (CPU vs CUDA)"
  timeout $(lim 50) "$PY" -m pytest -q -p no:cacheprovider tests/test_projector.py tests/test_operators.py 2>&1 | tail -15
  step "CUDA vs CPU on ${CASES[0]}: OSEM and DDIP (${CHECK[*]})"
  timeout $(lim 60) "$PY" benchmarks/cuda_check.py "${CASES[0]}" "${CHECK[@]}" --threads "$NCPU" --out "$OUT/cuda_check.json" 2>&1 | quiet
  step "full size on $DEV: mMR span 11 ${SIZE[*]}; DDIP ${DDIP[*]}"
  timeout $(lim 150) "$PY" benchmarks/full_size.py --template .devcarry/template_span11.hs "${SIZE[@]}" --device "$DEV" \
    --threads "$NCPU" "${DDIP[@]}" 2>&1 | quiet
}

speed_cpu() {
  step "full size on this machine's CPU ($NCPU threads), for the CUDA/CPU ratio"
  timeout $(lim 45) "$PY" benchmarks/full_size.py --template .devcarry/template_span11.hs "${SIZE[@]}" --device cpu \
    --threads "$NCPU" --skip-osem 2>&1 | quiet
}

lesions() {
  step "fine-tune the shipped prior on subjects with hot and cold lesions (${FT[*]})"
  rm -rf /tmp/prior-lesions
  timeout $(lim 150) "$PY" -m sirf_ddip pretrain configs/pretrain-finetune-lesions.yaml --out /tmp/prior-lesions --device "$DEV" \
    "${FT[@]}" --set train.max_seconds="${FINETUNE_SECONDS:-105}" --set data.workers=$(( NCPU > 1 ? NCPU - 1 : 1 )) \
    --set data.template_cache="$SIRF_DDIP_TEMPLATE_CACHE" 2>&1 | quiet | tail -25
  cp /tmp/prior-lesions/prior.safetensors /tmp/prior-lesions/prior.card.json /tmp/prior-lesions/train_log.csv "$OUT/" \
    || { echo "no fine-tuned prior" >&2; return 1; }
  step "prior alone: lesion bias of one Tweedie step from the noised truth, shipped vs fine-tuned"
  timeout $(lim 30) "$PY" benchmarks/prior_lesions.py "${CASES[@]}" --weights default /tmp/prior-lesions --device "$DEV" \
    --t 100 300 --seeds 0 1 --out "$OUT/lesions_sweep.jsonl" 2>&1
  step "score: shipped vs fine-tuned prior (DDIP, shipped settings) on ${CASES[*]}"
  for w in /tmp/prior-lesions default; do
    timeout $(lim 40) "$PY" benchmarks/ddip_sweep.py "${CASES[@]}" --weights "$w" --device "$DEV" "${SWEEP[@]}" \
      --runs '[{}]' --out "$OUT/lesions_sweep.jsonl" 2>&1 | quiet | sed "s|^|[$w] |"
  done
}

ddip_full() {
  step "simulate the full-size study on $DEV (benchmarks/full_size_study.yaml ${FULL[*]})"
  rm -rf /tmp/full_size_study
  timeout $(lim 150) "$PY" -m sirf_ddip simulate benchmarks/full_size_study.yaml --out /tmp/full_size_study \
    --set device="$DEV" "${FULL[@]}" 2>&1 | quiet | tail -3   # templates: $SIRF_DDIP_TEMPLATE_CACHE
  [ -f /tmp/full_size_study/prompts.hs ] || { echo "no full-size study" >&2; return 1; }
  step "whole DDIP on $DEV: shipped settings ${DDIP_SET:-} ${FULL_DDIP[*]}; OSEM 2 x $OSEM_SUBSETS on the same data"
  timeout $(lim 300) "$PY" benchmarks/full_size.py --ddip /tmp/full_size_study --device "$DEV" --threads "$NCPU" \
    --subsets "$OSEM_SUBSETS" "${DDIP_SET_ARGS[@]}" "${FULL_DDIP[@]}" --ddip-out /tmp/ddip_full_size.hv 2>&1 | quiet
  "$PY" -c "import numpy as np, sys; from sirf_ddip.io import read_image; np.save(sys.argv[2], read_image(sys.argv[1]).array.astype(np.float16))" \
    /tmp/ddip_full_size.hv "$OUT/ddip_full_size.npy" || echo "no DDIP output image" >&2
}

# order: the GPU figures first, the CPU reference last (the cheapest to lose)
case "$PART" in
  speed) { speed; speed_cpu; } 2>&1 | tee "$OUT/speed.log" ;;
  lesions) lesions 2>&1 | tee "$OUT/lesions.log" ;;
  all) speed 2>&1 | tee "$OUT/speed.log"; lesions 2>&1 | tee "$OUT/lesions.log"; speed_cpu 2>&1 | tee -a "$OUT/speed.log" ;;
  ddip) ddip_full 2>&1 | tee "$OUT/ddip.log" ;;
  *) echo "usage: bash benchmarks/gpu_session.sh speed|lesions|all|ddip" >&2; exit 2 ;;
esac
