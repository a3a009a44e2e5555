"""Batched greedy generation for the scorers that generate (MGSM; the bench compares it with HF's).

Three things make it faster than calling `model.generate` on prompts in the order given:
- prompts are admitted shortest first, so rows that share a batch have similar lengths and little
  padding (outputs come back in the caller's order);
- a row that finishes (end-of-turn/EOS, or a stop string) leaves the batch at once: its KV-cache
  rows are dropped, so the others do not drag it along to the longest answer's length;
- freed slots are refilled (continuous batching): once a quarter of the batch is free, the next
  prompts are prefilled together and their KV cache is spliced beside the running rows' (both
  left-padded to one length), so the batch stays full until the prompts run out. Positions
  nobody attends to any more are trimmed. Splicing needs plain dynamic cache layers; a model with
  sliding-window layers (Mistral, Gemma) gets eviction, and the next batch once a batch is done.

transformers' continuous batching (`generate_batch`, paged attention) and a static cache were
measured on the CPU machine and lost (23.5 s and 2.7-3.2 s against 2.96 s for this loop on 64
MGSM prompts, a 4-layer 256-wide Llama): see `python -m evomerge.bench generate`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    batch_size: int = 16
    stop: list[str] = field(default_factory=list)  # stop strings; end-of-turn/EOS always stops
    do_sample: bool = False

    def __post_init__(self):
        from evomerge.evaluators import positive

        positive(self.max_new_tokens, "max_new_tokens")
        positive(self.batch_size, "batch_size")
        if not (isinstance(self.stop, list) and all(isinstance(x, str) and x for x in self.stop)):
            raise ValueError(f"stop {self.stop!r}: a list of non-empty strings")


class Generation(NamedTuple):
    text: str  # stop string and end-of-turn cut off
    truncated: bool  # ran into max_new_tokens without stopping
    tokens: int  # tokens generated, the stopping token included


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS and end-of-turn ids: the tokenizer's EOS plus the model's generation config (chat models
    often list <|im_end|> or <|eot_id|> there)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return ids


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    # Prompts are rendered in full (chat templates add their own BOS): no special tokens added here.
    return tokenizer(prompts, add_special_tokens=False).input_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[Generation]:
    """Greedy generation, length-sorted, finished rows evicted and their slots refilled: one
    Generation per prompt, in the prompts' order."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    ids = _encode(tokenizer, prompts)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    device = next(model.parameters()).device
    # Tokens enough to hold any stop string: a character is at most 4 UTF-8 bytes, a token at least one
    # (byte-fallback tokenizers spell rare scripts byte by byte).
    span = 4 * max((len(s) for s in settings.stop), default=0) + 2
    # Prefill needs the last position's logits only; without this a long prompt batch materializes
    # (batch x length x vocabulary) logits.
    params = inspect.signature(model.forward).parameters
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24 renamed it
    # Splicing new rows beside running ones needs plain dynamic cache layers; sliding-window layers
    # (Mistral, Gemma) get eviction only, and a new batch once the running one has finished.
    can_splice = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
    # A stop string can only complete at a token whose text holds its last character (or part of a
    # character: byte-fallback pieces decode to U+FFFD); only those tokens pay for decoding the tail.
    finals = {x[-1] for x in settings.stop} | {"\ufffd"}
    pieces: dict[int, bool] = {}

    def might_end(token: int) -> bool:
        if token not in pieces:
            piece = tokenizer.decode([token], skip_special_tokens=True)
            pieces[token] = not piece or any(ch in piece for ch in finals)
        return pieces[token]
    out: list[Generation | None] = [None] * len(prompts)
    queue = sorted(range(len(prompts)), key=lambda i: len(ids[i]))[::-1]  # pop() takes the shortest
    refill_at = max(1, settings.batch_size // 4)  # free slots worth a prefill and a cache copy

    def prefill(rows: list[int]):
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # left padding: every row's next token sits in the last column
            input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i], dtype=torch.long)
            mask[r, width - len(ids[i]):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **{cache_arg: cache},
                       use_cache=True, **last_only).logits[:, -1]
        return cache, mask, positions[:, -1], logits

    live: list[int] = []  # prompt index per batch row
    made: dict[int, list[int]] = {}
    cache = mask = next_pos = logits = None
    while live or queue:
        if queue and (not live or (can_splice and settings.batch_size - len(live) >= refill_at)):
            rows = [queue.pop() for _ in range(min(len(queue), settings.batch_size - len(live)))]
            made.update({i: [] for i in rows})
            new = prefill(rows)
            if not live:
                cache, mask, next_pos, logits = new
            else:
                mask = _join(cache, mask, new[0], new[1])
                next_pos, logits = torch.cat([next_pos, new[2]]), torch.cat([logits, new[3]])
            live += rows
        chosen = logits.argmax(-1).tolist()
        keep = []
        for b, i in enumerate(live):
            made[i].append(chosen[b])
            ended = chosen[b] in stops
            stopped = bool(settings.stop) and might_end(chosen[b]) and any(
                s in tail for tail in (tokenizer.decode(made[i][-span:], skip_special_tokens=True),)
                for s in settings.stop)
            if ended or stopped or len(made[i]) == settings.max_new_tokens:
                out[i] = _finish(tokenizer, made[i], stops, settings.stop, truncated=not (ended or stopped))
            else:
                keep.append(b)
        if len(keep) < len(live):  # evict finished rows from the batch and its cache
            if not keep:
                live = []
                continue
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, next_pos = mask[index], next_pos[index]
            live = [live[b] for b in keep]
            mask = _trim(cache, mask)
        step_ids = torch.tensor([[made[i][-1]] for i in live], dtype=torch.long, device=device)
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        next_pos = next_pos + 1
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=next_pos[:, None],
                       **{cache_arg: cache}, use_cache=True).logits[:, -1]
    return out  # type: ignore[return-value]


