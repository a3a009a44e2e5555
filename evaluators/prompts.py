"""How a question becomes a prompt: plain text, or the model's own chat template.

`chat_template: auto` (the default) uses the tokenizer's chat template when it has one, as the
paper evaluated each model with its own template; `true` requires one, `false` writes plain text.
A task gives its question wording (`prompt`, with `{question}`) and the text its answer starts
with (`answer_prefix`); with a chat template the question is the user's turn, few-shot exemplars
are earlier turns, the system prompt is the system turn, and the answer prefix follows the
template's generation prompt. Stop rules follow the format: a chat answer ends at end-of-turn or
EOS; a plain answer also at the task's stop strings (a blank line, the next question).

The identity names the format, a hash of the chat template, the system prompt and the wording:
two scores are comparable only when their prompts were.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

@dataclass
class PromptFormat:
    chat: bool
    prompt: str  # question wording, with {question}
    answer_prefix: str
    system: str | None = None
    template: str | None = None  # the chat template's source, when chat

    def render(self, tokenizer, question: str, shots: list[tuple[str, str]]) -> str:
        """The full prompt for `question` after (question, answer) exemplars."""
        ask = self.prompt.replace("{question}", question)
        if not self.chat:
            head = f"{self.system}\n\n" if self.system else ""
            done = "".join(f"{self.prompt.replace('{question}', q)}\n{self.answer_prefix} {a}\n\n" for q, a in shots)
            return f"{head}{done}{ask}\n{self.answer_prefix}"
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in shots:
            messages += [{"role": "user", "content": self.prompt.replace("{question}", q)},
                         {"role": "assistant", "content": f"{self.answer_prefix} {a}".strip()}]
        messages.append({"role": "user", "content": ask})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises its own TemplateError, e.g. "system role not supported"
            raise ValueError(f"the tokenizer's chat template cannot render this prompt ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                             + ("drop the system prompt or " if self.system else "") + "set chat_template: false") from None
        return text + self.answer_prefix

    def default_stop(self, plain_stop: list[str]) -> list[str]:
        return [] if self.chat else plain_stop

    def identity(self) -> dict:
        sha = hashlib.sha256(self.template.encode()).hexdigest()[:12] if self.template else None
        return {"format": "chat" if self.chat else "plain", "chat_template_sha256": sha, "system": self.system,
                "prompt": self.prompt, "answer_prefix": self.answer_prefix}


def resolve_format(tokenizer, chat_template, prompt: str, answer_prefix: str, system: str | None) -> PromptFormat:
    """The prompt format a task asked for, checked against the tokenizer."""
    if not (isinstance(chat_template, bool) or chat_template == "auto"):
        raise ValueError(f"chat_template {chat_template!r}: auto (the tokenizer's template when it has one), true or false")
    for name, value in (("prompt", prompt), ("answer_prefix", answer_prefix), ("system", system)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} {value!r}: a string")
    if "{question}" not in prompt:
        raise ValueError(f"prompt {prompt!r} has no {{question}} placeholder; write e.g. 'Question: {{question}}'")
    if system is not None and not system.strip():
        raise ValueError("system prompt is empty; leave it out or write one")
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) and template.strip() else None
    if chat_template is True and template is None:
        raise ValueError("chat_template: true, but the tokenizer has no chat template (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja); use chat_template: auto or false")
    chat = template is not None and chat_template is not False
    return PromptFormat(chat, prompt, answer_prefix, system, template if chat else None)
