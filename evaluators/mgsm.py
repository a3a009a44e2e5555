"""MGSM: grade-school math in 11 languages, scored by batched greedy generation.

The data (250 problems x 11 languages, CC BY 4.0, Shi et al. 2022) ships in
`evaluators/data/mgsm/` with its license. Row i is the same problem in every language, so a row
range is a split across languages: by default "search" = rows 0-99, "holdout" = rows 100-249.

Few-shot exemplars (`shots: k`) never come from rows a campaign holds out: by default they are
the last k rows of the evaluated range itself, left out of scoring (so no problem is its own
exemplar and nothing outside the split enters a prompt); `shot_rows: a-b` picks them explicitly,
and a campaign refuses exemplar rows that overlap its held-out rows. The identity records them.

A generation is correct when the last number in it equals the reference answer and the model
stopped on its own (EOS or a stop string) before `max_new_tokens`; a truncated generation never
counts, so a merge cannot "win" by rambling until a lucky number appears. With
`language_check`, the generation must also be mostly in the target language, judged offline by
Unicode script share: among its letters, the fraction in the language's scripts (Japanese:
hiragana, katakana, kanji) must reach `language_threshold` (EvoLLM-JP required Japanese reasoning).

Prompts go through the model's chat template when its tokenizer has one (`chat_template: auto`;
see `evaluators/prompts.py`), and then an answer ends at end-of-turn/EOS rather than at a blank
line. Besides accuracy, a score reports the truncation rate and the mean generated tokens
(`mgsm_<lang>_tokens`), so a search can trade accuracy against answer length.

Problems come from the shipped MGSM rows, a JSONL file (`jsonl:`) or a Hugging Face data set
(`hf: {path, name, split, question_field, answer_field}`, read through the `datasets` cache, so
offline it must be cached or a local folder; GSM8K-style answers ending in "#### 72" parse).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import asdict
from pathlib import Path

import torch

from evomerge.evaluators.generation import GenerationSettings, generate
from evomerge.evaluators.prompts import PromptFormat, resolve_format

DATA = Path(__file__).parent / "data" / "mgsm"
LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
SPLITS = {"search": (0, 100), "holdout": (100, 250), "all": (0, 250)}

# (question prefix, answer prefix) per language, after the MGSM paper's native prompts.
TEMPLATES = {
    "en": ("Question:", "Step-by-Step Answer:"),
    "ja": ("問題：", "ステップごとの答え："),
    "zh": ("问题：", "逐步解答："),
    "de": ("Frage:", "Schritt-für-Schritt-Antwort:"),
    "fr": ("Question :", "Réponse étape par étape :"),
    "es": ("Pregunta:", "Respuesta paso a paso:"),
    "ru": ("Задача:", "Пошаговое решение:"),
    "sw": ("Swali:", "Jibu la Hatua kwa Hatua:"),
    "bn": ("প্রশ্ন:", "ধাপে ধাপে উত্তর:"),
    "te": ("ప్రశ్న:", "దశలవారీగా సమాధానం:"),
    "th": ("โจทย์:", "คำตอบทีละขั้นตอน:"),
}

# Unicode ranges of each language's own script(s), for the offline language check.
SCRIPTS = {
    "ja": [(0x3040, 0x309F), (0x30A0, 0x30FF), (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xFF66, 0xFF9F)],
    "zh": [(0x4E00, 0x9FFF), (0x3400, 0x4DBF)],
    "ru": [(0x0400, 0x04FF)],
    "bn": [(0x0980, 0x09FF)],
    "te": [(0x0C00, 0x0C7F)],
    "th": [(0x0E00, 0x0E7F)],
    **{lang: [(0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F)] for lang in ("en", "de", "fr", "es", "sw")},
}

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> float | None:
    """The last number in `text`: full-width digits, thousands separators, decimals and negatives."""
    t = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    found = _NUMBER.findall(t)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def script_share(text: str, lang: str) -> float:
    """Fraction of the letters in `text` that belong to `lang`'s scripts (1.0 when there are none)."""
    ranges = SCRIPTS[lang]
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    if not letters:
        return 1.0
    own = sum(any(lo <= ord(ch) <= hi for lo, hi in ranges) for ch in letters)
    return own / len(letters)


