"""Perplexity / log-likelihood of a model on a text or JSONL file: a cheap, smooth objective."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"perplexity data {path} does not exist")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i + 1}: not JSON ({exc.msg})") from None
                if not isinstance(item, dict) or field not in item:
                    raise ValueError(f"{path}:{i + 1}: no {field!r} field (set `field:` to the one that holds the text)")
                out.append(str(item[field]))
        return out
    return [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]


class Perplexity:
    """{perplexity: exp(mean token NLL), loglik: mean token log-likelihood} over the file's texts."""

    def __init__(self, tokenizer, path: str, field: str = "text", max_length: int = 512, batch_size: int = 8,
                 limit: int | None = None):
        from evomerge.evaluators import positive

        positive(max_length, "max_length", 2)
        positive(batch_size, "batch_size")
        positive(limit, "limit", optional=True)
        self.path, self.max_length, self.batch_size = str(path), max_length, batch_size
        texts = read_texts(path, field)[:limit]
        self.sequences = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=True).input_ids
            self.sequences += [ids[i : i + max_length] for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1]
        if not self.sequences:
            raise ValueError(f"perplexity data {path} holds no text of two or more tokens")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.n_texts = len(texts)

    def examples_key(self) -> tuple[str, None]:
        return f"text:{Path(self.path).resolve()}", None  # None: every text in the file

    def metric_names(self) -> set[str]:
        return {"perplexity", "loglik"}

    def identity(self) -> dict:
        return {"task": "perplexity", "split": Path(self.path).name, "n": self.n_texts, "chunks": len(self.sequences),
                "max_length": self.max_length}

    @torch.no_grad()
    def score(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        total_nll, total_tokens = 0.0, 0
        for start in range(0, len(self.sequences), self.batch_size):
            batch = self.sequences[start : start + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, valid = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            total_nll += float(nll[valid].sum())
            total_tokens += int(valid.sum())
        mean = total_nll / total_tokens
        return {"perplexity": math.exp(mean), "loglik": -mean}
