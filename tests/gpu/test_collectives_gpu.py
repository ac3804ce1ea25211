"""The process group a CUDA run creates carries CPU and CUDA collectives; a NCCL-only group
refuses CPU tensors (the failure the CPU tests emulate with `cuda:gloo`)."""

import torch

from deepseek_moe.testing.distributed import run_distributed


def _one_rank(rank, world, backend):
    import datetime

    from deepseek_moe.train.distributed import all_reduce_dict, all_reduce_max_flag

    torch.distributed.init_process_group(
        backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    torch.cuda.set_device(0)
    out = {}
    for device in ("cuda", "cpu"):
        t = torch.ones(3, device=device)
        try:
            torch.distributed.all_reduce(t)
            out[device] = "ok"
        except RuntimeError as err:
            out[device] = str(err).splitlines()[0]
    # our helpers put their tensors on the run's device
    out["helpers"] = (
        all_reduce_max_flag(True, torch.device("cuda")),
        all_reduce_dict({"a": torch.tensor(2.0, device="cuda")}, torch.device("cuda")),
    )
    return out


def test_cuda_run_group_carries_cpu_and_cuda_collectives():
    from deepseek_moe.train.distributed import process_group_backend

    (out,) = run_distributed(_one_rank, 1, process_group_backend("cuda"), init_process_group=False)
    assert out["cuda"] == "ok" and out["cpu"] == "ok"
    assert out["helpers"] == (True, {"a": 2.0})


def test_nccl_only_group_refuses_cpu_tensors():
    (out,) = run_distributed(_one_rank, 1, "nccl", init_process_group=False)
    assert out["cuda"] == "ok"
    assert "No backend type associated with device type cpu" in out["cpu"]