def _join(cache, mask: torch.Tensor, new_cache, new_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of `new_cache` to `cache` (both left-padded to the longer length); the joint mask."""
    length = max(mask.shape[1], new_mask.shape[1])

    def left_pad(x: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        short = length - x.shape[-dim_from_end]
        return torch.nn.functional.pad(x, (0, 0) * (dim_from_end - 1) + (short, 0)) if short else x

    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([left_pad(layer.keys, 2), left_pad(new.keys, 2)])
        layer.values = torch.cat([left_pad(layer.values, 2), left_pad(new.values, 2)])
    return torch.cat([left_pad(mask, 1), left_pad(new_mask, 1)])


def _trim(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading cache positions that no remaining row attends to (padding of rows now gone)."""
    from transformers.cache_utils import DynamicLayer

    lead = int((mask.cumsum(-1) == 0).all(0).sum())
    if lead == 0 or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
    return mask[:, lead:]


def _finish(tokenizer, made: list[int], stops: set[int], stop: list[str], truncated: bool) -> Generation:
    body = made[:-1] if made and made[-1] in stops else made
    text = tokenizer.decode(body, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    return Generation(text[: min(cuts)] if cuts else text, truncated, len(made))


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[Generation]:
    """The previous path, kept as the benchmark's baseline: `model.generate` on batches in the order
    given, HF's stop-string criteria, every row generating until the batch's longest has finished."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    out: list[Generation] = []
    try:
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start : start + settings.batch_size]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(
                **enc, max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stops), stop_strings=settings.stop or None, tokenizer=tokenizer,
            )
            for row in gen[:, enc.input_ids.shape[1]:].tolist():
                end = next((k for k, t in enumerate(row) if t in stops), None)
                made = row[: end + 1] if end is not None else row
                text = tokenizer.decode(made, skip_special_tokens=True)
                stopped = end is not None or any(s in text for s in settings.stop)
                while end is None and stopped and made and made[-1] == tokenizer.pad_token_id:  # filler after a stop
                    made = made[:-1]
                truncated = not stopped and len(row) >= settings.max_new_tokens
                out.append(_finish(tokenizer, made, stops, settings.stop, truncated))
    finally:
        tokenizer.padding_side = side
    return out
