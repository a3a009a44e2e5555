"""VQA for LLaVA-family models: batched greedy answers, scored by ROUGE-L F1 against references.

Data: a JSONL file of {"image": path (relative to the file), "question": ..., "answer": ...}, or
`easy_vqa: {split, start, n}`: items straight from the easy-vqa package (images ship with it).
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


EASY_VQA_KEYS = {"split", "start", "n"}


def read_easy_vqa(spec) -> tuple[list[dict], str]:
    """Items straight from the easy-vqa package's images and questions: {split: train|test, start, n}."""
    from evomerge.evaluators import positive

    if not isinstance(spec, dict) or set(spec) - EASY_VQA_KEYS:
        raise ValueError(f"easy_vqa {spec!r}: write {{split: test, start: 0, n: 50}}")
    split, start, n = spec.get("split", "test"), spec.get("start", 0), spec.get("n", 50)
    if split not in ("train", "test"):
        raise ValueError(f"easy_vqa split {split!r}: train or test")
    positive(start, "easy_vqa start", 0)
    positive(n, "easy_vqa n")
    try:
        import easy_vqa
    except ImportError:
        raise ValueError("easy_vqa data needs the easy-vqa package: pip install easy-vqa") from None
    questions, answers, image_ids = easy_vqa.get_test_questions() if split == "test" else easy_vqa.get_train_questions()
    paths = easy_vqa.get_test_image_paths() if split == "test" else easy_vqa.get_train_image_paths()
    if start + n > len(questions):
        raise ValueError(f"easy_vqa {split} has {len(questions)} questions; start {start} + n {n} runs past them")
    items = [{"image": paths[image_ids[i]], "question": questions[i], "answer": answers[i]}
             for i in range(start, start + n)]
    return items, f"easy-vqa:{split}"


class VQA:
    """{vqa_rougeL: mean ROUGE-L F1} of the model's greedy answers."""

    def __init__(self, processor, path: str | None = None, lang: str = "en", split: str | None = None,
                 limit: int | None = None, max_new_tokens: int = 16, batch_size: int = 8, images: str | None = None,
                 easy_vqa: dict | None = None):
        if not hasattr(processor, "image_processor"):
            raise ValueError("VQA needs a vision-language model folder with a processor (preprocessor_config.json)")
        from evomerge.evaluators import positive

        positive(limit, "limit", optional=True)
        positive(max_new_tokens, "max_new_tokens")
        positive(batch_size, "batch_size")
        if (path is None) == (easy_vqa is None):
            raise ValueError("VQA data: give path (a JSONL of {image, question, answer}) or easy_vqa: {split, start, n}")
        self.processor = processor
        self.lang = lang
        if easy_vqa is not None:
            items, self.data = read_easy_vqa(easy_vqa)
            self.offset = easy_vqa.get("start", 0)
            self.split = split or f"{self.data} {self.offset}-{self.offset + len(items) - 1}"
        else:
            items, self.data, self.offset = read_items(path), f"vqa:{Path(path).resolve()}", 0
            self.split = split or Path(path).name
        self.items = items[:limit]
        if not self.items:
            raise ValueError(f"VQA data {path} holds no items")
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def examples_key(self) -> tuple[str, set[int]]:
        return self.data, set(range(self.offset, self.offset + len(self.items)))

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
        out: list[str] = [""] * len(self.items)
        # Similar lengths share a batch (less padding); answers go back in the items' order.
        order = sorted(range(len(self.items)), key=lambda i: len(self.items[i]["question"]))
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = [self.items[i] for i in rows]
                images = [Image.open(it["image"]).convert("RGB") for it in batch]
                prompts = [PROMPT.format(question=it["question"]) for it in batch]
                enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True).to(device)
                gen = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                for i, text in zip(rows, texts):
                    out[i] = text.strip()
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
