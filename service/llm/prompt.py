"""ReLLa-style prompts in the base model's chat template, split into a shared prefix and suffixes.

Everything that is the same for all candidates of a request (chat header, user profile, the
instructions) comes first; the candidate-specific part comes last, so a request's candidates
share the longest possible prefix and its KV cache. Two forms (``PromptConfig.form``):

- ``per_target`` (ReLLa's SUBR): each candidate's suffix carries its own retrieved history and
  the question about it (~200 tokens a candidate);
- ``shared``: one history, retrieved for the candidate set as a whole, ends the prefix, which the
  engine runs once a request; each suffix is only the question about its candidate (~30 tokens).

The answer is one token, "Yes" or "No", right after the assistant header; their ids are derived
from the tokenizer and checked when the builder is made.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from service.llm.collab_tokens import choose_placeholder, with_placeholders

log = logging.getLogger(__name__)

PROMPT_VERSION = "rella-chat-v1"  # the per-target form's
SHARED_PROMPT_VERSION = "rella-chat-shared-v1"  # the shared-history form's
PromptForm = Literal["per_target", "shared"]
PROMPT_FORMS: tuple[PromptForm, ...] = ("per_target", "shared")
_BASE_VERSION: dict[str, str] = {"per_target": PROMPT_VERSION, "shared": SHARED_PROMPT_VERSION}
LINE_CACHE_SIZE = 200_000  # tokenized history lines kept (a line is ~10-20 ids)
LINE_CACHE_AUDIT_EVERY = 256  # requests between checks of a cached suffix against whole-text tokens
_PREFIX, _SUFFIX = "\x00RECLORA_PREFIX\x00", "\x00RECLORA_SUFFIX\x00"


class PromptConfig(BaseModel):
    """The prompt's words, recorded in the bundle as ``prompt/config.json``.

    ``item_noun`` / ``item_plural`` (default the noun + "s") name the catalog's items and
    ``verb_past`` what a user did with one ("watched", "read"; it must read as the simple past and
    as the participle). ``form`` is the layout (see the module docstring); a config without one
    (every bundle before the shared form) is per-target. ``version`` follows from the form and the
    words: the form's base version (``PROMPT_VERSION`` or ``SHARED_PROMPT_VERSION``) for the
    default (movie) wording, any other wording that plus a hash of its words, so the same form and
    words always give the same version and anything else another one (a score cache or prompt
    fingerprint never mixes forms). Left out, it is derived; given (as in a bundle), it must be
    the one the form and words give.
    """

    model_config = ConfigDict(extra="forbid")

    version: str = PROMPT_VERSION
    item_noun: str = "movie"
    item_plural: str | None = None
    verb_past: str = "watched"
    system: str = "You are a recommender system. You answer only Yes or No."
    yes: str = "Yes"
    no: str = "No"
    form: PromptForm = "per_target"
    collab_tokens: bool = False  # the CRM's user and item vectors as prompt tokens (``service.llm.collab_tokens``)

    @property
    def items_noun(self) -> str:
        """The plural of the item noun."""
        return self.item_plural or f"{self.item_noun}s"

    def record(self) -> dict[str, str]:
        """The config as a run and a bundle record it: a per-target one without ``form``, as every
        config before the shared form, so its file is unchanged and gateways that predate the
        field read it too."""
        exclude = {"form"} if self.form == "per_target" else set()
        exclude |= set() if self.collab_tokens else {"collab_tokens"}
        return self.model_dump(exclude=exclude or None)

    def wording(self) -> dict[str, str]:
        """Every word the template takes from the config, as the prompt uses it (and the
        collaborative tokens where the prompt carries them)."""
        words = {"item_noun": self.item_noun, "item_plural": self.items_noun, "verb_past": self.verb_past,
                 "system": self.system, "yes": self.yes, "no": self.no}
        return {**words, "collab_tokens": "user+item"} if self.collab_tokens else words

    @model_validator(mode="after")
    def _version_follows_the_words(self) -> "PromptConfig":
        expected = wording_version(self.wording(), self.form)
        if "version" not in self.model_fields_set:
            self.version = expected
        elif self.version != expected:
            raise ValueError(f"prompt version {self.version!r} does not match its words, which are version "
                             f"{expected!r}")
        return self


# The words of PROMPT_VERSION itself: a config with exactly these words is that version.
_DEFAULT_WORDING = {"item_noun": "movie", "item_plural": "movies", "verb_past": "watched",
                    "system": "You are a recommender system. You answer only Yes or No.", "yes": "Yes", "no": "No"}


def wording_version(wording: Mapping[str, str], form: PromptForm = "per_target") -> str:
    """The form's base version for the default words, else that plus ``+<12 hex of their sha256>``."""
    base = _BASE_VERSION[form]
    if dict(wording) == _DEFAULT_WORDING:
        return base
    digest = hashlib.sha256(json.dumps(dict(wording), sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{base}+{digest[:12]}"


def form_of_version(version: str) -> PromptForm:
    """The form a prompt version names (its base, before any ``+`` hash of the words)."""
    base = version.split("+", 1)[0]
    return next((form for form, name in _BASE_VERSION.items() if name == base), "per_target")


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


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


class PromptFormMismatch(ValueError):
    """A LoRA trained on one prompt form paired with a prompt config of the other."""


def check_trained_form(config: PromptConfig, trained: PromptForm) -> None:
    """Refuse a prompt config in another form than the LoRA's: a LoRA trained on per-candidate
    histories in the suffixes reads a shared history in the prefix as another input, and the
    reverse."""
    if trained != config.form:
        raise PromptFormMismatch(f"the LoRA was trained on the {trained!r} prompt form but the prompt config is "
                                 f"{config.form!r} ({config.version}): export the bundle from the LoRA's own "
                                 "training run")


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
        self.collab_id: int | None = None  # the collaborative tokens' placeholder (None: the prompt has none)
        if config.collab_tokens:
            self._collab_end = len(self.encode_text(self._mid + self._tail))
            self.collab_id = choose_placeholder(tokenizer, self.encode_text(self._head + self._mid + self._tail))
        self._line_cache: dict[str, tuple[int, ...]] = {}
        self._encodes = 0
        self.line_cache_enabled = self._lines_are_independent()

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
        seen = (f"The user {c.verb_past} the following {c.items_noun} in order in the past, and rated them:\n"
                if has_history else f"The user has not rated any {c.items_noun} yet.\n")
        return (
            f"{self._head}{profile_sentence(profile)}\n"
            f"Note that the more stars the user rated {_article(c.item_noun)} {c.item_noun}, the more the user "
            f"liked it. You should ONLY tell me yes or no.\n{seen}"
        )

    def suffix_lines(self, history: Sequence[Behaviour], target: ItemText) -> list[str]:
        """The suffix as pieces that tokenize independently: per retrieved behaviour its number
        ("3.") and the rest of its line (ending in a newline), then the question with the turn's
        end and the assistant header. The number is a piece of its own so that a behaviour's
        tokens are cached once, whichever rank retrieval gives it."""
        return [*self.history_lines(history), self.question(target)]

    def history_lines(self, history: Sequence[Behaviour]) -> list[str]:
        """The retrieved behaviours as independently tokenized pieces (see ``suffix_lines``)."""
        return [piece for i, b in enumerate(history, 1)
                for piece in (f"{i}.", f" {b.item.render()} ({_stars(b.rating)})\n")]

    def question(self, target: ItemText) -> str:
        """The question about one candidate, with the turn's end and the assistant header. The
        shared form's says the history is "above": it was retrieved for the whole candidate set,
        not for this candidate."""
        c = self.config
        above = " above" if c.form == "shared" else ""
        return (f"Based on the {c.items_noun} the user has {c.verb_past}{above}, deduce if the user will like the "
                f"{c.item_noun} ***{target.render()}***.{self._mid}{self._tail}")

    def suffix_text(self, history: Sequence[Behaviour], target: ItemText) -> str:
        return "".join(self.suffix_lines(history, target))

    def _encode_suffix(self, lines: list[str]) -> list[int]:
        """Token ids of the suffix from cached ids of its lines.

        Most of a request's tokenization is history lines the same user's requests (and users
        with overlapping histories) repeat, so lines are tokenized once and cached. That equals
        tokenizing the whole text only where the tokenizer never merges across a line end, which
        byte-level BPE tokenizers with GPT-2 style pre-tokenization (SmolLM2, Llama 3) guarantee;
        ``_lines_are_independent`` checks it when the builder is made, and ``encode`` re-checks a
        sample of real suffixes and switches the cache off for good on any difference.
        """
        cache = self._line_cache
        ids: list[int] = []
        for line in lines:
            ids.extend(cache[line])
        return ids

    def _cache_lines(self, lines: Sequence[Sequence[str]]) -> None:
        """Tokenize the lines not cached yet, all in one batched call (one call per line would cost
        more in per-call overhead than the cache saves on a cold request)."""
        cache = self._line_cache
        needed = {line: None for group in lines for line in group}
        missing = [line for line in needed if line not in cache]
        if not missing:
            return
        excess = len(cache) + len(missing) - LINE_CACHE_SIZE
        if excess > 0:  # oldest first (dicts keep insertion order), never a line this request reads
            for line in list(itertools.islice((line for line in cache if line not in needed), excess)):
                del cache[line]
        for line, ids in zip(missing, self.tokenizer(missing, add_special_tokens=False)["input_ids"]):
            cache[line] = tuple(ids)

    def _lines_are_independent(self) -> bool:
        probe = [[Behaviour(ItemText("Toy Story", 1995), 5.0), Behaviour(ItemText("Se7en (a.k.a. Seven)", 1995), 2.5),
                  Behaviour(ItemText("L'Âge d'or", None), 1.0), Behaviour(ItemText('"Til There Was You"', 1997), 3.0),
                  Behaviour(ItemText("12 Angry Men", 1957), 4.0), Behaviour(ItemText("...And Justice for All", 1979), 2.0)],
                 []]
        for history in probe:
            lines = self.suffix_lines(history, ItemText("12 Angry Men", 1957))
            if [i for line in lines for i in self.encode_text(line)] != self.encode_text("".join(lines)):
                return False
        return True

    def with_collab(self, prefix: list[int], suffixes: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """The prompt with its collaborative tokens' placeholders where the config has them: the
        user's closing the prefix, each candidate's after its question, before the turn's end."""
        if self.collab_id is None:
            return prefix, suffixes
        return with_placeholders(prefix, suffixes, self.collab_id, self._collab_end)

    def encode(self, profile: Mapping[str, object], histories: Sequence[Sequence[Behaviour]],
               targets: Sequence[ItemText]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared prefix and of each candidate's suffix (the per-target form)."""
        return self.with_collab(*self._encode_per_target(profile, histories, targets))

    def _encode_per_target(self, profile: Mapping[str, object], histories: Sequence[Sequence[Behaviour]],
                           targets: Sequence[ItemText]) -> tuple[list[int], list[list[int]]]:
        if len({bool(h) for h in histories}) > 1:
            raise ValueError("either every candidate has a history or none has")
        prefix_text = self.prefix_text(profile, bool(histories and histories[0]))
        lines = [self.suffix_lines(h, t) for h, t in zip(histories, targets)]
        if not self.line_cache_enabled or not lines:
            return self.encode_text(prefix_text), self._encode_whole(lines)
        # The prefix is cached whole (a user's is the same on every request), filled in the same
        # batched call as the lines.
        self._cache_lines([*lines, [prefix_text]])
        prefix = list(self._line_cache[prefix_text])
        suffixes = [self._encode_suffix(x) for x in lines]
        if self._cache_disagrees(lines[0], suffixes[0]):
            return prefix, self._encode_whole(lines)
        return prefix, suffixes

    def _cache_disagrees(self, lines: Sequence[str], ids: list[int]) -> bool:
        """On every ``LINE_CACHE_AUDIT_EVERY``-th request, whether ``ids`` (from cached lines)
        differ from tokenizing ``lines`` whole; a difference switches the line cache off for good."""
        self._encodes += 1
        if self._encodes % LINE_CACHE_AUDIT_EVERY != 1 or self.encode_text("".join(lines)) == ids:
            return False
        log.error("cached line tokens differ from whole-text tokens; line cache switched off")
        self.line_cache_enabled = False
        return True

    def _encode_whole(self, lines: Sequence[Sequence[str]]) -> list[list[int]]:
        """Each suffix tokenized as one text, all in one batched call."""
        texts = ["".join(x) for x in lines]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def encode_shared(self, profile: Mapping[str, object], history: Sequence[Behaviour],
                      targets: Sequence[ItemText]) -> tuple[list[int], list[list[int]]]:
        """Token ids of the shared form: the prefix (profile, instructions and the one history
        retrieved for all ``targets``) and each candidate's question.

        The prefix's ids are the header's followed by the history's lines', tokenized apart as in
        the per-target form (whose line ends the tokenizer never merges across; see
        ``_encode_suffix``), so the same pieces give the same ids in either form."""
        return self.with_collab(*self._encode_shared(profile, history, targets))

    def _encode_shared(self, profile: Mapping[str, object], history: Sequence[Behaviour],
                       targets: Sequence[ItemText]) -> tuple[list[int], list[list[int]]]:
        head = self.prefix_text(profile, bool(history))
        lines = self.history_lines(history)
        questions = [[self.question(t)] for t in targets]
        if not self.line_cache_enabled:
            prefix = self.encode_text(head) + (self.encode_text("".join(lines)) if lines else [])
            return prefix, self._encode_whole(questions)
        self._cache_lines([[head, *lines], *questions])
        history_ids = self._encode_suffix(lines)
        if lines and self._cache_disagrees(lines, history_ids):
            return self._encode_shared(profile, history, targets)  # now without the cache
        return list(self._line_cache[head]) + history_ids, [self._encode_suffix(q) for q in questions]
