"""Bad configuration fails at start with a message naming the key and the fix."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from deepseek_moe.config.train import RunConfig
from deepseek_moe.errors import ConfigError
from deepseek_moe.train.cli import apply_cli_intent, to_run_config, unknown_keys
from tests.train.helpers import compose_config, run_train
from tests.train.test_user_errors import check_one_line

_compose = compose_config


def test_default_config_composes_to_run_config():
    cfg = OmegaConf.to_object(_compose([]))
    assert isinstance(cfg, RunConfig)
    assert cfg.run_dir == "runs/default"  # deterministic: relaunching resumes
    assert cfg.data.name == "python_stdlib" and cfg.logger.kind == "wandb"
    assert cfg.model.moe is not None
    for key in ("max_steps", "seed", "global_batch_size", "micro_batch_size", "eval_every"):
        assert hasattr(cfg.trainer, key)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep) == (100, 2)
    assert (cfg.parallel.ep_size, cfg.parallel.zero_stage) == (1, 1)
    assert cfg.trainer.reuse_host_memory is False  # process-wide allocator tuning is opt-in


def test_appended_misspelt_key_fails():
    """`+key=value` gets past Hydra's struct mode; our schema walk still catches it."""
    cfg = _compose(["+trainer.max_stesp=3", "+model.moe.topk=2", "+extra=1"])
    assert sorted(unknown_keys(cfg, RunConfig)) == ["extra", "model.moe.topk", "trainer.max_stesp"]
    assert unknown_keys(_compose(["model.moe=null"]), RunConfig) == []


@pytest.mark.parametrize("override", ["trainer.max_stesp=3", "optim.lr_max=1", "model.moe.topk=1"])
def test_misspelt_key_fails(override):
    with pytest.raises(ConfigCompositionException) as err:
        _compose([override])
    assert "not in" in str(err.value.__cause__ or err.value) or "Could not" in str(err.value)


def test_wrong_type_fails():
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps"):
        _compose(["trainer.max_steps=abc"])


def test_logger_none_and_group_choice():
    cfg = OmegaConf.to_object(_compose(["logger=none", "optim=deepseek_step", "trainer.max_steps=3000"]))
    assert cfg.logger.kind == "none"
    assert cfg.optim.schedule == "step" and cfg.optim.step_decay_at == [0.8, 0.9]


def test_explicit_vocab_size_turns_off_tokenizer_vocab():
    cfg = _compose(["model.vocab_size=1000"])
    apply_cli_intent(cfg, ["model.vocab_size=1000"])
    assert cfg.vocab_from_tokenizer is False
    cfg = _compose([])
    apply_cli_intent(cfg, ["trainer.seed=3"])
    assert cfg.vocab_from_tokenizer is True


def test_short_run_clips_the_warmup_it_did_not_ask_for(capsys):
    """`python train.py trainer.max_steps=6`: the default warmup (20) is longer than the run, so
    it warms up over 5 steps (all but the last), with one warning, instead of refusing."""
    overrides = ["trainer.max_steps=6"]
    cfg = _compose(overrides)
    assert cfg.optim.warmup_steps == 20  # the default this test is about
    apply_cli_intent(cfg, overrides)
    run = to_run_config(cfg)
    assert run.optim.warmup_steps == 5 and run.decay_steps == 6
    err = capsys.readouterr().err
    assert err.count("Warning: optim.warmup_steps=20 does not fit a schedule of 6 steps") == 1
    # the same through optim.decay_steps, and a warmup that fits is left alone
    overrides = ["optim.decay_steps=3"]
    cfg = _compose(overrides)
    apply_cli_intent(cfg, overrides)
    assert to_run_config(cfg).optim.warmup_steps == 2
    cfg = _compose(["trainer.max_steps=21"])
    apply_cli_intent(cfg, ["trainer.max_steps=21"])
    assert to_run_config(cfg).optim.warmup_steps == 20
    # a warmup given on the command line is meant: a one-line config error, as before
    overrides = ["trainer.max_steps=6", "optim.warmup_steps=20"]
    cfg = _compose(overrides)
    apply_cli_intent(cfg, overrides)
    with pytest.raises(ConfigError, match="optim.warmup_steps=20 must be smaller"):
        to_run_config(cfg)


def test_ep_size_must_divide_world_size():
    cfg = OmegaConf.to_object(
        _compose(["parallel.ep_size=2", "trainer.micro_batch_size=1", "trainer.global_batch_size=12"])
    )
    cfg.check_world(2)
    cfg.check_world(4)
    with pytest.raises(ConfigError, match="parallel.ep_size=2 must divide the world size 3"):
        cfg.check_world(3)


def test_ep_size_must_divide_experts():
    cfg = OmegaConf.to_object(_compose(["parallel.ep_size=3", "trainer.global_batch_size=24"]))
    with pytest.raises(ConfigError, match="n_routed_experts=16 is not divisible by parallel.ep_size=3"):
        cfg.check_world(3)


