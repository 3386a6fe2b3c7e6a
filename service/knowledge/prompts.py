"""Knowledge prompts: what the base LLM is asked about an item and about a user's preferences.

After KAR (open-world knowledge augmented recommendation): the item prompt asks the model to
introduce the item and describe its attributes, the user prompt gives the profile and the rated
history and asks for an analysis of the user's preferences over the same factors. The words
(item noun, the past-tense verb, the factors) come from the dataset, so a book catalog is asked
about books and authors, never about movies. ``version`` names the words, as the scoring prompt's
version does: vectors made from other words are other knowledge.

The prompts are plain user messages; ``generate.py`` puts them in the model's chat template.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

KNOWLEDGE_PROMPT_VERSION = "kar-v1"

# KAR's factors for movies; for other catalogs the generic ones unless the dataset names its own.
MOVIE_FACTORS = ["genre", "director and cast", "time period and country", "characters", "plot and theme",
                 "mood and tone", "critical acclaim and awards", "production quality", "soundtrack"]
BOOK_FACTORS = ["genre", "author", "time period and setting", "characters", "plot and theme", "writing style",
                "mood and tone", "critical acclaim and awards", "length and pacing"]
GENERIC_FACTORS = ["category", "creator or brand", "time period and origin", "theme", "style", "mood and tone",
                   "critical reception", "quality", "price and audience"]
FACTORS_BY_NOUN = {"movie": MOVIE_FACTORS, "film": MOVIE_FACTORS, "book": BOOK_FACTORS, "novel": BOOK_FACTORS}


def default_factors(item_noun: str) -> list[str]:
    return list(FACTORS_BY_NOUN.get(item_noun.lower(), GENERIC_FACTORS))


class KnowledgePrompts(BaseModel):
    """The knowledge prompts' words, recorded with the vectors (``knowledge.json``, the bundle)."""

    model_config = ConfigDict(extra="forbid")

    version: str = ""
    item_noun: str = "movie"
    item_plural: str | None = None
    verb_past: str = "watched"
    factors: list[str] = Field(default_factory=list, description="attributes to describe; empty = by noun")
    max_behaviours: int = Field(default=10, ge=1, description="most recent rated items in a user prompt")
    system: str = "You are a helpful assistant who knows a lot about {item_plural}."

    @property
    def items_noun(self) -> str:
        return self.item_plural or f"{self.item_noun}s"

    @model_validator(mode="after")
    def _fill(self) -> "KnowledgePrompts":
        if not self.factors:
            self.factors = default_factors(self.item_noun)
        expected = self._derived_version()
        if "version" in self.model_fields_set and self.version and self.version != expected:
            raise ValueError(f"knowledge prompt version {self.version!r} does not match its words ({expected!r})")
        self.version = expected
        return self

    def _derived_version(self) -> str:
        words = self.model_dump(exclude={"version"})
        digest = hashlib.sha256(json.dumps(words, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return f"{KNOWLEDGE_PROMPT_VERSION}+{digest[:12]}"

    def system_message(self) -> str:
        return self.system.format(item_noun=self.item_noun, item_plural=self.items_noun)

    def item_prompt(self, item_text: str) -> str:
        """Introduce the item and describe its attributes (KAR's factual knowledge prompt)."""
        return (f"Introduce the {self.item_noun} {item_text} and describe its attributes precisely "
                f"(including but not limited to {_listing(self.factors)}).")

    def user_prompt(self, profile: Mapping[str, object], behaviours: Sequence[tuple[str, float]],
                    rating_max: float = 5.0) -> str:
        """Analyse the user's preferences from profile and rated history (KAR's reasoning prompt).

        ``behaviours`` are (item text, rating), oldest first; only the most recent
        ``max_behaviours`` are listed, so the prompt stays within the model's context."""
        recent = list(behaviours)[-self.max_behaviours:]
        lines = "\n".join(f"{i + 1}. {text}, rated {_rating(r)} of {_rating(rating_max)} stars"
                          for i, (text, r) in enumerate(recent))
        history = (f"This user {self.verb_past} and rated these {self.items_noun}, oldest first:\n{lines}\n"
                   if recent else f"This user has not rated any {self.items_noun} yet.\n")
        return (f"{describe_user(profile)} {history}"
                f"Analyze the user's preferences on {self.items_noun} (consider factors like "
                f"{_listing(self.factors)}). Give clear explanations based on the {self.items_noun} above.")


def describe_user(profile: Mapping[str, object]) -> str:
    """One sentence of the profile's known fields (unknown and empty ones left out)."""
    known = {k: str(v) for k, v in profile.items()
             if v is not None and str(v) not in ("", "unknown", "nan", "None")}
    if not known:
        return "Nothing is known about this user's profile."
    parts = [f"{k.replace('_', ' ')} {v}" for k, v in known.items()]
    return f"The user's profile: {', '.join(parts)}."


def _listing(words: Sequence[str]) -> str:
    words = list(words)
    return ", ".join(words[:-1]) + f" and {words[-1]}" if len(words) > 1 else "".join(words)


def _rating(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def knowledge_prompts_for(meta: Mapping[str, object], factors: Sequence[str] | None = None,
                          max_behaviours: int = 10) -> KnowledgePrompts:
    """The knowledge prompts of a prepared dataset (its ``meta.json`` item words)."""
    noun = str(meta.get("item_noun", "movie"))
    words: dict[str, object] = {"item_noun": noun, "max_behaviours": max_behaviours}
    if meta.get("item_plural") not in (None, f"{noun}s"):
        words["item_plural"] = str(meta["item_plural"])
    if meta.get("item_verb") is not None:
        words["verb_past"] = str(meta["item_verb"])
    if factors:
        words["factors"] = list(factors)
    return KnowledgePrompts(**words)
