"""Host syncs on CUDA, counted by torch's sync debug mode (a warning per synchronizing call)."""

import warnings
from contextlib import contextmanager

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


def test_local_dispatch_syncs_once():
    from deepseek_moe.model.dispatch import LocalDispatcher

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (64, 2), generator=g).cuda()
    x, w = torch.randn(64, 16, device="cuda"), torch.rand(64, 2, device="cuda")
    d = LocalDispatcher()
    with _count_syncs() as syncs:
        x_ND, counts, ctx = d.dispatch(x, ids, w, 8)
        d.combine(x_ND, ctx)
    assert len(syncs) == 1, syncs
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


def test_moe_layer_forward_syncs():
    """Report the syncs of one MoE layer forward at EP=1: the dispatcher's one, plus any the
    experts' implementation adds (the per-expert loop reads its counts on the host)."""
    from deepseek_moe.config.model import MoEConfig
    from deepseek_moe.model.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(64, MoEConfig(n_routed_experts=8, top_k=2, moe_intermediate_size=32)).cuda()
    x = torch.randn(2, 16, 64, device="cuda")
    layer(x)  # warm-up (lazy inits)
    with _count_syncs() as syncs:
        layer(x)
    impl = layer.cfg.experts_impl
    print(f"MoE layer forward syncs with experts_impl={impl}: {len(syncs)}")
    assert len(syncs) <= (2 if impl == "loop" else 1), syncs