def test_zero0_with_ep_and_clipping_is_refused():
    """ZeRO-0 clips by an average of per-rank norms that each see only local experts."""
    overrides = ["parallel.ep_size=2", "trainer.micro_batch_size=1", "trainer.global_batch_size=4"]
    OmegaConf.to_object(_compose(overrides + ["parallel.zero_stage=1"])).check_world(2)
    OmegaConf.to_object(_compose(overrides + ["parallel.zero_stage=0", "optim.grad_clip=0"])).check_world(2)
    cfg = OmegaConf.to_object(_compose(overrides + ["parallel.zero_stage=0"]))
    with pytest.raises(ConfigError, match="use parallel.zero_stage=1 or 2"):
        cfg.check_world(2)


def test_batch_sizes_must_divide():
    cfg = OmegaConf.to_object(_compose(["trainer.global_batch_size=24", "trainer.micro_batch_size=8"]))
    assert cfg.grad_accum_steps(1) == 3 and cfg.grad_accum_steps(3) == 1
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=24 is not divisible by "
        r"trainer.micro_batch_size=8 x world_size=2 = 16",
    ):
        cfg.grad_accum_steps(2)


def test_train_py_reports_config_errors_cleanly():
    """The entry point itself: exit code 1 and a one-line reason, before any model is built."""
    proc = run_train(["trainer.max_stesp=3"], check=False, timeout=60)
    check_one_line(proc, "Config error: ", "Key 'max_stesp' not in 'TrainerConfig'", "--cfg job")
    proc = run_train(["+trainer.max_stesp=3"], check=False, timeout=60)
    assert proc.returncode == 1 and "unknown key(s) ['trainer.max_stesp']" in proc.stderr
    proc = run_train(["optim.warmup_steps=500"], check=False, timeout=60)
    assert proc.returncode == 1
    assert "Config error: optim.warmup_steps=500 must be smaller" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_py_refuses_fp16_on_cpu_before_writing_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["trainer.precision=fp16", f"run_dir={run_dir}"], check=False, timeout=120)
    assert proc.returncode == 1
    assert "Config error: trainer.precision=fp16 needs a GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_bad_attn_impl_is_a_config_error():
    with pytest.raises(Exception, match="attn_impl=.flash. must be one of"):  # OmegaConf wraps it
        OmegaConf.to_object(_compose(["model.attn_impl=flash"]))


def test_train_py_reports_missing_data_cleanly(tmp_path):
    """A data source that does not exist: one line naming data.path, no traceback, no output dir."""
    out = tmp_path / "prepared"
    proc = run_train(
        [
            "data=local_text",
            f"data.path={tmp_path / 'missing'}",
            f"data.out_dir={out}",
            "logger=none",
            f"run_dir={tmp_path / 'run'}",
        ],
        check=False,
        timeout=120,
    )
    check_one_line(proc, "Data error: data.path=", "matches no files", "check data.path")
    assert list(tmp_path.iterdir()) == []  # no prepared dir, no temp dir, no run dir


def test_device_balance_loss_needs_groups_equal_to_ep_ranks():
    """The 145B preset balances 4 groups; at EP=8 those are not the devices: refused, naming
    the keys and the fix (check_world runs before the run directory is created)."""
    overrides = ["model=deepseek_moe_145b", "trainer.micro_batch_size=1", "trainer.global_batch_size=8"]
    cfg = OmegaConf.to_object(_compose(overrides + ["parallel.ep_size=8"]))
    with pytest.raises(
        ConfigError,
        match=r"model.moe.device_aux_alpha balance load over "
        r"model.moe.n_groups=4 .* Set model.moe.n_groups=8",
    ):
        cfg.check_world(8)
    OmegaConf.to_object(
        _compose(overrides + ["parallel.ep_size=8", "model.moe.n_groups=8", "model.moe.topk_groups=8"])
    ).check_world(8)
    OmegaConf.to_object(_compose(overrides + ["parallel.ep_size=1"])).check_world(8)  # no EP: fine


def test_train_py_refuses_bf16_zero0_before_writing_anything(tmp_path):
    """DeepSpeed has no fp32 gradient accumulation at ZeRO-0."""
    run_dir = tmp_path / "run"
    proc = run_train(
        ["trainer.precision=bf16", "parallel.zero_stage=0", f"run_dir={run_dir}"], check=False, timeout=120
    )
    assert proc.returncode == 1
    assert "Config error: trainer.precision=bf16 with parallel.zero_stage=0" in proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_train_py_docstring_launch_examples_pass_the_config_checks():
    """Every `deepspeed --num_gpus N` / `torchrun --nproc_per_node N` example in train.py's
    docstring composes and passes the checks that need the world size."""
    import re

    from tests.train.helpers import REPO

    doc = (REPO / "train.py").read_text().split('"""')[1]
    doc = doc.replace("\\\n", " ")  # continued lines
    examples = re.findall(r"(?:--num_gpus|--nproc_per_node) (\d+) train\.py([^#\n]*)", doc)
    assert len(examples) >= 3
    for world, args in examples:
        cfg = OmegaConf.to_object(_compose(args.split()))
        cfg.check_world(int(world))
