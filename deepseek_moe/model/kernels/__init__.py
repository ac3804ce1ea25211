"""Hardware-specific variants of core computations, chosen by config (held to a lower
readability bar than the core; each one states why it exists and what it must equal).

- `expert_loop`: the routed-expert SwiGLU as a per-expert loop tuned for CPU
  (`moe.experts_impl: loop`, and `auto` on CPU). The core path is `grouped_swiglu` in
  deepseek_moe/model/experts.py; both compute the same function.
- `causal_bmm_attention`: causal attention by batched matmuls with a hand-written backward, for
  CPU (`model.attn_impl: bmm`, and `auto` on CPU where it is faster). The core path is SDPA in
  deepseek_moe/model/attention.py; both compute the same function.

Process-wide tuning (the glibc allocator) is opt-in too: deepseek_moe/train/host_memory.py.
"""
