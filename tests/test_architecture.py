from evomerge.architecture import classify, count_blocks
from evomerge.checkpoint import Checkpoint


def test_llama_names(llama_family):
    names = Checkpoint(llama_family["base"]).names()
    roles = {n: classify(n, "llama") for n in names}
    assert count_blocks(names, "llama") == 4
    assert roles["model.embed_tokens.weight"].group == "embeddings"
    assert (roles["model.layers.2.self_attn.k_proj.weight"].group, roles["model.layers.2.self_attn.k_proj.weight"].family) == ("block.2", "attention")
    assert roles["model.layers.0.mlp.gate_proj.weight"].family == "mlp"
    assert roles["model.layers.3.post_attention_layernorm.weight"].family == "norm"
    assert roles["model.norm.weight"].group == "final_norm"
    assert roles["lm_head.weight"].group == "lm_head"
    assert all(r.group != "other" for r in roles.values())


def test_gpt2_names(gpt2_family):
    names = Checkpoint(gpt2_family["base"]).names()
    roles = {n: classify(n, "gpt2") for n in names}
    assert count_blocks(names, "gpt2") == 3
    assert roles["transformer.wpe.weight"].group == "embeddings"
    assert roles["transformer.h.1.attn.c_attn.bias"].family == "attention"
    assert roles["transformer.h.2.mlp.c_proj.weight"].family == "mlp"
    assert roles["transformer.h.0.ln_2.weight"].family == "norm"
    assert roles["transformer.ln_f.bias"].group == "final_norm"
    assert all(r.group != "other" for r in roles.values())


def test_unknown_architecture_falls_back_to_generic_rows():
    role = classify("backbone.blocks.7.ffn.w1.weight", "some_new_arch")
    assert (role.group, role.family) == ("block.7", "mlp")
    assert classify("mystery.tensor", "some_new_arch").group == "other"
