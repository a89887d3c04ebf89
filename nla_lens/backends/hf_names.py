"""HF decoder-layer tensor names shared by every family nla_lens loads, as TL block parameter names.

Qwen, Llama and Gemma-3 name their attention and MLP tensors alike; they differ in their norms
(Gemma-3 has four per layer), which each family's table adds to this one.
"""

ATTENTION_AND_MLP = {
    "self_attn.q_norm.weight": "attn.q_norm.w",
    "self_attn.k_norm.weight": "attn.k_norm.w",
    "self_attn.o_proj.weight": "attn.W_O",
    "mlp.up_proj.weight": "mlp.W_in",
    "mlp.gate_proj.weight": "mlp.W_gate",
    "mlp.down_proj.weight": "mlp.W_out",
}
