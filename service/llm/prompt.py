"""ReLLa-style prompts in the base model's chat template, split into a shared prefix and suffixes.

Everything that is the same for all candidates of a request (chat header, user profile, the
instructions) comes first; the candidate-specific part (its retrieved history and the question
about it) comes last, so a request's candidates share the longest possible prefix and its KV
cache. The answer is one token, "Yes" or "No", right after the assistant header; their ids are
derived from the tokenizer and checked when the builder is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

PROMPT_VERSION = "rella-chat-v1"
_PREFIX, _SUFFIX = "\x00RECLORA_PREFIX\x00", "\x00RECLORA_SUFFIX\x00"


class PromptConfig(BaseModel):
    """Recorded in the bundle; a change of wording is a change of ``version``."""

    model_config = ConfigDict(extra="forbid")

    version: str = PROMPT_VERSION
    item_noun: str = "movie"
    verb_past: str = "watched"
    system: str = "You are a recommender system. You answer only Yes or No."
    yes: str = "Yes"
    no: str = "No"


@dataclass(frozen=True)
class ItemText:
    title: str
    year: int | None = None

    def render(self) -> str:
        return f"{self.title} ({self.year})" if self.year else self.title


@dataclass(frozen=True)
class Behaviour:
    item: ItemText
    rating: float


class AnswerTokenError(ValueError):
    """The tokenizer or template makes the Yes/No answer ambiguous."""


def _stars(rating: float) -> str:
    value = int(rating) if float(rating).is_integer() else rating
    return f"{value} star" if value == 1 else f"{value} stars"


def profile_sentence(profile: Mapping[str, object]) -> str:
    known = {k: str(v) for k, v in profile.items() if v is not None and str(v) not in ("", "unknown", "nan")}
    if not known:
        return "Nothing is known about the user's profile."
    parts = []
    if "gender" in known:
        parts.append(f"The user is {known.pop('gender')}.")
    if "age" in known:
        parts.append(f"The user's age is {known.pop('age')}.")
    if "occupation" in known:
        parts.append(f"The user's job is {known.pop('occupation')}.")
    parts += [f"The user's {k.replace('_', ' ')} is {v}." for k, v in known.items()]
    return " ".join(parts)


class PromptBuilder:
    """Renders and tokenizes prompts; ``yes_id`` / ``no_id`` are the two label tokens."""

    def __init__(self, tokenizer, config: PromptConfig = PromptConfig()) -> None:
        self.tokenizer = tokenizer
        self.config = config
        messages = [{"role": "system", "content": config.system}, {"role": "user", "content": _PREFIX + _SUFFIX}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{config.system}\nUSER: {_PREFIX}{_SUFFIX}\nASSISTANT:"
        self._head, rest = text.split(_PREFIX)
        self._mid, self._tail = rest.split(_SUFFIX)
        self.yes_id, self.no_id = self._answer_ids()

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _answer_ids(self) -> tuple[int, int]:
        probe = self._tail
        base = self.encode_text(probe)
        ids = []
        for word in (self.config.yes, self.config.no):
            full = self.encode_text(probe + word)
            if len(full) != len(base) + 1 or full[: len(base)] != base:
                raise AnswerTokenError(
                    f"the answer {word!r} is not one token appended after the prompt "
                    f"({base[-3:]} + {word!r} -> {full[-4:]}): choose another answer word or template")
            ids.append(full[-1])
        if ids[0] == ids[1]:
            raise AnswerTokenError(f"'{self.config.yes}' and '{self.config.no}' map to the same token {ids[0]}")
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is not None and unk in ids:
            raise AnswerTokenError("an answer word is unknown to the tokenizer")
        return ids[0], ids[1]

    def prefix_text(self, profile: Mapping[str, object], has_history: bool = True) -> str:
        """The shared part; it ends with the history header, which is the same for every candidate
        (each candidate's history is non-empty exactly when the user's is)."""
        c = self.config
        seen = (f"The user {c.verb_past} the following {c.item_noun}s in order in the past, and rated them:\n"
                if has_history else f"The user has not rated any {c.item_noun}s yet.\n")
        return (
            f"{self._head}{profile_sentence(profile)}\n"
            f"Note that the more stars the user rated a {c.item_noun}, the more the user liked it. "
            f"You should ONLY tell me yes or no.\n{seen}"
        )

    def suffix_text(self, history: Sequence[Behaviour], target: ItemText) -> str:
        c = self.config
        seen = "".join(f"{i}. {b.item.render()} ({_stars(b.rating)})\n" for i, b in enumerate(history, 1))
        question = (f"Based on the {c.item_noun}s the user has {c.verb_past}, deduce if the user will like the "
                    f"{c.item_noun} ***{target.render()}***.")
        return f"{seen}{question}{self._mid}{self._tail}"

    def encode(self, profile: Mapping[str, object], histories: Sequence[Sequence[Behaviour]],
               targets: Sequence[ItemText]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared prefix and of each candidate's suffix."""
        if len({bool(h) for h in histories}) > 1:
            raise ValueError("either every candidate has a history or none has")
        prefix = self.encode_text(self.prefix_text(profile, bool(histories and histories[0])))
        texts = [self.suffix_text(h, t) for h, t in zip(histories, targets)]
        return prefix, (self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