def load_rows(lang: str) -> list[tuple[str, float]]:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown MGSM language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    rows = []
    for line in (DATA / f"mgsm_{lang}.tsv").read_text(encoding="utf-8").splitlines():
        q, a = line.rsplit("\t", 1)
        rows.append((q, float(a.replace(",", ""))))
    return rows


def load_jsonl(path: str | Path) -> list[tuple[str, float]]:
    """User-supplied problems: one {"question": ..., "answer": number} per line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"MGSM jsonl {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or "question" not in item or "answer" not in item:
                raise ValueError("each line needs 'question' and 'answer'")
            answer = float(str(item["answer"]).replace(",", ""))
            if not math.isfinite(answer):
                raise ValueError(f"answer {item['answer']!r} is not a finite number")
            rows.append((str(item["question"]), answer))
        except ValueError as exc:
            raise ValueError(f"{path}:{i + 1}: {str(exc).splitlines()[0]} (expected {{\"question\": ..., \"answer\": number}})") from None
    if not rows:
        raise ValueError(f"MGSM jsonl {path} holds no problems")
    return rows


def parse_rows(split: str | None, rows: list[int] | None, total: int = 250) -> tuple[int, int]:
    """[start, end) of a split name or row range, checked against the `total` rows there are."""
    if rows is not None:
        if not (isinstance(rows, list) and len(rows) == 2 and all(isinstance(r, int) for r in rows)):
            raise ValueError(f"MGSM rows {rows!r}: write [start, end) row numbers, e.g. [0, 100]")
        start, end = rows[0], rows[1]
        label = f"rows {rows}"
    else:
        split = split or "search"
        if split in SPLITS:
            start, end = SPLITS[split]
        else:
            m = re.fullmatch(r"(\d+)-(\d+)", str(split))
            if not m:
                raise ValueError(f"MGSM split {split!r}: use search, holdout, all, or a row range like 0-99")
            start, end = int(m.group(1)), int(m.group(2)) + 1
        label = f"split {split!r}"
    if not (0 <= start < end <= total):
        raise ValueError(f"MGSM {label} selects rows {start}-{end - 1}, outside the data (rows 0-{total - 1}); "
                         f"use a range inside 0-{total - 1}")
    return start, end


PLAIN_STOP = ["\n\n", "Question:", "問題："]  # a plain answer ends at a blank line or the next question


def build_prompt(question: str, lang: str, shots: list[tuple[str, float]]) -> str:
    """The plain prompt in the language's default wording (what `chat_template: false` gives)."""
    return default_format(lang).render(None, question, [(q, _fmt(a)) for q, a in shots])


def default_format(lang: str, chat: bool = False) -> PromptFormat:
    q_word, a_word = TEMPLATES.get(lang, TEMPLATES["en"])
    return PromptFormat(chat, f"{q_word} {{question}}", a_word)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_answer(value, where: str) -> float:
    """A reference answer: a number, or GSM8K's worked solution ending in '#### 72'."""
    text = str(value)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    try:
        answer = float(text.strip().replace(",", ""))
    except ValueError:
        raise ValueError(f"{where}: answer {str(value)[:60]!r} is not a number (nor ends in '#### <number>')") from None
    if not math.isfinite(answer):
        raise ValueError(f"{where}: answer {value!r} is not a finite number")
    return answer


HF_KEYS = {"path", "name", "split", "question_field", "answer_field", "revision"}


