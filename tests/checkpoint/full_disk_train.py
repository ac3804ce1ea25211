"""Run train.py on a disk that fills up while a given checkpoint is written (test helper).

    FULL_DISK_AT=step_00000008 python tests/checkpoint/full_disk_train.py <train.py overrides>

Every torch.save into a path containing FULL_DISK_AT (DeepSpeed's files and ours) writes a
partial file and raises ENOSPC, as a full filesystem does; with FULL_DISK_RANK=r only on rank r.
"""

import errno
import os
import runpy
import sys

import torch

FULL_AT = os.environ["FULL_DISK_AT"]
_save = torch.save


def _full_disk_save(obj, f, *args, **kwargs):
    if FULL_AT in str(f) and os.environ.get("RANK", "0") == os.environ.get(
        "FULL_DISK_RANK", os.environ.get("RANK", "0")
    ):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04" + b"\0" * 4096)  # the start of a zip, then no space
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    return _save(obj, f, *args, **kwargs)


torch.save = _full_disk_save
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.argv = [os.path.join(root, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
