"""Training-time data: prepared-directory metadata (`meta`), memmapped token windows (`packed`)
and the deterministic resumable loaders (`loader`). Preparation lives in `data_prep/`.

    from deepseek_moe.data import ensure_prepared, build_train_loader, build_eval_loader
"""

from deepseek_moe.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from deepseek_moe.data.meta import DataMeta, check_model_vocab, load_meta, padded_vocab_size


def ensure_prepared(data_cfg) -> DataMeta:
    """Prepare `data_cfg` unless its out_dir is complete; return its meta (see data_prep)."""
    from data_prep.prepare import ensure_prepared as _ensure  # datasets/sentencepiece: lazy

    return _ensure(data_cfg)


__all__ = ["DataMeta", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader",
           "check_model_vocab", "ensure_prepared", "load_meta", "padded_vocab_size"]
