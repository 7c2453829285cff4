#!/usr/bin/env bash
# shellcheck disable=SC2317  # the check_* functions are called by name, from run_check
# GPU acceptance of splitmpi on one bare GPU node: install, GPU checks, benchmarks, summary.
#
#   tests/gpu/run.sh [--gpu|--cpu] [--no-install] [--wheels DIR] [--out DIR] [--work DIR]
#                    [--python PY] [--budget SECONDS] [--only NAME,NAME...]
#
# For a node with torch preinstalled and no internet (the device machine: python3 is
# /opt/torch/.venv/bin/python3, Python 3.12, x86-64). In order, each one a check:
#   install          venv WORK/venv with --system-site-packages (no pip of its own: the base
#                    Python's pip installs into it with --python), plus a .pth to the
#                    packages of the Python that made it (a venv's own, which
#                    --system-site-packages leaves out), so the preinstalled torch is used;
#                    then every wheel in the wheel folder (pip install --no-index --find-links
#                    DIR --no-deps --ignore-installed DIR/*.whl: an MPI runtime and mpi4py),
#                    then splitmpi (pip install --no-deps --no-build-isolation -e .; if that
#                    fails, a wheel of it). --no-install: none of it, the current environment
#                    runs everything (PYTHON or --python).
#   deps             every module splitmpi imports at run time (torch, torchvision, numpy,
#                    h5py, PyYAML, mpi4py and its MPI library; matplotlib and pillow as
#                    optional) imports; a missing one is named with how to bring it. Card.
#   staging          comm.gpu_aware=false: CUDA tensors staged through pinned host buffers;
#                    a send of batch i+1 started before batch i's is waited for still delivers
#                    batch i's values (tests/test_transport.py's check, in-process), then the
#                    same between 2 ranks, and a bfloat16-wire activation and gradient.
#   amp_bf16         4 ranks (3 clients) of cnn5, 2 epochs, train.amp=bf16; results read back.
#   wire_bf16        the same run with comm.wire_dtype=bfloat16 (and amp off): about half
#                    the bytes of the amp run (which sends float32) on the wire.
#   resnet50         4 ranks sharing the GPU, 3 clients, ResNet-50 cut at layer2, 2 epochs,
#                    synthetic data at 64 px, sharing on; the HDF5 results file read back.
#   bench_transport  mpiexec -n 2 python -m splitmpi.bench transport --device cuda --repeats 3
#   bench_train      mpiexec -n 4 python -m splitmpi.bench train --device cuda --repeats 2
# Every mpiexec and python runs under `timeout`; the whole is held to --budget seconds
# (default 540 on a GPU: about 3-4 minutes are expected on an H100), a check left without
# time is failed as not run.
#
# Modes: --gpu (default where nvidia-smi lists a GPU) runs on cuda; --cpu runs the same steps
# on the CPU at tiny sizes so that CI checks the script itself: train.device=cpu, staging
# forced on CPU tensors as the in-process test does, deps only finds torch (no import), the
# amp and wire runs and bench train on 2 ranks, ResNet-50 cut at layer1 at 8 px with 8
# samples per client, benchmarks --smoke --device cpu (tests/test_gpu_script.py runs it so,
# with --no-install). --only NAME,... runs only those checks (install still runs, unless
# --no-install); --python PY (or PYTHON) is the interpreter that holds torch (default
# python3); MPIEXEC overrides the launcher (default: the one beside that Python, else PATH's).
#
# Output (--out DIR, default $OUT when set, else a new folder under /tmp): summary.md (the
# card, each check PASS/FAIL/SKIP with its figures, the benchmark tables, the log tail of a
# failed check), summary.json (the same, for programs), log.txt (every check's output),
# bench-transport.json and bench-train.json: 5 files, within the device tool's 8. The summary
# is rewritten after every check, so a run cut short still leaves one. Exit 0 when every
# check passed, 1 when one failed, 2 on a bad argument. Scratch (venv, runs) in --work DIR
# (default a new folder under /tmp).
#
# The wheel folder: --wheels DIR, else $SPLITMPI_WHEELS, else .whl/ at the repository root
# (ignored by .gitignore, so it never lands in git), else shared/wheels/. Fill it here, on a
# machine with PyPI, for the GPU node's Python 3.12 on x86-64 (14 MB):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
#     --platform manylinux1_x86_64 -d .whl mpich==5.0.2 mpi4py==4.1.2
#
# (MPICH rather than Open MPI: the node runs commands as root, which Open MPI refuses
# without extra flags.) A module that deps reports missing is downloaded the same way, by
# name. On the device tool, carry the folder and run (splitmpi's files travel as the
# working tree):
#
#   run(command="bash tests/gpu/run.sh --gpu --wheels .whl", carry=[".whl"], timeout_s=600)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CHECKS="$ROOT/tests/gpu/checks.py"
ALL_CHECKS="install deps staging amp_bf16 wire_bf16 resnet50 bench_transport bench_train"

