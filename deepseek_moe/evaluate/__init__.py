"""Standalone evaluation: validation loss, perplexity and routing statistics of a training
checkpoint or a Hugging Face model directory (`python -m deepseek_moe.evaluate`, see
`__main__` for the command line).

    from deepseek_moe.evaluate import evaluate
    r = evaluate("runs/tiny")                              # the trainer's own validation sample
    r = evaluate("hf/tiny", ["data.out_dir=data/python_stdlib"], sequences=256)
    r = evaluate("runs/tiny", all_windows=True, disable_top_experts=2, routing_stats=True)
    r["val_loss"], r["perplexity"], r["tokens"], r["routing"][0]["load_imbalance"]

Modules: `source` (what is evaluated and under which config, its weights), `sample` (which
windows, and each rank's micro-batches), `routing` (per-layer routing statistics of the
evaluated tokens), `run` (`evaluate`: model at any EP size, token-weighted loss over ranks).
"""

from deepseek_moe.evaluate.run import PRECISIONS, evaluate

__all__ = ["PRECISIONS", "evaluate"]
