"""DeepSeekMoE model: norm, rope, attention, ffn, router, losses, experts, dispatch, moe,
router_stats, transformer (one concept per module). Entry point:
`deepseek_moe.model.transformer.DeepSeekMoEForCausalLM`."""

from deepseek_moe.model.dispatch import Dispatcher, LocalDispatcher
from deepseek_moe.model.moe import MoELayer
from deepseek_moe.model.transformer import CausalLMOutput, DeepSeekMoEForCausalLM

__all__ = ["CausalLMOutput", "DeepSeekMoEForCausalLM", "Dispatcher", "LocalDispatcher", "MoELayer"]
