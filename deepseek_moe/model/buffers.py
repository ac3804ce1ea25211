"""Keep selected buffers in their own dtype when the module is cast (`.bfloat16()`, `.to(dtype)`).

DeepSpeed bf16 casts the whole module. That would round the V3 selection bias (updated in
steps of ~1e-3), make load counts inexact past 256 and lose RoPE table precision. Modules list
such buffers in `_keep_dtype_buffers`; device moves and `to_empty` still apply to them.
"""

from __future__ import annotations

import torch
from torch import nn


class KeepBufferDtype(nn.Module):
    _keep_dtype_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        old = {
            name: self._buffers[name]
            for name in self._keep_dtype_buffers
            if self._buffers.get(name) is not None
        }
        super()._apply(fn, recurse)
        for name, before in old.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                if before.is_meta or after.is_meta:  # to_empty / meta: no values to keep
                    self._buffers[name] = torch.empty_like(after, dtype=before.dtype)
                else:
                    self._buffers[name] = before.to(device=after.device)
        return self
