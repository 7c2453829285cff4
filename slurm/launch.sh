# Sourced by the slurm/*.sh job scripts (not a job script itself): start the ranks of one
# splitmpi run inside the allocation. Needs SPLITMPI_HOME, PYTHON and LAUNCHER set.
#   launch ARGS...   ->  srun --mpi=$SRUN_MPI -n $SLURM_NTASKS $PYTHON -m splitmpi ARGS...
#                        (SRUN_MPI: pmi2 by default, for MPICH; pmix for Open MPI 5)
#                    or  $MPIEXEC -n $SLURM_NTASKS $PYTHON -m splitmpi ARGS...  (LAUNCHER=mpiexec)

# The repository's splitmpi wins over any installed copy.
export PYTHONPATH="$SPLITMPI_HOME${PYTHONPATH:+:$PYTHONPATH}"
# Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task; this passes it on.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

# The job script's own arguments, kept for a resubmission (sourcing keeps the caller's "$@").
JOB_ARGS=("$@")

resubmit() {
    # splitmpi exited 75: it wrote a checkpoint after SIGUSR1 (--signal, ahead of the time
    # limit) or SIGTERM (preemption). Queue this script again with the same resources and
    # results file, resuming from that checkpoint. RESUBMIT=0 turns this off; RESUBMIT_LEFT
    # (default 20) bounds the chain.
    local left=${RESUBMIT_LEFT:-20}
    if [[ ${RESUBMIT:-1} == 0 || -z ${SLURM_JOB_ID:-} ]]; then return; fi
    if (( left <= 0 )); then
        echo "not resubmitting: RESUBMIT_LEFT is spent" >&2
        return
    fi
    sbatch --export="ALL,OUTPUT=$OUTPUT,SPLITMPI_HOME=$SPLITMPI_HOME,RESUBMIT_LEFT=$((left - 1))" \
        --job-name="$SLURM_JOB_NAME" --ntasks="$SLURM_NTASKS" --chdir="$PWD" \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
        "$0" "${JOB_ARGS[@]}" train.resume=auto
}

launch() {
    local ntasks=${SLURM_NTASKS:-4} cmd mpiexec python_path
    case $LAUNCHER in
        srun)
            # pmi2: the pip MPICH speaks PMI-2; Open MPI 5 speaks only PMIx (SRUN_MPI=pmix)
            cmd=(srun --mpi="${SRUN_MPI:-pmi2}" -n "$ntasks" "$PYTHON" -m splitmpi "$@") ;;
        mpiexec)
            python_path=$(command -v "$PYTHON" || true)
            mpiexec=${MPIEXEC:-}
            if [[ -z $mpiexec && -n $python_path && -x $(dirname "$python_path")/mpiexec ]]; then
                mpiexec=$(dirname "$python_path")/mpiexec
            fi
            cmd=("${mpiexec:-mpiexec}" -n "$ntasks" "$PYTHON" -m splitmpi "$@") ;;
        *)
            echo "LAUNCHER=$LAUNCHER is not supported: use srun or mpiexec" >&2
            exit 2 ;;
    esac
    echo "splitmpi job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-$(hostname)}," \
         "$ntasks ranks: ${cmd[*]}"
    local code=0
    "${cmd[@]}" || code=$?
    if (( code == 75 )); then
        echo "splitmpi stopped after a checkpoint; resubmitting to resume it"
        resubmit
    fi
    return $code
}