def load_hf(spec: dict) -> tuple[list[tuple[str, float]], str, str]:
    """Problems from a Hugging Face data set through the `datasets` cache (or a local data set folder):
    (rows, a name for the data that says which split, the data's fingerprint)."""
    from evomerge.errors import close_match

    if not isinstance(spec, dict) or "path" not in spec:
        raise ValueError(f"hf {spec!r}: write {{path: <hub id or local folder>, name: <config>, split: test, "
                         "question_field: question, answer_field: answer}")
    unknown = set(spec) - HF_KEYS
    if unknown:
        raise ValueError(f"hf: unknown key(s) {sorted(unknown)}; allowed: {sorted(HF_KEYS)}"
                         f"{close_match(sorted(unknown)[0], HF_KEYS)}")
    try:
        import datasets
    except ImportError:
        raise ValueError("hf: fitness sets need the datasets package: pip install datasets") from None
    path, name, split = str(spec["path"]), spec.get("name"), str(spec.get("split", "test"))
    q_field, a_field = str(spec.get("question_field", "question")), str(spec.get("answer_field", "answer"))
    datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(path, name, split=split, revision=spec.get("revision"))
    except Exception as exc:
        raise ValueError(f"hf data set {path!r} (name {name!r}, split {split!r}) cannot be loaded ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); offline it must be in the datasets "
                         "cache or a local folder") from None
    missing = [f for f in (q_field, a_field) if f not in data.column_names]
    if missing:
        raise ValueError(f"hf data set {path!r} split {split!r} has no column(s) {missing}; its columns: "
                         f"{data.column_names} (set question_field / answer_field)")
    rows = [(str(item[q_field]), parse_answer(item[a_field], f"hf {path!r} {split} row {i}"))
            for i, item in enumerate(data)]
    if not rows:
        raise ValueError(f"hf data set {path!r} split {split!r} has no rows")
    return rows, f"hf:{path}" + (f"/{name}" if name else "") + f":{split}", data._fingerprint


