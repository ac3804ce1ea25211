"""End-to-end runs of train.py in subprocesses: 1 process and 2 processes (deepspeed launcher and
torchrun), loss falls, metrics.jsonl fields, resume equality, wandb offline, SIGTERM."""

import json
import signal
import subprocess
import time

import pytest

from deepseek_moe.train.metrics import read_metrics
from tests.train.helpers import REPO, TINY, command, run_train, train_env, wandb_offline_records

TRAIN_FIELDS = ("step", "loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu")
MOE_FIELDS = ("load_imbalance", "router_entropy", "dropped_frac", "ranks_per_token")


def _train_rows(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _check_metrics(run_dir, steps):
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for row in train:
        for key in TRAIN_FIELDS:
            assert key in row, key
        for key in MOE_FIELDS:
            assert f"moe/layer1/{key}" in row, key  # layer 0 is dense, layer 1 is MoE
        assert row["loss"] == pytest.approx(row["lm_loss"] + row["aux_loss"], rel=1e-6)
        assert row["mfu"] is None  # CPU: the peak is unknown, say so
        assert row["aux/expert_balance"] == pytest.approx(row["aux_loss"], rel=1e-6)
    assert any("val_loss" in r for r in rows)
    # The loss falls: the last steps are well below the first.
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.3
    return train


def _assert_same_losses(a, b, start):
    for ra, rb in zip(a[start:], b[start:], strict=True):
        assert ra["step"] == rb["step"]
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6, rel=0), (ra["step"], key)


