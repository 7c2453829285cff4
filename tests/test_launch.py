"""The singleton guard (``runtime.check_launch``): a launcher that started several tasks
whose MPI each made a world of 1 rank (Open MPI 5 under ``srun --mpi=pmi2`` or plain
``srun``) exits 2 with one message naming the mismatch, before any work; a real launch and
a plain world of 1 are left as they were. Launcher mismatches between real MPIs are in
tests/test_openmpi.py; docs/cluster.md has the launcher table."""
import pytest

import mpirun
from splitmpi import reader
from splitmpi.errors import ConfigError
from splitmpi.runtime import LAUNCH_SIZES, check_launch

# What the guard reads, cleared for the real runs: the tests may run inside a job step.
NO_LAUNCHER = {name: None for name, _ in LAUNCH_SIZES}


@pytest.mark.parametrize("name", [name for name, _ in LAUNCH_SIZES])
def test_a_world_of_one_among_several_tasks_is_refused(name):
    with pytest.raises(ConfigError) as caught:
        check_launch(1, {name: "4"})
    assert f"the environment says 4 tasks ({name}=4" in caught.value.problem
    assert "MPI started a world of 1 rank" in caught.value.problem
    assert "srun --mpi=pmix for Open MPI 5" in caught.value.fix
    assert "mpirun of the MPI that mpi4py uses" in caught.value.fix


def test_the_step_count_is_named_first():
    """Under srun --mpi=pmi2 both are set (as seen on the test cluster); srun is the one
    the user typed."""
    with pytest.raises(ConfigError, match=r"SLURM_STEP_NUM_TASKS=3, set by srun"):
        check_launch(1, {"PMI_SIZE": "3", "SLURM_STEP_NUM_TASKS": "3"})


@pytest.mark.parametrize("world, environ", [
    (4, {"SLURM_STEP_NUM_TASKS": "4", "PMI_SIZE": "4"}),  # srun --mpi=pmi2 with MPICH
    (4, {"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "PMI_SIZE": "4"}),  # mpiexec in
    # an allocation: Hydra's proxy is a one-task step
    (4, {"SLURM_NTASKS": "4", "OMPI_COMM_WORLD_SIZE": "4"}),  # Open MPI's mpirun in sbatch
    (1, {"SLURM_NTASKS": "4", "SLURM_NPROCS": "4"}),  # python run by the batch script itself
    (1, {"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "1"}),  # srun -n 1, mpiexec -n 1
    (1, {"PMI_SIZE": "", "OMPI_COMM_WORLD_SIZE": "many"}),  # nothing to go by
    (1, {}),
])
def test_launches_that_match_or_say_nothing_pass(world, environ):
    check_launch(world, environ)  # raises on a false alarm


def test_a_lone_task_of_four_exits_2_before_any_work(tmp_path):
    """What each task of ``srun -n 4`` with a mismatched MPI is: a plain process (world of
    1) whose environment says 4 tasks."""
    proc = mpirun.alone("output=out.h5", cwd=tmp_path,
                        extra_env={**NO_LAUNCHER, "SLURM_STEP_NUM_TASKS": "4"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("splitmpi: error") == 1 and "Traceback" not in proc.stderr
    assert "says 4 tasks (SLURM_STEP_NUM_TASKS=4" in proc.stderr
    assert "srun --mpi=pmix" in proc.stderr
    assert not (tmp_path / "out.h5").exists()


def test_a_world_of_one_without_a_launcher_keeps_its_own_error(tmp_path):
    """``python -m splitmpi`` run by a batch script itself (SLURM_NTASKS is the
    allocation's) is no launcher mismatch: the world-size error says what to do."""
    proc = mpirun.alone("output=out.h5", cwd=tmp_path,
                        extra_env={**NO_LAUNCHER, "SLURM_NTASKS": "4"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("splitmpi: error") == 1
    assert "needs a server and at least one client, got 1 rank" in proc.stderr
    assert "world of 1 rank" not in proc.stderr
    assert not (tmp_path / "out.h5").exists()


def test_a_real_launch_runs(tmp_path):
    mpirun.ok(2, *mpirun.TINY, "train.epochs=1", "output=out.h5", cwd=tmp_path,
              extra_env=NO_LAUNCHER)
    run = reader.read(tmp_path / "out.h5")
    assert run.finished and run.attrs["world_size"] == 2 and run.epochs == 1
