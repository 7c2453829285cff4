# Sourced by the slurm/*.sh job scripts (not a job script itself): start the ranks of one
# splitmpi run inside the allocation. Needs SPLITMPI_HOME, PYTHON and LAUNCHER set.
#   launch ARGS...   ->  srun --mpi=pmi2 -n $SLURM_NTASKS $PYTHON -m splitmpi ARGS...
#                    or  $MPIEXEC -n $SLURM_NTASKS $PYTHON -m splitmpi ARGS...  (LAUNCHER=mpiexec)

# The repository's splitmpi wins over any installed copy.
export PYTHONPATH="$SPLITMPI_HOME${PYTHONPATH:+:$PYTHONPATH}"
# Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task; this passes it on.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

launch() {
    local ntasks=${SLURM_NTASKS:-4} cmd mpiexec python_path
    case $LAUNCHER in
        srun)
            # pmi2: the pip MPICH speaks PMI-2; --mpi=pmix is not available everywhere
            cmd=(srun --mpi=pmi2 -n "$ntasks" "$PYTHON" -m splitmpi "$@") ;;
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
    "${cmd[@]}"
}
