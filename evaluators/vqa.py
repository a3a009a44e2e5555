"""VQA for LLaVA-family models: batched greedy answers, scored by ROUGE-L F1 against references.

Data: a JSONL file of {"image": path (relative to the file), "question": ..., "answer": ...}.
`python -m evomerge.evaluators.vqa easy-vqa OUT.jsonl --n 200` writes one from the images and questions
that the `easy-vqa` package ships (no download).

ROUGE-L comes from Google's `rouge-score` package. Its default tokenizer keeps only ASCII letters
and digits, which would erase Japanese, so for ja/zh/th the text is split into characters (spaces
dropped): character-level ROUGE-L, as Japanese VQA benchmarks such as JA-VG-VQA report it.
"""

from __future__ import annotations

import argparse
import json
import unicodedata
from pathlib import Path

import torch

CHAR_LEVEL = {"ja", "zh", "th"}
PROMPT = "USER: <image>\n{question} ASSISTANT:"


class CharTokenizer:
    """rouge-score tokenizer: one token per non-space character (after NFKC normalization)."""

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in unicodedata.normalize("NFKC", text) if not ch.isspace()]


def rouge_l(predictions: list[str], references: list[str], lang: str = "en") -> list[float]:
    from rouge_score import rouge_scorer

    tokenizer = CharTokenizer() if lang in CHAR_LEVEL else None
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def read_items(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"VQA data {path} does not exist")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i + 1}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{i + 1}: expected an object {{image, question, answer}}")
        missing = {"image", "question", "answer"} - set(item)
        if missing:
            raise ValueError(f"{path}:{i + 1}: missing {sorted(missing)}")
        image = Path(str(item["image"]))
        image = image if image.is_absolute() else path.parent / image
        try:  # the header only: a missing or non-image file is one line now, not a crash mid-campaign
            from PIL import Image

            with Image.open(image):
                pass
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}:{i + 1}: image {image} cannot be opened ({type(exc).__name__})") from None
        item["image"] = str(image)
        items.append(item)
    return items


class VQA:
    """{vqa_rougeL: mean ROUGE-L F1} of the model's greedy answers."""

    def __init__(self, processor, path: str, lang: str = "en", split: str | None = None, limit: int | None = None,
                 max_new_tokens: int = 16, batch_size: int = 8, images: str | None = None):
        if not hasattr(processor, "image_processor"):
            raise ValueError("VQA needs a vision-language model folder with a processor (preprocessor_config.json)")
        from evomerge.evaluators import positive

        positive(limit, "limit", optional=True)
        positive(max_new_tokens, "max_new_tokens")
        positive(batch_size, "batch_size")
        self.processor = processor
        self.path, self.lang, self.split = str(path), lang, split or Path(path).name
        self.items = read_items(path)[:limit]
        if not self.items:
            raise ValueError(f"VQA data {path} holds no items")
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def examples_key(self) -> tuple[str, set[int]]:
        return f"vqa:{Path(self.path).resolve()}", set(range(len(self.items)))

    def metric_names(self) -> set[str]:
        return {"vqa_rougeL"}

    def identity(self) -> dict:
        return {"task": "vqa", "split": self.split, "n": len(self.items), "lang": self.lang,
                "generation": {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "do_sample": False},
                "metric": "ROUGE-L F1" + (" (characters)" if self.lang in CHAR_LEVEL else " (rouge-score tokens)")}

    @torch.no_grad()
    def answers(self, model) -> list[str]:
        from PIL import Image

        tok = self.processor.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        device = next(model.parameters()).device
        out = []
        try:
            for start in range(0, len(self.items), self.batch_size):
                batch = self.items[start : start + self.batch_size]
                images = [Image.open(it["image"]).convert("RGB") for it in batch]
                prompts = [PROMPT.format(question=it["question"]) for it in batch]
                enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(device)
                gen = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                out += [t.strip() for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
        finally:
            tok.padding_side = side
        return out

    def score(self, model) -> dict[str, float]:
        preds = self.answers(model)
        self.last_answers = preds
        scores = rouge_l(preds, [it["answer"] for it in self.items], self.lang)
        return {"vqa_rougeL": sum(scores) / max(1, len(scores))}


def write_easy_vqa(out: str | Path, n: int = 200, split: str = "test") -> Path:
    """A VQA JSONL from the easy-vqa package's own images and questions."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions() if split == "test" else easy_vqa.get_train_questions()
    paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"image": paths[i], "question": q, "answer": a})
             for q, a, i in list(zip(questions, answers, image_ids))[:n]]
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evomerge.evaluators.vqa")
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("easy-vqa", help="write a VQA JSONL from the easy-vqa package")
    e.add_argument("out")
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--split", choices=["train", "test"], default="test")
    args = parser.parse_args(argv)
    print(write_easy_vqa(args.out, args.n, args.split))


if __name__ == "__main__":
    main()
