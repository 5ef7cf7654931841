"""Bad endings: the share of captions whose last word is a function word ("a man riding a
horse on a"), the artifact that SCST without the end token in its reward produces (SacreEOS:
Hu, Cavicchioli, Capotondi 2023, "A request for clarity over the End of Sequence token in
the Self-Critical Sequence Training").

FUNCTION_WORDS is drawn from the closed word classes of English grammar, as standard
function-word and stop-word lists give them (e.g. NLTK's English stop words): articles,
the prepositions that COCO-style captions use, conjunctions, possessive and demonstrative
determiners, and the forms of "be" / "have". Left out on purpose are words that also end a
complete phrase: verb particles and adverbs (up, down, out, off, away, here, there),
object pronouns (her, it, them) and "that" / "this" used as pronouns. A complete English
caption never ends with a word of the list; one that does was cut off.
"""

import re

FUNCTION_WORDS = frozenset(
    # articles
    "a an the "
    # prepositions
    "of in on at by for with from to into onto over under near next behind beside besides "
    "above below across along around through between among against toward towards during "
    "atop upon inside outside underneath beneath beyond via without within throughout like "
    # conjunctions
    "and or but nor while as than because if "
    # possessive and demonstrative determiners, quantifiers before a noun
    "my your his its our their these those some each every another several many few "
    # be / have
    "is are was were be been being has have had".split()
)

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def last_word(caption):
    """The caption's last word, lowercase, punctuation dropped ("" when it has none)."""
    words = _WORD.findall(caption.lower())
    return words[-1] if words else ""


def ends_badly(caption):
    """Whether the caption's last word is a function word (an empty caption is not)."""
    return last_word(caption) in FUNCTION_WORDS


def bad_endings(captions):
    """Share in [0, 1] of the captions (an iterable of strings) that end with a function
    word; 0.0 for none."""
    captions = list(captions)
    return sum(map(ends_badly, captions)) / len(captions) if captions else 0.0
