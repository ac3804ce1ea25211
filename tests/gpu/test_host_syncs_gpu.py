"""Host syncs on CUDA, counted by torch's sync debug mode (a warning per synchronizing call)."""

import warnings
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def _count_syncs():
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())


def test_counting_experts_does_not_sync():
    """torch.bincount on CUDA reads max/min of its input on the host; count_ids does not."""
    from deepseek_moe.model.dispatch import count_ids

    ids = torch.randint(0, 8, (64, 2), device="cuda")
    with _count_syncs() as syncs:
        counts = count_ids(ids, 8)
    assert syncs == []
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=8))


def test_local_dispatch_syncs_once_with_drops_and_never_dropless():
    from deepseek_moe.model.dispatch import LocalDispatcher

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (64, 2), generator=g).cuda()
    x, w = torch.randn(64, 16, device="cuda"), torch.rand(64, 2, device="cuda")
    d = LocalDispatcher()
    for may_drop, expected in ((True, 1), (False, 0)):  # the kept-copy count, read only with drops
        with _count_syncs() as syncs:
            x_ND, counts, ctx = d.dispatch(x, ids, w, 8, may_drop=may_drop)
            d.combine(x_ND, ctx)
        assert len(syncs) == expected, (may_drop, syncs)
        assert counts.device.type == "cuda"


def test_train_step_syncs_once_per_step():
    from deepseek_moe.config.train import RunConfig
    from deepseek_moe.train.distributed import DistInfo
    from deepseek_moe.train.trainer import Trainer
    from tests.train.test_trainer_parts import ACCUM, _FakeEngine

    trainer = Trainer(RunConfig())
    trainer.cfg.model.moe = None
    trainer.engine = _FakeEngine("cuda")
    trainer.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    batches = iter(
        [{"input_ids": torch.zeros(1, 1, dtype=torch.long), "labels": torch.zeros(1, 1, dtype=torch.long)}]
        * ACCUM
    )
    with _count_syncs() as syncs:
        trainer._train_step(batches)
    # the batches go up pinned and non-blocking (no sync); the one read of the summed losses is
    assert len(syncs) == 1, syncs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_training_step_syncs(dtype):
    """Syncs of one dropless MoE layer training forward + backward at EP=1: none where the grouped
    GEMM is native (bf16 on sm90/sm100), one (the loop kernel reading its counts) elsewhere."""
    from deepseek_moe.config.model import MoEConfig
    from deepseek_moe.model.experts import resolve_impl
    from deepseek_moe.model.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(64, MoEConfig(n_routed_experts=8, top_k=2, moe_intermediate_size=32)).cuda().to(dtype)
    x = torch.randn(2, 16, 64, device="cuda", dtype=dtype, requires_grad=True)
    y, _ = layer(x)  # warm-up (lazy inits)
    y.sum().backward()
    with _count_syncs() as syncs:
        y, _ = layer(x)
        y.float().sum().backward()
    impl = resolve_impl(layer.cfg.experts_impl, x.device, dtype)
    print(f"MoE layer training step syncs, {dtype}, experts_impl auto -> {impl}: {len(syncs)}")
    assert impl == (
        "grouped_mm"
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10)
        else "loop"
    )
    assert len(syncs) == (1 if impl == "loop" else 0), syncs
