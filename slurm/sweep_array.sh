#!/bin/bash
# One cell of a sweep per array task. Submitted by `python jobs/sweep.py TABLE --slurm`,
# which writes the cells file and runs
#   sbatch --array=0-(n-1) --ntasks=1+CLIENTS --job-name=splitmpi-TABLE \
#          --output=RESULTS_DIR/TABLE/%x-%A_%a.out slurm/sweep_array.sh CELLS.json
# Task i runs cell i of CELLS.json (skipped if its results file is already finished):
#   $PYTHON jobs/sweep.py --cells CELLS.json --index $SLURM_ARRAY_TASK_ID
# Environment: PYTHON (default python; sweep.py sets it to its own Python), LAUNCHER
# (srun, default, or mpiexec), MPIEXEC, SPLITMPI_HOME (the repository; set by sweep.py).
# The #SBATCH values below are the defaults for one cell; sweep.py sets --ntasks, and
# sweep.py --sbatch-arg=... adds or overrides others (e.g. --sbatch-arg=--time=4:00:00).
#
#SBATCH --job-name=splitmpi-sweep   # %x; sweep.py names it splitmpi-<table>
#SBATCH --nodes=1                   # one cell's server and clients on one node
#SBATCH --ntasks=4                  # MPI ranks of one cell: 1 server + 3 clients
#SBATCH --gpus-per-task=1           # one GPU bound to each rank
#SBATCH --cpus-per-task=8           # cores per rank (DataLoader workers + the rank)
#SBATCH --time=2-00:00:00           # wall time limit of one cell
#SBATCH --signal=USR1@300           # every rank gets SIGUSR1 300 s before the time limit
#SBATCH --output=%x-%A_%a.out       # log: <job name>-<array job id>_<task index>.out

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch --array=0-N slurm/sweep_array.sh CELLS.json (see jobs/sweep.py)" >&2
    exit 2
fi
CELLS=$1
SPLITMPI_HOME=${SPLITMPI_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-srun}

export PYTHONPATH="$SPLITMPI_HOME${PYTHONPATH:+:$PYTHONPATH}"
# Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task; this passes it on.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
args=(--cells "$CELLS" --index "${SLURM_ARRAY_TASK_ID:?not an array task}" --launcher "$LAUNCHER")
if [[ -n ${MPIEXEC:-} ]]; then
    args+=(--mpiexec "$MPIEXEC")
fi
echo "splitmpi sweep task ${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID} on" \
     "${SLURM_JOB_NODELIST:-$(hostname)}: cell ${SLURM_ARRAY_TASK_ID} of $CELLS"
exec "$PYTHON" "$SPLITMPI_HOME/jobs/sweep.py" "${args[@]}"
