"""What a detector export knows, from its manifest: the model card the API and the service
show, and the per-name warnings for words its text tower never read.

A CLIP trained here from scratch (`ovd clip pretrain`) has read only its caption corpus; its
manifest records that corpus's words (`text_words`), and the export copies the record. Any
other word reaches the text tower as BPE pieces it never saw trained in context: its embedding
is not a meaning but noise near every other unseen word's (the shipped model puts "cat",
"dog" and "forklift" at 0.95-0.98 cosine of each other), so a name containing one gets
confident nonsense. Such names are answered, with a warning naming the words. An export whose
CLIP has no record (e.g. an open_clip model pretrained on the web) is not restricted: no
warnings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[a-z]+")


def words_of(text: str) -> list[str]:
    """The lower-case alphabetic words of a text ("Red-Ring 2" -> ["red", "ring"])."""
    return _WORD.findall(text.lower())


def known_words(manifest: dict) -> frozenset[str] | None:
    """The words the export's text tower ever read, or None when not recorded (not restricted)."""
    record = (manifest.get("clip") or {}).get("text_words")
    return frozenset(record["words"]) if record else None


def unknown_words(manifest: dict, names: Sequence[str]) -> dict[str, list[str]]:
    """{name: its words the text tower never read} for the names that have any."""
    known = known_words(manifest)
    if known is None:
        return {}
    out = {}
    for name in names:
        missing = [w for w in dict.fromkeys(words_of(name)) if w not in known]
        if missing:
            out[name] = missing
    return out


def warnings_for(manifest: dict, names: Sequence[str]) -> list[dict]:
    """[{"name", "unknown_words", "message"}] for names with words the model never read."""
    return [{"name": name, "unknown_words": words,
             "message": f"this model's text encoder never read {', '.join(repr(w) for w in words)}: "
                        f"detections of {name!r} are not meaningful (see the model card, GET /v1/models/card)"}
            for name, words in unknown_words(manifest, names).items()]


def vocabulary_fits(manifest: dict, names: Sequence[str], min_share: float = 0.5) -> bool:
    """Whether at least `min_share` of a vocabulary's names are made of words the model read."""
    if known_words(manifest) is None or not names:
        return True
    return 1 - len(unknown_words(manifest, names)) / len(names) >= min_share


def model_card(manifest: dict) -> dict:
    """The facts a user needs before trusting an answer: name, what it was trained on, the
    categories it was evaluated on with their metrics, and the words it can read."""
    known = known_words(manifest)
    record = (manifest.get("clip") or {}).get("text_words") or {}
    return {
        "name": manifest.get("name"), "version": manifest.get("version"),
        "trained_on": manifest.get("trained_on"),
        "categories": manifest.get("categories", []),
        "metrics": manifest.get("metrics", {}),
        "prompt_template": manifest.get("prompt_template"),
        "input_size": (manifest.get("input") or {}).get("min_size_test"),
        "vocabulary": {"restricted": known is not None, "words": sorted(known) if known else None,
                       "source": record.get("source"),
                       "note": ("names made of other words get a warning: the text encoder never read them"
                                if known is not None else
                                "the text encoder's reading was not recorded; any words are accepted")},
    }
