"""Training-time data: prepared-directory metadata (`meta`), memmapped token windows (`packed`),
the deterministic resumable loaders (`loader`), their window order (`order`) and weighted
mixtures of prepared directories (`mixture`). Preparation lives in `data_prep/`, which
depends on this package, never the other way round.

    from data_prep.prepare import ensure_prepared
    from deepseek_moe.data import build_train_loader, build_eval_loader
"""

from deepseek_moe.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from deepseek_moe.data.meta import DataMeta, check_model_vocab, load_meta, padded_vocab_size

__all__ = [
    "DataMeta",
    "EvalLoader",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "check_model_vocab",
    "load_meta",
    "padded_vocab_size",
]