def test_one_process_run_resume_and_wandb(tiny_data, tmp_path):
    base = (
        TINY
        + tiny_data
        + ["trainer.max_steps=8", "trainer.eval_every=4", "checkpoint.every=2", "checkpoint.keep=2"]
    )
    straight = tmp_path / "straight"
    proc = run_train(base + [f"run_dir={straight}", "logger=wandb"])
    assert f"run dir:    {straight}" in proc.stdout and "metrics:" in proc.stdout
    rows = _check_metrics(straight, 8)
    # keep=2 of the saves at steps 2, 4, 6, 8
    assert sorted(p.name for p in (straight / "checkpoints").glob("step_*")) == [
        "step_00000006",
        "step_00000008",
    ]
    assert all((p / "COMPLETE").exists() for p in (straight / "checkpoints").glob("step_*"))
    assert (straight / "config.yaml").exists()

    # wandb offline: a run under run_dir/wandb with the config and the per-step history.
    (wandb_file,) = (straight / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_offline_records(wandb_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["trainer"]["max_steps"] == 8 and config["model"]["vocab_size"] == 512
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            logged[items["_step"]] = items
    assert logged[8]["lm_loss"] == pytest.approx(rows[-1]["lm_loss"])
    assert "val_loss" in logged[8] and "moe/layer1/load_imbalance" in logged[3]
    # the layer x expert heatmap of each logging step's expert loads
    assert logged[3]["moe/expert_loads/_type"] == "image-file"
    assert (
        len(list((straight / "wandb").glob("offline-run-*/files/media/images/moe/expert_loads_*.png"))) == 8
    )

    # Resume: the same command twice, 4 steps per launch, equals the straight run.
    resumed = tmp_path / "resumed"
    cmd = base + [f"run_dir={resumed}", "logger=wandb", "trainer.max_steps_per_launch=4"]
    run_train(cmd)
    assert len(_train_rows(resumed)) == 4
    proc = run_train(cmd)
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same_losses(rows, _train_rows(resumed), start=0)
    # one wandb run id across both launches (stored in the checkpoint)
    ids = {p.name.rsplit("-", 1)[1] for p in (resumed / "wandb").glob("offline-run-*")}
    assert len(ids) == 1 and len(list((resumed / "wandb").glob("offline-run-*"))) == 2


@pytest.mark.parametrize("launcher", ["deepspeed"])
def test_two_processes_ep2_resume(tiny_data, tmp_path, launcher):
    """deepspeed --num_gpus 2 train.py parallel.ep_size=2: trains, resumes exactly, and equals EP=1."""
    base = (
        TINY
        + tiny_data
        + [
            "parallel.ep_size=2",
            "trainer.max_steps=6",
            "trainer.eval_every=3",
            "checkpoint.every=3",
            "logger=none",
        ]
    )
    straight = tmp_path / "straight"
    run_train(base + [f"run_dir={straight}"], nproc=2, launcher=launcher)
    rows = _check_metrics(straight, 6)
    assert all(r["moe/layer1/a2a_bytes"] > 0 for r in rows)  # tokens really moved between ranks
    ckpt = straight / "checkpoints" / "step_00000006"
    assert (ckpt / "trainer_state" / "rank00001.pt").exists()
    assert len(list(ckpt.glob("layer_0_expert_*_mp_rank_00_model_states.pt"))) == 4

    resumed = tmp_path / "resumed"
    cmd = base + [f"run_dir={resumed}", "trainer.max_steps_per_launch=3"]
    run_train(cmd, nproc=2, launcher="torchrun")
    run_train(cmd, nproc=2, launcher="torchrun")
    _assert_same_losses(rows, _train_rows(resumed), start=0)

    # The same run with experts replicated (EP=1 x DP=2) is the same computation: the loader's
    # global batches do not depend on the layout and EP only moves tokens. Losses and the
    # (clipped) gradient norms must agree to float rounding.
    ep1 = tmp_path / "ep1"
    run_train(
        [o.replace("parallel.ep_size=2", "parallel.ep_size=1") for o in base] + [f"run_dir={ep1}"],
        nproc=2,
        launcher="torchrun",
    )
    for ra, rb in zip(rows, _train_rows(ep1), strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra["step"], key)


def test_bf16_two_processes_ep2_trains_and_resumes(tiny_data, tmp_path):
    """trainer.precision=bf16 on CPU: DeepSpeed's bf16 ZeRO path (bf16 weights, fp32 master
    weights) at EP=2 with padded expert matmuls, and activation checkpointing (blocks and their
    all-to-alls recomputed in backward): the loss falls and a resumed run repeats the straight
    one exactly (the fp32 master weights and the optimizer state are restored)."""
    base = (
        TINY
        + tiny_data
        + [
            "parallel.ep_size=2",
            "trainer.precision=bf16",
            "trainer.max_steps=6",
            "trainer.eval_every=3",
            "checkpoint.every=3",
            "logger=none",
            "trainer.activation_checkpointing=full",
        ]
    )
    straight = tmp_path / "straight"
    proc = run_train(base + [f"run_dir={straight}"], nproc=2, launcher="torchrun")
    assert "zero 1, bf16)" in proc.stdout
    rows = _check_metrics(straight, 6)
    resumed = tmp_path / "resumed"
    cmd = base + [f"run_dir={resumed}", "trainer.max_steps_per_launch=3"]
    run_train(cmd, nproc=2, launcher="torchrun")
    run_train(cmd, nproc=2, launcher="torchrun")
    _assert_same_losses(rows, _train_rows(resumed), start=0)


def test_ep1_two_process_resume(tiny_data, tmp_path):
    """EP=1 with 2 data-parallel ranks: resume equality (experts replicated, ZeRO-1 sharded),
    with the V3 selection bias on (its loads are all-reduced; the bias buffer is checkpointed)."""
    # A data directory nobody prepared yet: rank 0 prepares it while rank 1 waits at a barrier.
    data = [
        o if not o.startswith("data.out_dir=") else f"data.out_dir={tmp_path / 'fresh_data'}"
        for o in tiny_data
    ]
    base = (
        TINY
        + data
        + [
            "trainer.max_steps=4",
            "trainer.eval_every=0",
            "checkpoint.every=0",
            "logger=none",
            "model.moe.bias_update_rate=0.01",
        ]
    )
    straight = tmp_path / "straight"
    proc = run_train(base + [f"run_dir={straight}"], nproc=2, launcher="torchrun")
    assert (tmp_path / "fresh_data" / "meta.json").exists()
    assert (proc.stdout + proc.stderr).count("training sentencepiece") == 1  # one rank prepared
    resumed = tmp_path / "resumed"
    cmd = base + [f"run_dir={resumed}", "trainer.max_steps_per_launch=2"]
    run_train(cmd, nproc=2, launcher="torchrun")
    run_train(cmd, nproc=2, launcher="torchrun")
    _assert_same_losses(_train_rows(straight), _train_rows(resumed), start=0)


def test_sigterm_saves_and_relaunch_continues(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = (
        TINY
        + tiny_data
        + [
            "trainer.max_steps=100000",
            "trainer.eval_every=0",
            "checkpoint.every=0",
            "logger=none",
            f"run_dir={run_dir}",
        ]
    )
    proc = subprocess.Popen(
        command(1, "python") + args,
        cwd=REPO,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert "stop requested by signal" in out
    last = _train_rows(run_dir)[-1]["step"]
    assert 3 <= last < 100000
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == [f"step_{last:08d}"] and (ckpts[0] / "COMPLETE").exists()

    # A later save that died mid-write (no COMPLETE marker, DeepSpeed's `latest` already points
    # at it) must be ignored: the relaunch continues from the complete one.
    partial = run_dir / "checkpoints" / f"step_{last + 5:08d}"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (run_dir / "checkpoints" / "latest").write_text(partial.name)

    proc = run_train(args + ["trainer.max_steps_per_launch=2"])
    assert f"resumed from {ckpts[0]} (step {last})" in proc.stdout + proc.stderr
    assert [r["step"] for r in _train_rows(run_dir)] == list(range(1, last + 3))
    assert not partial.exists()  # stale partial saves are cleaned up after the next good save