usage() { sed -n '3,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "run.sh: $*" >&2; exit 2; }

MODE=auto INSTALL=1 WHEELS="" OUTDIR="" WORK="" BUDGET="" ONLY=""
PY=${PYTHON:-python3}
while (($#)); do
    case $1 in
        --gpu) MODE=gpu ;;
        --cpu) MODE=cpu ;;
        --no-install) INSTALL=0 ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        --out) OUTDIR=${2:?--out needs a folder}; shift ;;
        --work) WORK=${2:?--work needs a folder}; shift ;;
        --python) PY=${2:?--python needs an interpreter}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --only) ONLY=${2:?--only needs check names}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
for name in ${ONLY//,/ }; do
    [[ " $ALL_CHECKS " == *" $name "* ]] || die "--only: no check $name (checks: $ALL_CHECKS)"
done
[[ -z $BUDGET || $BUDGET =~ ^[0-9]+$ ]] || die "--budget takes whole seconds, got $BUDGET"
PY=$(command -v "$PY") || die "no Python '${PYTHON:-python3}' (set PYTHON or --python)"
BASE_PY=$PY  # runs the summary, whatever happens to the venv

if [[ $MODE == auto ]]; then
    if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then MODE=gpu; else MODE=cpu; fi
fi
DEV=$([[ $MODE == gpu ]] && echo cuda || echo cpu)
OUTDIR=${OUTDIR:-${OUT:-}}
[[ -n $OUTDIR ]] || OUTDIR=$(mktemp -d "${TMPDIR:-/tmp}/splitmpi-gpu-out.XXXXXX")
[[ -n $WORK ]] || WORK=$(mktemp -d "${TMPDIR:-/tmp}/splitmpi-gpu-work.XXXXXX")
mkdir -p "$OUTDIR" "$WORK" || die "cannot make $OUTDIR or $WORK"
OUTDIR=$(cd "$OUTDIR" && pwd) WORK=$(cd "$WORK" && pwd)
rm -f "$WORK"/checks.tsv "$WORK"/fig-*.json "$WORK"/log-*.txt \
    "$WORK"/{amp,wire,resnet50}.h5 "$WORK"/bench-{transport,train}.json
if [[ -z $WHEELS ]]; then
    WHEELS=${SPLITMPI_WHEELS:-}
    if [[ -z $WHEELS ]]; then
        WHEELS="$ROOT/.whl"
        compgen -G "$WHEELS/*.whl" >/dev/null || WHEELS="$ROOT/shared/wheels"
    fi
fi
if [[ -z $BUDGET ]]; then BUDGET=$([[ $MODE == gpu ]] && echo 540 || echo 600); fi
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
START_S=$(date +%s)
DEADLINE=$((START_S + BUDGET))
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "")
[[ -n $COMMIT ]] && ! git -C "$ROOT" diff --quiet HEAD 2>/dev/null && COMMIT="$COMMIT+changes"

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this tree's splitmpi, installed or not
export HYDRA_LAUNCHER=${HYDRA_LAUNCHER:-fork}  # MPICH: one node, no ssh
if [[ $MODE == cpu ]]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # tiny sizes; 2 ranks (1 client) where 3 clients are not the point of the check
    SMALL_RANKS=2 BENCH_TRAIN_RANKS=2
    # ranks sleep while they wait: spinning ones starve the computing one on a loaded CI box
    RUN=(data.name=synthetic data.image_size=16 data.train_size=64 data.test_size=32
         train.batch_size=16 train.epochs=2 model.arch=cnn5 model.cut=2 comm.wait=sleep)
    RESNET=(data.name=synthetic data.image_size=8 data.train_size=24 data.test_size=12
            data.partition=iid train.batch_size=8 train.epochs=2 model.arch=resnet50
            model.cut=layer1 split.bn_recalibrate_batches=1)
    BENCH_TRANSPORT=(--smoke) BENCH_TRAIN=(--smoke --set comm.wait=sleep)
    LIMITS=(install=300 deps=60 staging=90 amp_bf16=120 wire_bf16=120 resnet50=180
            bench_transport=120 bench_train=120)
else
    SMALL_RANKS=4 BENCH_TRAIN_RANKS=4
    RUN=(data.name=synthetic data.image_size=32 data.train_size=1920 data.test_size=480
         train.batch_size=32 train.epochs=2 model.arch=cnn5 model.cut=2)
    RESNET=(data.name=synthetic data.image_size=64 data.train_size=960 data.test_size=240
            train.batch_size=32 train.epochs=2 model.arch=resnet50 model.cut=layer2)
    BENCH_TRANSPORT=(--repeats 3) BENCH_TRAIN=(--repeats 2)
    LIMITS=(install=180 deps=60 staging=60 amp_bf16=90 wire_bf16=90 resnet50=120
            bench_transport=120 bench_train=150)
