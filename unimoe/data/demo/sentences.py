"""A varied English sentence generator for the synthetic speech corpus.

Templates with slots filled from word lists give tens of millions of distinct sentences,
so transcripts differ and a TTS model has to read the text instead of memorising a few
prompts. Everything is drawn from a caller-provided ``random.Random`` (deterministic).
"""

from __future__ import annotations

import random

PEOPLE = [
    "the old farmer", "a tired student", "my neighbour", "the young doctor", "her brother", "the baker",
    "a quiet painter", "the captain", "our teacher", "the little girl", "a travelling musician", "the mayor",
    "his grandmother", "the night guard", "a curious child", "the fisherman", "the new engineer", "my aunt",
    "the gardener", "a lonely poet", "the shop keeper", "the pilot", "a clever fox", "the tailor",
]
NAMES = ["Anna", "Peter", "Maria", "Tom", "Lucy", "Daniel", "Grace", "Oliver", "Nora", "Samuel", "Clara", "Hugo",
         "Emma", "Victor", "Julia", "Felix", "Rosa", "Martin", "Alice", "Leo"]
THINGS = [
    "a wooden box", "the red umbrella", "a bag of apples", "the broken clock", "an old map", "the silver key",
    "a cup of tea", "the heavy suitcase", "a paper kite", "the blue bicycle", "a loaf of bread", "the letter",
    "a basket of eggs", "the green lamp", "a pair of boots", "the small radio", "a jar of honey", "the violin",
    "a bunch of flowers", "the yellow notebook", "a warm blanket", "the last ticket", "a glass of water",
]
PLACES = [
    "the market", "the station", "the library", "the harbour", "the garden", "the old bridge", "the village",
    "the kitchen", "the hill", "the school", "the river bank", "the museum", "the forest", "the bakery",
    "the square", "the hospital", "the beach", "the attic", "the farm", "the castle", "the park",
]
VERBS_PAST = [
    "carried", "painted", "found", "dropped", "opened", "repaired", "borrowed", "sold", "washed", "hid",
    "forgot", "bought", "wrapped", "lifted", "cleaned", "delivered", "counted", "returned", "noticed", "packed",
]
VERBS_MOTION = ["walked", "hurried", "drove", "cycled", "wandered", "ran", "sailed", "climbed", "returned", "rushed"]
TIMES = [
    "this morning", "last night", "on Sunday", "before dinner", "after the storm", "at noon", "every winter",
    "in the spring", "yesterday", "at dawn", "late in the evening", "on a rainy day", "during the holidays",
]
ADJECTIVES = ["bright", "cold", "quiet", "busy", "strange", "lovely", "dark", "windy", "warm", "gentle", "noisy",
              "peaceful", "grey", "sunny", "long", "short", "happy", "calm"]
NOUNS = ["day", "evening", "morning", "week", "journey", "afternoon", "summer", "night", "winter", "moment"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty", "forty"]
PLURALS = ["boats", "birds", "letters", "candles", "stones", "horses", "windows", "songs", "lanterns", "books", "trees"]
FEELINGS = ["glad", "surprised", "worried", "proud", "sorry", "certain", "afraid", "curious", "relieved"]

TEMPLATES: list[tuple[str, int]] = [
    ("{Person} {verb} {thing} {time}.", 3),
    ("{Person} {motion} to {place} {time}.", 3),
    ("{Name} {verb} {thing} near {place}.", 3),
    ("Did {person} leave {thing} at {place}?", 2),
    ("It was a {adj} {noun} at {place}.", 2),
    ("We saw {number} {plural} by {place}.", 2),
    ("{Name} was {feeling} to see {person}.", 2),
    ("Please bring {thing} to {place}.", 2),
    ("Why did {person} {verb_inf} {thing}?", 1),
    ("{Time}, {name} {motion} home.", 2),
    ("There were {number} {plural} in {place}.", 2),
    ("{Name} said the {noun} felt {adj}.", 2),
    ("How many {plural} did {name} count?", 1),
    ("{Person} and {name} {motion} to {place}.", 2),
    ("What a {adj} {noun}!", 1),
    ("The {plural} at {place} look {adj} today.", 1),
]

_INFINITIVE = {"carried": "carry", "painted": "paint", "found": "find", "dropped": "drop", "opened": "open",
               "repaired": "repair", "borrowed": "borrow", "sold": "sell", "washed": "wash", "hid": "hide",
               "forgot": "forget", "bought": "buy", "wrapped": "wrap", "lifted": "lift", "cleaned": "clean",
               "delivered": "deliver", "counted": "count", "returned": "return", "noticed": "notice", "packed": "pack"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_sentence(rng: random.Random, max_words: int | None = None) -> str:
    """One sentence; with ``max_words``, templates that come out longer are redrawn."""
    weights = [w for _, w in TEMPLATES]
    for _ in range(50):
        template = rng.choices([t for t, _ in TEMPLATES], weights=weights)[0]
        verb = rng.choice(VERBS_PAST)
        values = {
            "person": rng.choice(PEOPLE), "name": rng.choice(NAMES), "thing": rng.choice(THINGS),
            "place": rng.choice(PLACES), "verb": verb, "verb_inf": _INFINITIVE[verb], "motion": rng.choice(VERBS_MOTION),
            "time": rng.choice(TIMES), "adj": rng.choice(ADJECTIVES), "noun": rng.choice(NOUNS),
            "number": rng.choice(NUMBERS), "plural": rng.choice(PLURALS), "feeling": rng.choice(FEELINGS),
        }
        values.update({k.capitalize(): _cap(v) for k, v in list(values.items())})
        sentence = _cap(template.format(**values))
        if max_words is None or len(sentence.split()) <= max_words:
            return sentence
    return sentence
