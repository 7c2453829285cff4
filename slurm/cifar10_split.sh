#!/bin/bash
# Split learning of ResNet-50 on CIFAR-10, 3 clients + 1 server (table 1 of the paper).
#
#   sbatch slurm/cifar10_split.sh [key=value ...]          # from the repository root
#   DATA_ROOT=/scratch/data sbatch slurm/cifar10_split.sh model.cut=layer3
#
# Environment (all optional; sbatch passes the submitting shell's environment on):
#   CONFIG       YAML config   (default: configs/table1_cifar10_sharing.yaml)
#   DATA_ROOT    data.root: the folder holding cifar-10-batches-py/ (default: data)
#   RESULTS_DIR  where the results file goes (default: results); the file is
#                $RESULTS_DIR/<job name>-<job id>.h5 (OUTPUT=path.h5 or output=... to choose)
#   PYTHON       the Python with splitmpi, torch, mpi4py (default: python on PATH)
#   LAUNCHER     srun (default: srun --mpi=pmi2) or mpiexec (mpiexec -n $SLURM_NTASKS;
#                MPIEXEC, default the mpiexec beside PYTHON, else on PATH)
#   SPLITMPI_HOME  the repository (default: the submit directory), put on PYTHONPATH
# Arguments are splitmpi overrides, passed on after the config's own settings.
#
#SBATCH --job-name=cifar10-split    # %x in --output and in the results file name
#SBATCH --nodes=1                   # the server and the 3 clients on one node (any count works)
#SBATCH --ntasks=4                  # MPI ranks: 1 server (rank 0) + 3 clients
#SBATCH --gpus-per-task=1           # one GPU bound to each rank (CUDA_VISIBLE_DEVICES per task)
#SBATCH --cpus-per-task=4           # cores per rank: data.workers=2 loader processes + the rank
#SBATCH --time=1-00:00:00           # wall time limit (200 epochs)
#SBATCH --signal=USR1@300           # every rank gets SIGUSR1 300 s before the time limit
#SBATCH --output=%x-%j.out          # log: <job name>-<job id>.out in the submit directory

set -euo pipefail

SPLITMPI_HOME=${SPLITMPI_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
CONFIG=${CONFIG:-$SPLITMPI_HOME/configs/table1_cifar10_sharing.yaml}
DATA_ROOT=${DATA_ROOT:-data}
RESULTS_DIR=${RESULTS_DIR:-results}
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-srun}
OUTPUT=${OUTPUT:-$RESULTS_DIR/${SLURM_JOB_NAME:-cifar10-split}-${SLURM_JOB_ID:-local}.h5}

source "$SPLITMPI_HOME/slurm/launch.sh"
launch -c "$CONFIG" data.root="$DATA_ROOT" output="$OUTPUT" "$@"
