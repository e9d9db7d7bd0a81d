#!/usr/bin/env bash
# The ablations of `varst benchmark` on a GPU machine: one process per (fold, target), all at once.
#
# Each process is `varst benchmark --splits S --tests T --targets X --ablations --accelerator gpu` on the top-250
# genes: it fits the default VARST of its fold, scores every ablation variant against it, then re-runs the default
# and every variant within 0.03 of it with the next seed. The stores (per-fold results) come back in one archive; the
# report here merges their ablation units into the CPU run's report:
#
#   varst benchmark --report_only --out benchmarks/results --cache_dir CPU_CACHE \
#       --merge_ablations STORE_1 --merge_ablations STORE_2 ... --note "ablations: GPU ..."
#
# Needs: the small cache of `benchmarks/compact_cache.py --out .device_cache` (genes of the gene sets only, gene sets
# ranked here) and, where the machine lacks them, anndata and its needs as wheels in .whl/ (see the device notes).
#
#   benchmarks/device_ablations.sh smoke OUT        # one default fit (B4, log1p) and the GPU training check, timed
#   benchmarks/device_ablations.sh ablations OUT [MINUTES] [TESTS] [TARGETS]
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:?smoke or ablations}"
out="${2:?output folder}"
minutes="${3:-6}"
tests="${4:-B4,C2,C3,C4,C5,C6}"
targets="${5:-log1p,cp10k}"
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import anndata" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl/opt/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc

bench() {  # cache_dir then benchmark arguments
  local cache="$1"; shift
  mkdir -p "$cache"
  cp .device_cache/* "$cache"/
  python3 -m varst_scverse.benchmark --cache_dir "$cache" --genesets top250 --varst_genesets top250 \
    --accelerator gpu --no_speed "$@"
}

if [ "$mode" = smoke ]; then
  t0=$(date +%s)
  bench /tmp/vc_smoke --out "$out/smoke" --splits cross_B4 --targets log1p 2>&1 | tee "$out/smoke.log" | grep -v Warning
  echo "smoke: default fit of B4 log1p in $(( $(date +%s) - t0 )) s"
  timeout 150 bash benchmarks/gpu_check.sh --steps 60 --warmup 10 --out "$out/gpu_check.json" 2>&1 | tail -30
  exit 0
fi

pids=()
for t in ${tests//,/ }; do
  split=within_C; [ "$t" = B4 ] && split=cross_B4
  for x in ${targets//,/ }; do
    bench "/tmp/vc_${t}_${x}" --out "/tmp/vo_${t}_${x}" --splits "$split" --tests "$t" --targets "$x" --ablations \
      --ablation_splits "$split" --time_budget_min "$minutes" > "/tmp/log_${t}_${x}.txt" 2>&1 &
    pids+=($!)
  done
done
wait "${pids[@]}"
mkdir -p /tmp/stores
for d in /tmp/vc_*_*; do cp "$d/partial_full.json" "/tmp/stores/$(basename "$d").json" 2>/dev/null; done
tar -czf "$out/stores.tar.gz" -C /tmp stores
tar -czf "$out/logs.tar.gz" -C /tmp $(cd /tmp && ls log_*.txt)
grep -h "ablations seed\|varst \|skip" /tmp/log_*.txt | tail -40
