"""Which GPU a process takes, and its LOCAL_RANK, under every launcher layout (no GPU needed:
the rules are plain functions of the environment and the visible device count)."""

import pytest

from deepseek_moe.errors import ConfigError
from deepseek_moe.train.distributed import cuda_device_for, local_rank_from_env


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}, 1),  # deepspeed / torchrun
        ({"RANK": "9", "WORLD_SIZE": "16", "SLURM_LOCALID": "1"}, 1),  # bare srun
        ({"RANK": "9", "WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, 1),  # mpirun
        ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "", "SLURM_LOCALID": "3"}, 3),
        ({"RANK": "0", "WORLD_SIZE": "1"}, 0),  # one process needs none
    ],
)
def test_local_rank_comes_from_the_launcher_never_from_rank(env, expected):
    assert local_rank_from_env(env) == expected


def test_multi_process_world_without_local_rank_is_a_one_line_error():
    with pytest.raises(ConfigError, match="LOCAL_RANK is not set") as err:
        local_rank_from_env({"RANK": "9", "WORLD_SIZE": "16"})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "local_rank,count,expected",
    [
        (0, 8, 0),
        (7, 8, 7),  # one process per GPU of the node
        (3, 1, 0),  # one GPU per task (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per process)
        (0, 1, 0),
    ],
)
def test_cuda_device_for_each_layout(local_rank, count, expected):
    assert cuda_device_for(local_rank, count) == expected


def test_more_processes_than_gpus_is_a_one_line_error():
    with pytest.raises(ConfigError, match="LOCAL_RANK=4 but this process sees 4 GPUs") as err:
        cuda_device_for(4, 4, "0,1,2,3")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in str(err.value) and "\n" not in str(err.value)