class MGSM:
    """Accuracy on MGSM (or a user JSONL / Hugging Face set) in one language:
    {mgsm_<lang>: accuracy, _truncated: rate, _in_language: share, _tokens: mean generated tokens}."""

    def __init__(self, tokenizer, lang: str = "ja", split: str | None = "search", rows: list[int] | None = None,
                 shots: int = 0, shot_rows: str | list[int] | None = None, jsonl: str | None = None,
                 hf: dict | None = None, language_check: bool = False, language_threshold: float = 0.5,
                 limit: int | None = None, chat_template="auto", system: str | None = None,
                 prompt: str | None = None, answer_prefix: str | None = None, stop: list[str] | None = None,
                 **generation):
        from evomerge.evaluators import positive

        positive(shots, "MGSM shots", 0)
        positive(limit, "MGSM limit", optional=True)
        if isinstance(language_threshold, bool) or not isinstance(language_threshold, (int, float)) \
                or not 0 <= language_threshold <= 1:
            raise ValueError(f"MGSM language_threshold {language_threshold!r}: a share between 0 and 1 (default 0.5)")
        if jsonl and hf:
            raise ValueError("MGSM: give jsonl or hf, not both")
        if (jsonl or hf) and split not in (None, "search"):
            raise ValueError("MGSM split names rows of the shipped MGSM data; a jsonl/hf set takes rows: [start, end) "
                             "(or limit)")
        self.tokenizer = tokenizer
        self.lang = lang
        if not (jsonl or hf) and lang not in LANGUAGES:  # an outside set may be in any language
            raise ValueError(f"unknown MGSM language {lang!r}; choose one of {', '.join(LANGUAGES)}")
        if language_check and lang not in SCRIPTS:
            raise ValueError(f"language_check knows the scripts of {', '.join(sorted(SCRIPTS))}, not {lang!r}")
        default = default_format(lang)
        self.format = resolve_format(tokenizer, chat_template, default.prompt if prompt is None else prompt,
                                     default.answer_prefix if answer_prefix is None else answer_prefix, system)
        q_word = TEMPLATES.get(lang, TEMPLATES["en"])[0]
        plain_stop = PLAIN_STOP + ([q_word] if q_word not in PLAIN_STOP else [])
        self.settings = GenerationSettings(stop=self.format.default_stop(plain_stop) if stop is None else stop,
                                           **generation)
        self.fingerprint, self.hf = None, None
        if jsonl:
            problems = load_jsonl(jsonl)
            self.dataset = f"jsonl:{Path(jsonl).resolve()}"
            label = f"jsonl:{Path(jsonl).name}"
        elif hf:
            problems, self.dataset, self.fingerprint = load_hf(hf)
            label = self.dataset
            self.hf = dict(hf)
        else:
            problems = load_rows(lang)
            self.dataset = "mgsm"  # row i is the same problem in every language
            label = ""
        if jsonl or hf:  # an outside set is scored whole unless rows: [start, end) picks a part
            start, end = parse_rows(None, rows, len(problems)) if rows is not None else (0, len(problems))
        else:
            start, end = parse_rows(split, rows, len(problems))
        self.split_name = f"{label} rows {start}-{end - 1}".strip()
        evaluated = list(range(start, end))
        if shot_rows is not None:
            a, b = parse_rows(str(shot_rows) if not isinstance(shot_rows, list) else None,
                              shot_rows if isinstance(shot_rows, list) else None, len(problems))
            self.shot_rows = list(range(a, b))[-shots:] if shots else []
            if len(self.shot_rows) < shots:
                raise ValueError(f"MGSM shot_rows {shot_rows!r} hold {b - a} rows; shots {shots} needs that many")
            if set(self.shot_rows) & set(evaluated):
                raise ValueError(f"MGSM shot_rows {shot_rows!r} overlap the evaluated rows {start}-{end - 1}; "
                                 "exemplars must come from other rows")
        else:  # leave-out: the split's own last rows serve as exemplars and are not scored
            if shots >= len(evaluated):
                raise ValueError(f"MGSM shots {shots} leaves no problem to score in rows {start}-{end - 1}")
            self.shot_rows = evaluated[len(evaluated) - shots:] if shots else []
            evaluated = evaluated[: len(evaluated) - shots]
        self.rows = evaluated[:limit]
        self.items = [problems[i] for i in self.rows]
        self.shots = [(q, _fmt(a)) for q, a in (problems[i] for i in self.shot_rows)]
        self.language_check = language_check
        self.language_threshold = language_threshold
        self.metric = f"mgsm_{lang}"
        # Rendered once, not per candidate; a template that refuses the prompt is one line now, not mid-campaign.
        self.rendered = self.prompts(self.items)

    def identity(self) -> dict:
        ident = {"task": f"mgsm:{self.lang}", "split": self.split_name, "n": len(self.items), "shots": len(self.shots),
                 "shot_rows": self.shot_rows, "prompt": self.format.identity(), "generation": asdict(self.settings),
                 "answer": "last number; truncated = wrong",
                 "language_check": (f"script share >= {self.language_threshold}" if self.language_check else None)}
        if self.hf:
            ident["data"] = {**self.hf, "fingerprint": self.fingerprint}
        return ident

    def examples_key(self) -> tuple[str, set[int]]:
        """(data set, rows scored): what a campaign checks for overlap between fitness and held-out."""
        return self.dataset, set(self.rows)

    def exemplar_key(self) -> tuple[str, set[int]]:
        return self.dataset, set(self.shot_rows)

    def metric_names(self) -> set[str]:
        return {self.metric, f"{self.metric}_truncated", f"{self.metric}_in_language", f"{self.metric}_tokens"}

    @property
    def n(self) -> int:
        return len(self.items)

    def prompts(self, items) -> list[str]:
        return [self.format.render(self.tokenizer, q, self.shots) for q, _ in items]

    def _judge(self, model, indices: list[int]) -> list[tuple[bool, bool, bool, int]]:
        """(correct, truncated, in language, tokens generated) per problem (positions in self.items)."""
        outputs = generate(model, self.tokenizer, [self.rendered[i] for i in indices], self.settings)
        self.last_outputs = outputs
        verdicts = []
        for out, (_, gold) in zip(outputs, (self.items[i] for i in indices)):
            pred = extract_answer(out.text)
            in_lang = script_share(out.text, self.lang) >= self.language_threshold if self.lang in SCRIPTS else True
            ok = pred is not None and abs(pred - gold) < 1e-6 and not out.truncated
            if self.language_check:
                ok = ok and in_lang
            verdicts.append((ok, out.truncated, in_lang, out.tokens))
        return verdicts

    def score(self, model) -> dict[str, float]:
        verdicts = self._judge(model, list(range(len(self.items))))
        n = len(verdicts)
        return {self.metric: sum(v[0] for v in verdicts) / n, f"{self.metric}_truncated": sum(v[1] for v in verdicts) / n,
                f"{self.metric}_in_language": sum(v[2] for v in verdicts) / n,
                f"{self.metric}_tokens": sum(v[3] for v in verdicts) / n}

    # Racing: accuracy is a mean of 0/1 verdicts, so problems can be scored a few at a time.
    bounded = True

    def race_metric_names(self) -> set[str]:
        return {self.metric}

    def score_examples(self, model, indices: list[int]) -> dict[str, torch.Tensor]:
        verdicts = self._judge(model, indices)
        return {self.metric: torch.tensor([float(v[0]) for v in verdicts])}