fi

say() { printf '[%4ds] %s\n' $(($(date +%s) - START_S)) "$*"; }

# what is left of the current check's time (CHECK_END), for each command it runs
within() {
    local left=$((CHECK_END - $(date +%s)))
    if ((left < 1)); then echo "no time left for: $*"; return 124; fi
    echo "+ $*"
    timeout -k 10 "$left" "$@"
}
mpi() { local n=$1; shift; within "$MPIEXEC" -n "$n" "$@"; }
checks() { within "$PY" "$CHECKS" "$@"; }
splitmpi_run() {  # splitmpi_run RANKS OUTPUT.h5 OVERRIDES...: a training run in WORK
    local n=$1 output=$2; shift 2
    (cd "$WORK" && mpi "$n" "$PY" -m splitmpi output="$output" overwrite=true "$@")
}

find_mpiexec() {
    if [[ -n ${MPIEXEC:-} ]]; then return; fi
    local beside
    beside="$(dirname "$PY")/mpiexec"  # the pip mpich's, beside the venv's python
    if [[ -x $beside ]]; then MPIEXEC=$beside; else MPIEXEC=$(command -v mpiexec || true); fi
    MPIEXEC=${MPIEXEC:-mpiexec}
}

check_install() {
    local venv="$WORK/venv" pip
    local quiet=(--disable-pip-version-check --no-cache-dir --no-input)
    echo "wheels: $WHEELS"
    ls -l "$WHEELS"/*.whl || echo "no wheels in $WHEELS: see the recipe in run.sh's header"
    rm -rf "$venv"
    # without pip of its own: ensurepip may be missing, and on Python < 3.12 it would add an
    # old setuptools that shadows the base's; the base Python's pip installs into it
    within "$BASE_PY" -m venv --system-site-packages --without-pip "$venv"
    within "$BASE_PY" "$CHECKS" link-site "$venv/bin/python"
    if within "$BASE_PY" -m pip --python "$venv/bin/python" --version; then
        pip=("$BASE_PY" -m pip --python "$venv/bin/python")
    else
        echo "the base Python's pip cannot install into another (pip < 22.3?): ensurepip"
        within "$venv/bin/python" -m ensurepip
        pip=("$venv/bin/python" -m pip)
    fi
    local wheels="none" how="editable"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        within "${pip[@]}" install "${quiet[@]}" --no-index --find-links "$WHEELS" --no-deps \
            --ignore-installed "$WHEELS"/*.whl
        wheels=$(for w in "$WHEELS"/*.whl; do w=${w##*/}; echo "${w%%-[a-z]*}"; done |
            paste -sd, -)
    fi
    if ! within "${pip[@]}" install "${quiet[@]}" --no-index --no-deps --no-build-isolation \
            -e "$ROOT"; then
        echo "the editable install failed: a wheel built by $BASE_PY, installed instead"
        rm -rf "$WORK/dist"
        within "$BASE_PY" -m pip wheel "${quiet[@]}" --no-index --no-deps \
            --no-build-isolation -w "$WORK/dist" "$ROOT"
        within "${pip[@]}" install "${quiet[@]}" --no-index --no-deps "$WORK"/dist/*.whl
        how="from a wheel"
    fi
    "$BASE_PY" -c 'import json, sys; open(sys.argv[1], "w").write(json.dumps({"text": sys.argv[2],
        "figures": {"venv": sys.argv[3], "wheels": sys.argv[4], "base_python": sys.argv[5]}}))' \
        "$WORK/fig-install.json" \
        "venv on $BASE_PY's packages; wheels: $wheels ($WHEELS); splitmpi $how" \
        "$venv" "$wheels" "$BASE_PY"
}
check_deps() { checks env --mode "$MODE" --figures "$WORK/fig-deps.json"; }
check_staging() {
    mpi 2 "$PY" "$CHECKS" staging --device "$DEV" --figures "$WORK/fig-staging.json"
}
check_amp_bf16() {
    splitmpi_run "$SMALL_RANKS" amp.h5 "${RUN[@]}" train.device="$DEV" train.amp=bf16 \
        comm.wire_dtype=float32
    checks results "$WORK/amp.h5" --clients $((SMALL_RANKS - 1)) --epochs 2 --device "$DEV" \
        --amp bf16 --wire float32 --figures "$WORK/fig-amp_bf16.json"
}
check_wire_bf16() {
    splitmpi_run "$SMALL_RANKS" wire.h5 "${RUN[@]}" train.device="$DEV" train.amp=none \
        comm.wire_dtype=bfloat16
    checks results "$WORK/wire.h5" --clients $((SMALL_RANKS - 1)) --epochs 2 --device "$DEV" \
        --amp none --wire bfloat16 --baseline "$WORK/amp.h5" --max-ratio 0.65 \
        --figures "$WORK/fig-wire_bf16.json"
}
check_resnet50() {
    splitmpi_run 4 resnet50.h5 "${RESNET[@]}" train.device="$DEV" split.share=true
    checks results "$WORK/resnet50.h5" --clients 3 --epochs 2 --device "$DEV" \
        --arch resnet50 --figures "$WORK/fig-resnet50.json"
}
check_bench_transport() {
    (cd "$WORK" && mpi 2 "$PY" -m splitmpi.bench transport --device "$DEV" \
        "${BENCH_TRANSPORT[@]}" --json "$WORK/bench-transport.json")
    checks bench transport "$WORK/bench-transport.json" --device "$DEV" \
        --figures "$WORK/fig-bench_transport.json"
}
check_bench_train() {
    (cd "$WORK" && mpi "$BENCH_TRAIN_RANKS" "$PY" -m splitmpi.bench train --device "$DEV" \
        "${BENCH_TRAIN[@]}" --json "$WORK/bench-train.json")
    checks bench train "$WORK/bench-train.json" --device "$DEV" \
        --figures "$WORK/fig-bench_train.json"
}

write_summary() {  # write_summary [--partial]
    "$BASE_PY" "$CHECKS" summary --work "$WORK" --out "$OUTDIR" --mode "$MODE" \
        --commit "$COMMIT" --started "$STARTED" "$@" ||
        echo "run.sh: the summary could not be written" >&2
    for name in $ALL_CHECKS; do
        [[ -f $WORK/log-$name.txt ]] && { echo "===== $name"; cat "$WORK/log-$name.txt"; }
    done >"$OUTDIR/log.txt"
    for f in bench-transport.json bench-train.json; do
        [[ -f $WORK/$f ]] && cp "$WORK/$f" "$OUTDIR/$f"
    done
    return 0
}

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/checks.tsv"; }

run_check() {  # run_check NAME: check_NAME in a subshell (set -e), under its time limit
    local name=$1 limit=60 entry rc start seconds status note=""
    for entry in "${LIMITS[@]}"; do [[ $entry == "$name="* ]] && limit=${entry#*=}; done
    local left=$((DEADLINE - $(date +%s) - 10))
    if ((left < 15)); then
        record "$name" FAIL 0 "not run: the ${BUDGET}s budget is spent"
        say "FAIL $name: not run, budget spent"
        write_summary --partial
        return
    fi
    ((limit > left)) && limit=$left
    say "$name (limit ${limit}s)"
    start=$(date +%s.%N)
    CHECK_END=$(($(date +%s) + limit))
    ( set -e; "check_$name" ) >"$WORK/log-$name.txt" 2>&1
    rc=$?
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then status=PASS; else status=FAIL; fi
    ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
    ((rc != 0)) && [[ -z $note ]] && note="exit $rc"
    record "$name" "$status" "$seconds" "$note"
    say "$status $name (${seconds}s)${note:+: $note}"
    if [[ -f $WORK/fig-$name.json ]]; then
        "$BASE_PY" -c 'import json,sys; print("       ", json.load(open(sys.argv[1]))["text"])' \
            "$WORK/fig-$name.json" 2>/dev/null
    fi
    if ((rc != 0)); then
        echo "------ last lines of $name's log:" >&2
        tail -n 25 "$WORK/log-$name.txt" >&2
        echo "------" >&2
    fi
    write_summary --partial
}

wanted() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

say "splitmpi GPU acceptance: $MODE mode, python $PY, out $OUTDIR, work $WORK," \
    "budget ${BUDGET}s${ONLY:+, only $ONLY}"
if ((INSTALL)); then
    run_check install
    if [[ -x $WORK/venv/bin/python ]]; then  # also after a failed step: PYTHONPATH has splitmpi
        PY="$WORK/venv/bin/python"
        export PATH="$WORK/venv/bin:$PATH" VIRTUAL_ENV="$WORK/venv"
    fi
else
    record install SKIP 0 "--no-install: the current environment ($PY)"
fi
find_mpiexec
say "mpiexec: $MPIEXEC"
for name in $ALL_CHECKS; do
    [[ $name == install ]] && continue
    wanted "$name" && run_check "$name"
done
write_summary
ELAPSED=$(($(date +%s) - START_S))
say "done in ${ELAPSED}s: $(head -n 1 "$OUTDIR/summary.md" 2>/dev/null)"
say "summary: $OUTDIR/summary.md"
cat "$OUTDIR/summary.md" 2>/dev/null
if ! "$BASE_PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' \
        "$OUTDIR/summary.json" 2>/dev/null; then
    exit 1
fi
exit 0
