"""Activation checkpointing ("full") gives the gradients of the plain run (fp32, 1e-6) at EP=1
and EP=2, with router noise (the recompute must replay the same noise, hence the same routing and
all-to-all splits) and the V3 bias loads / router statistics recorded once."""

from typing import Optional

import pytest
import torch

from deepseek_moe.parallel.expert_parallel import parallelize_moe
from deepseek_moe.testing.distributed import run_distributed
from tests.parallel._ep_common import build_full_model, grads_by_state_key, micro_batch, tiny_config

MOE = dict(router_noise_std=0.5, bias_update_rate=1e-3)


def _model(mode: str, ep_size: Optional[int] = None):
    """The same weights for every mode, in training mode; parallelized when `ep_size` is given."""
    model = build_full_model(tiny_config(**MOE), activation_checkpointing=mode)
    return (model if ep_size is None else parallelize_moe(model, ep_size)).train()


def _step(model, rank: int):
    """One forward/backward on `rank`'s micro-batch from a fixed RNG state."""
    torch.manual_seed(77 + rank)  # the router noise
    ids, labels = micro_batch(0, rank)
    out = model(ids, labels)
    out.loss.backward()
    return {
        "loss": out.loss.detach(),
        "grads": grads_by_state_key(model),
        "loads": [l.gate.pending_load_E.clone() for l in model.moe_layers()],
        "metrics": model.router_metrics(reset=True),
    }


def _compare(plain, full):
    torch.testing.assert_close(full["loss"], plain["loss"], rtol=0, atol=0)
    assert full["grads"].keys() == plain["grads"].keys()
    for name, g in plain["grads"].items():
        torch.testing.assert_close(full["grads"][name], g, rtol=1e-6, atol=1e-6, msg=name)
    for a, b in zip(full["loads"], plain["loads"]):
        assert torch.equal(a, b)  # counted once, not again by the recompute
    assert full["metrics"] == pytest.approx(plain["metrics"])


def _run(rank, world, ep_size):
    return _step(_model("none", ep_size), rank), _step(_model("full", ep_size), rank)


def test_full_recompute_equals_plain_ep1():
    plain, full = _run(0, 1, 1)
    expert_grads = [g for k, g in plain["grads"].items() if ".0.gate_proj" in k]
    assert plain["loads"][0].sum() > 0 and expert_grads and torch.count_nonzero(expert_grads[0])
    _compare(plain, full)


def test_full_recompute_equals_plain_ep2():
    for plain, full in run_distributed(_run, 2, 2):
        _compare(plain, full)


def test_noise_differs_without_rng_replay():
    """The test can fail: without restoring the RNG the recompute draws other noise, routes
    differently and the gradients differ."""
    import deepseek_moe.model.transformer as transformer

    plain = _step(_model("none"), 0)
    original = transformer.checkpoint
    transformer.checkpoint = lambda *a, **kw: original(*a, **{**kw, "preserve_rng_state": False})
    try:
        full = _step(_model("full"), 0)
    finally:
        transformer.checkpoint = original
    assert any(
        not torch.allclose(full["grads"][k], g, rtol=1e-6, atol=1e-6) for k, g in plain["grads"].items()
    )
