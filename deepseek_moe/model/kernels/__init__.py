"""Hardware-specific variants of core computations, chosen by config (held to a lower
readability bar than the core; each one states why it exists and what it must equal).

- `expert_loop`: the routed-expert SwiGLU as a per-expert loop tuned for CPU
  (`moe.experts_impl: loop`, and `auto` on CPU). The core path is `grouped_swiglu` in
  deepseek_moe/model/experts.py; both compute the same function.
"""
