"""Tiny model families built locally (no hub): for tests, the benchmark and the demo.

A family is a base model plus "experts" derived from it, all saved as real HF folders with
safetensors weights, a config and a character-level tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# A chat template in the vocabulary's own characters (Zephyr-like turns; an assistant turn ends in EOS),
# so tests and `evomerge tiny --chat` have a chat model without downloading one.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def char_tokenizer(chat: bool = False):
    """A character-level fast tokenizer, built offline (with a chat template when `chat`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", hidden: int = 64, layers: int = 4, vocab: int | None = None,
                intermediate: int | None = None, heads: int = 4, tie: bool = False, positions: int = 256):
    from transformers import GPT2Config, LlamaConfig

    vocab = vocab or len(SPECIALS) + len(CHARS)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=positions,
                          bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=vocab,
                           max_position_embeddings=positions, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose llama or gpt2")


def save_model(model, folder: Path, tokenizer=None, shard_size: str | None = None) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tiny models: a "Writing model shards" bar per save is noise
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def fit_answers(model, tokenizer, pairs: list[tuple[str, str]], steps: int, lr: float, seed: int = 0) -> None:
    """Train `model` (full batch, AdamW) to answer each prompt with its answer and then EOS; the loss
    covers the answer tokens only. Tests and the small built-in families teach behaviour this way."""
    seqs = [(tokenizer(p, add_special_tokens=False).input_ids,
             tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]) for p, a in pairs]
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(seqs):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        labels[i, len(p): len(p) + len(t)] = torch.tensor(t)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_family(
    root: str | Path,
    n_experts: int = 3,
    *,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 4,
    intermediate: int | None = None,
    vocab: int | None = None,
    noise: float = 0.02,
    seed: int = 0,
    shard_size: str | None = None,
    tie: bool = False,
    chat: bool = False,
) -> dict[str, Path]:
    """A random base and `n_experts` perturbed copies ("fine-tunes"), saved under `root`.

    Each expert moves a different random subset of its weights, as a fine-tune would, so task
    vectors overlap partly and disagree in sign: the situation TIES and DARE are built for.
    """
    from transformers import AutoModelForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    config = tiny_config(arch, hidden, layers, vocab, intermediate, tie=tie)
    base = AutoModelForCausalLM.from_config(config)
    tokenizer = char_tokenizer(chat) if vocab is None else None
    paths = {"base": save_model(base, root / "base", tokenizer, shard_size)}
    state = base.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for e in range(n_experts):
        expert = AutoModelForCausalLM.from_config(config)
        new_state = {}
        for name, t in state.items():
            keep = torch.rand(t.shape, generator=gen) < 0.5
            delta = torch.randn(t.shape, generator=gen) * noise * keep
            new_state[name] = t + delta
        expert.load_state_dict(new_state)
        paths[f"expert{e}"] = save_model(expert, root / f"expert{e}", tokenizer, shard_size)
    return paths


def build_family_safely(root: str | Path, n_experts: int = 3, **kwargs) -> dict[str, Path]:
    """`evomerge tiny`: check the arguments, never touch an existing folder, and move the members
    into place only once all of them are written."""
    import os
    import shutil
    import tempfile

    from evomerge.checkpoint import check_output_folder
    from evomerge.errors import EvomergeError

    hidden, layers = kwargs.get("hidden", 64), kwargs.get("layers", 4)
    if not 1 <= n_experts <= 64:
        raise EvomergeError(f"--experts {n_experts}: give 1 to 64 experts")
    if not 1 <= layers <= 256:
        raise EvomergeError(f"--layers {layers}: give 1 to 256 layers")
    if hidden < 8 or hidden % 8 or hidden > 8192:
        raise EvomergeError(f"--hidden {hidden}: give a multiple of 8 between 8 and 8192 (4 heads of an even size)")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise EvomergeError(f"{root} is a file; pass a folder for the family")
    members = ["base", *(f"expert{i}" for i in range(n_experts))]
    for m in members:
        if (root / m).exists():
            raise EvomergeError(f"{root / m} already exists; evomerge tiny never writes over a folder: "
                                "pick a new one")
        check_output_folder(root / m)  # refuses an unwritable place
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny.tmp-", dir=root))
    try:
        build_family(tmp, n_experts, **kwargs)
        for m in members:
            os.rename(tmp / m, root / m)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {m: root / m for m in members}


def build_tiny_llava(root: str | Path, seed: int = 0, with_llm: bool = True) -> dict[str, Path]:
    """A randomly initialised tiny LLaVA (CLIP vision tower + Llama LM) with a working processor, and
    optionally a standalone tiny Llama of the same text shape (a "language expert" to merge into it)."""
    from transformers import (AutoModelForCausalLM, CLIPImageProcessor, CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    root = Path(root)
    torch.manual_seed(seed)
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tok.convert_tokens_to_ids("<image>")
    text = tiny_config("llama", hidden=64, layers=2, vocab=len(tok), positions=512)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,
    )
    paths = {"vlm": save_model(model, root / "vlm")}
    processor.save_pretrained(paths["vlm"])
    if with_llm:
        llm = AutoModelForCausalLM.from_config(text)
        paths["llm"] = save_model(llm, root / "llm", tok)
    return paths
