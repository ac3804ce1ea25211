"""data_prep.verify catches corruption that keeps file sizes (which the loader cannot see)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_prep.verify import main, verify
from deepseek_moe.data.meta import load_meta


@pytest.fixture
def copy(prepared, tmp_path):
    _, out, _ = prepared
    return shutil.copytree(out, tmp_path / "copy")


def rewrite_meta_for(d, split):
    """Make meta.json consistent with a (deliberately bad) first shard, as a buggy writer would."""
    import hashlib

    meta = load_meta(d)
    shard = meta.splits[split].shards[0]
    shard.sha256 = hashlib.sha256((d / shard.file).read_bytes()).hexdigest()
    meta.fingerprint = meta.compute_fingerprint()
    (d / "meta.json").write_text(meta.to_json())


def test_a_good_directory_passes(copy, capsys):
    assert verify(copy).splits["train"].num_tokens > 0
    main([f"data.out_dir={copy}"])
    assert "OK" in capsys.readouterr().out


def test_flipped_byte_is_caught(copy, capsys):
    path = copy / "train/00001-00000.bin"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    load_meta(copy)  # sizes and meta are fine: only the checksum can tell
    with pytest.raises(ValueError, match=r"train/00001-00000.bin does not match its sha256.*force=true"):
        verify(copy)
    with pytest.raises(SystemExit):
        main([f"data.out_dir={copy}"])
    last = capsys.readouterr().err.split("\n")[-2]  # after tqdm's progress bar
    assert last.startswith("Data error: ") and "does not match its sha256" in last


def test_out_of_vocab_id_and_missing_eos_are_caught(copy):
    val = copy / "val/00000-00000.bin"
    ids = np.fromfile(val, dtype="<u2")
    bad = ids.copy()
    bad[0] = 60000  # >= vocab 512
    bad.tofile(val)
    rewrite_meta_for(copy, "val")
    with pytest.raises(ValueError, match=r"val/00000-00000.bin holds id 60000 >= vocab_size 512"):
        verify(copy)
    bad = ids.copy()
    bad[-1] = 7  # the last document loses its EOS
    bad.tofile(val)
    rewrite_meta_for(copy, "val")
    with pytest.raises(ValueError, match=r"val/00000-00000.bin has \d+ EOS tokens \(last token 7\)"):
        verify(copy)


def test_index_that_misses_a_document_end_is_caught(copy):
    """A shard whose .idx is off by one (sizes and checksums fine): only verify can tell."""
    idx = copy / "train/00000-00000.idx"
    ends = np.fromfile(idx, dtype="<u8")
    ends[0] += 1
    ends.tofile(idx)
    load_meta(copy)
    with pytest.raises(ValueError, match=r"train/00000-00000.idx does not list the document ends"):
        verify(copy)


def test_swapped_tokenizer_is_caught(copy):
    (copy / "tokenizer.model").write_bytes(b"x" + (copy / "tokenizer.model").read_bytes()[1:])
    with pytest.raises(ValueError, match="tokenizer.model does not match tokenizer_sha256"):
        verify(copy)
    assert json.loads((copy / "meta.json").read_text())["vocab_size"] == 512
