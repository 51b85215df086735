#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one prepared run with its own time budget (a lent GPU machine is
# short of device time, not of memory). Steps, in the order given (default: tests bridge open solved):
#   tests       the GPU tests (`pytest --run-gpu -m gpu` on the files that hold them)
#   bridge      bench_bridge.py on CUDA (streaming Gram statistics)
#   open        bench_vnncomp.py on CUDA: the MNIST-FC and OVAL21 instances the 2-core CPU times out on,
#               both suites at once (one process per instance), cap CAP_S
#   solved      the 20 OVAL21 instances the CPU solves, 10 at once, cap 60 s (if time is left)
#   mnist_full  all 90 MNIST-FC instances at the competition's limits (at most CAP_S), 12 at once,
#               the slow ones first; with `oval_open` beside it (4 at once) when both are given
#   oval_open   the 4 OVAL21 time-outs α,β-CROWN solved in under 200 s, cap CAP_S
#   fp64        float32 against float64 bound engines on the GPU (what a proof costs there): three OVAL21
#               instances that need thousands of domains, one at a time, each in both precisions, cap 60 s
#               (or CAP_S if lower)
#   conv        conv blocks as cuDNN convolutions against CSR products (`--bab-options '{"conv": true}'`, opt-in:
#               on 2 CPU cores no faster in whole searches, session 31): wide img8517 and img3458, deep img1052,
#               one at a time, each both ways, cap 60 s (or CAP_S if lower); compare times and domains
#   one_by_one  the 4 OVAL21 time-outs above and the 5 MNIST ones with an unsat consensus, ONE AT A TIME
#               (the whole GPU each: processes sharing a GPU time-slice it), each capped at CAP_S, while
#               time lasts
# Every step has its own time limit; a failing step does not stop the next. Logs and JSON/CSV end up
# in OUT/gpu_check.log and OUT/gpu_check_work.tgz.
#
# usage: bash benchmarks/gpu_check.sh OUT BENCH_ROOT [BUDGET_S] [CAP_S] [STEP ...]
#   BENCH_ROOT holds vnncomp2022_mnist_fc/ and vnncomp2022_oval21/ (e.g. ../shared/benchmarks)
#   BUDGET_S   wall-clock budget of the whole script (default 520)
#   CAP_S      time limit per hard instance (default 180; the competition's are 300 / 720 s)
#   DEVICE=cpu runs it on the CPU (a dry run on a machine without a GPU); PYTHON= the interpreter;
#   PRECISION=float64 runs the bound engine in float64 on the GPU (default auto: float32 there);
#   REFINE=split forces the split refinement of intermediate bounds (on OVAL21's conv nets too; session 13
#   measured it on the CPU only: OVAL21 deep img1052's frontier −0.0075 → −0.0023 at 720 s).
#
# On a machine whose Python has torch but not this project's solvers (session 12's H200 image), bring
# wheels of highspy, cvxpy, clarabel, osqp, qdldl and immutabledict for its Python (pip download
# --only-binary=:all: --python-version 3.12 …; 12 MB), install them with `pip install --no-deps --target
# /tmp/site`, set PYTHONPATH=/tmp/site:$PWD, and copy the two benchmark folders into the checkout
# (e.g. an ignored .shared_bench/) when ../shared does not travel with it.
set -u
OUT=${1:?usage: gpu_check.sh OUT BENCH_ROOT [BUDGET_S] [CAP_S] [STEP ...]}
BENCH=$(cd "${2:?BENCH_ROOT}" && pwd)
BUDGET=${3:-520}
CAP=${4:-180}
shift $(($# < 4 ? $# : 4))
STEPS=${*:-tests bridge open solved}
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}
PREC=${PRECISION:-auto}   # PRECISION=float64: the bound engine in float64 on the GPU (a proof, not a margin)
REF=${REFINE:-auto}       # REFINE=split: the split refinement on every net (bench_vnncomp.py --refine)
export PYTHONUNBUFFERED=1
start=$(date +%s)
W="$OUT/work"
mkdir -p "$W"
left() { echo $((BUDGET - ($(date +%s) - start))); }
log() { echo "=== [+$(($(date +%s) - start)) s] $*"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

# The instances the 2-core CPU left open at the competition's limits (RESULTS.md, sessions 7-11).
MNIST_OPEN='256x4.onnx,vnnlib/prop_2_0.05|256x6.onnx,vnnlib/prop_(2|5|7|9|12)_0.05'
OVAL_OPEN='img(1052|9931|4405|3458|9916|2732)-'
OVAL_OPEN4='img(1052|9931|4405|3458)-'       # α,β-CROWN: 54, 96, 182, 83 s on its GPU
OVAL_NOBODY='img(9410|6432|7564|5989)-'      # α,β-CROWN timed out on these too
# Several searches share the GPU: each gets its share of the device memory for its stored domains.
OVAL_BAB='{"max_store_bytes": 18000000000}'
MNIST_BAB='{"max_store_bytes": 3500000000}'

subset() {   # subset FOLDER PATTERN NAME [-v]: an instances CSV of the matching rows, beside the folder's
    grep -E ${4:-} "$2" "$BENCH/$1/instances.csv" > "$BENCH/$1/$3"
    echo "$1/$3: $(wc -l < "$BENCH/$1/$3") instances"
}

vnncomp() {   # vnncomp FOLDER CSV NAME JOBS CAP [BAB_OPTIONS]: bench_vnncomp.py on the device, a time limit of its own
    local n t; n=$(wc -l < "$BENCH/$1/$2")
    t=$(( ($5 + 30) * ((n + $4 - 1) / $4) + 60 ))
    timeout $(( t < $(left) ? t : $(left) )) $PY benchmarks/bench_vnncomp.py --bench-dir "$BENCH/$1" \
        --instances "$2" --device "$DEV" --precision "$PREC" --refine "$REF" --jobs "$4" --max-timeout "$5" ${6:+--bab-options "$6"} \
        --out "$W/${3}_$DEV.json" > "$W/${3}_$DEV.log" 2>&1
    echo "$3 rc=$?"
}

{
log "machine; steps: $STEPS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, numpy; print('torch', torch.__version__, '| numpy', numpy.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
echo "cores: $(nproc)"

if has tests; then
    log "GPU tests"
    timeout 200 $PY -m pytest -q -p no:cacheprovider --run-gpu -m gpu \
        tests/mipprune/verification/test_cuda.py tests/mipprune/verification/test_crown.py \
        tests/mipprune/pruning/test_surgery.py tests/mipprune/pruning/test_bridge.py \
        tests/mipprune/pruning/test_transformer_selector.py tests/mipprune/cli/test_prune.py > "$W/pytest_gpu.log" 2>&1
    echo "pytest rc=$?"
    tail -n 25 "$W/pytest_gpu.log"
fi

if has bridge; then
    log "bench_bridge on $DEV"
    timeout 90 $PY benchmarks/bench_bridge.py --device "$DEV" --out "$W/bridge_$DEV.json" > "$W/bridge_$DEV.log" 2>&1
    echo "bridge rc=$?"
    tail -n 20 "$W/bridge_$DEV.log"
fi

if has open; then
    log "VNN-COMP on $DEV: the CPU's time-outs, cap $CAP s, both suites at once"
    subset vnncomp2022_mnist_fc "$MNIST_OPEN" gpu_open.csv
    subset vnncomp2022_oval21 "$OVAL_OPEN" gpu_open.csv
    vnncomp vnncomp2022_mnist_fc gpu_open.csv mnist_open 6 "$CAP" "$MNIST_BAB" &
    vnncomp vnncomp2022_oval21 gpu_open.csv oval_open 6 "$CAP" "$OVAL_BAB"
    wait
    tail -n 30 "$W/oval_open_$DEV.log" "$W/mnist_open_$DEV.log"
fi

if has mnist_full || has oval_open; then
    log "VNN-COMP on $DEV: $(has mnist_full && echo 'all of MNIST-FC (12 at once) ')$(has oval_open && echo 'the OVAL21 time-outs α,β-CROWN solved in under 200 s (4 at once)'), cap $CAP s"
    if has mnist_full; then
        f="$BENCH/vnncomp2022_mnist_fc"
        { grep -E '256x6.*_0\.05' "$f/instances.csv"; grep -E '256x4.*_0\.05' "$f/instances.csv"
          grep -vE '256x[46].*_0\.05' "$f/instances.csv"; } > "$f/gpu_full.csv"   # the slow ones first
        echo "vnncomp2022_mnist_fc/gpu_full.csv: $(wc -l < "$f/gpu_full.csv") instances"
        vnncomp vnncomp2022_mnist_fc gpu_full.csv mnist_full 12 "$CAP" "$MNIST_BAB" &
    fi
    if has oval_open; then
        subset vnncomp2022_oval21 "$OVAL_OPEN4" gpu_open4.csv
        vnncomp vnncomp2022_oval21 gpu_open4.csv oval_open4 4 "$CAP" "$OVAL_BAB"
    fi
    wait
    for f in "$W"/mnist_full_"$DEV".log "$W"/oval_open4_"$DEV".log; do [ -f "$f" ] && tail -n 30 "$f"; done
fi

ab() {   # ab NAME WHAT PATTERN MIN_LEFT WAY...: OVAL21 instances matching PATTERN, one at a time, each the ways
    # in turn (WAY = label/precision/bab_options), cap 60 s (or CAP if lower); a way starts only with MIN_LEFT s left
    local name=$1 what=$2 pattern=$3 min=$4 c=$((CAP < 60 ? CAP : 60)) way label prec opts
    shift 4
    log "VNN-COMP on $DEV: $what, one instance at a time, cap $c s"
    subset vnncomp2022_oval21 "$pattern" "gpu_$name.csv"
    for way in "$@"; do
        IFS=/ read -r label prec opts <<< "$way"
        [ "$(left)" -gt "$min" ] || { log "stopped: $(left) s left"; break; }
        PREC=$prec vnncomp vnncomp2022_oval21 "gpu_$name.csv" "${name}_$label" 1 "$c" "$opts"
        grep -E "^\s+\[" "$W/${name}_${label}_$DEV.log"
    done
}

if has fp64; then
    ab fp64 "float32 against float64" 'img(3568|8517|4168)-' 150 float32/float32/ float64/float64/
fi

if has conv; then
    ab conv "conv products against CSR" 'img(8517|3458|1052)-' 200 "csr/$PREC/{}" "conv/$PREC/{\"conv\": true}"
fi

if has one_by_one; then
    log "VNN-COMP on $DEV, one instance at a time, cap $CAP s each"
    subset vnncomp2022_oval21 "$OVAL_OPEN4" gpu_one_oval.csv
    subset vnncomp2022_mnist_fc '256x4.onnx,vnnlib/prop_2_0.05|256x6.onnx,vnnlib/prop_(2|5|9|12)_0.05' gpu_one_mnist.csv
    k=0
    for suite in vnncomp2022_oval21:gpu_one_oval.csv vnncomp2022_mnist_fc:gpu_one_mnist.csv; do
        while IFS= read -r row; do
            [ "$(left)" -gt $((CAP + 30)) ] || { log "stopped: $(left) s left"; break 2; }
            k=$((k + 1))
            echo "$row" > "$BENCH/${suite%%:*}/gpu_one_$k.csv"
            vnncomp "${suite%%:*}" "gpu_one_$k.csv" "one_$k" 1 "$CAP"
            grep -E "^\s+\[" "$W/one_${k}_$DEV.log" | tail -n 1
        done < "$BENCH/${suite%%:*}/${suite#*:}"
    done
fi

if has solved; then
    if [ "$(left)" -gt 100 ]; then
        cap2=$(( $(left) - 40 < 60 ? $(left) - 40 : 60 ))
        log "VNN-COMP on $DEV: the OVAL21 instances the CPU solves, cap $cap2 s, 10 at once"
        subset vnncomp2022_oval21 "$OVAL_OPEN|$OVAL_NOBODY" gpu_solved.csv -v
        vnncomp vnncomp2022_oval21 gpu_solved.csv oval_solved 10 "$cap2"
        tail -n 30 "$W/oval_solved_$DEV.log"
    else
        log "skipped the OVAL21 instances the CPU solves: $(left) s left"
    fi
fi
log "done"
} 2>&1 | tee "$OUT/gpu_check.log"
tar czf "$OUT/gpu_check_work.tgz" -C "$OUT" work && rm -rf "$W"
