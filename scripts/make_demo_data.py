"""Write the demo sentiment set shipped in kasa/data/demo/ (train.tsv, dev.tsv; header `sentence<TAB>label`,
label 1 = positive review, 0 = negative).

The sentences are short movie, restaurant and product reviews made from templates, subjects and adjectives. The
label is the polarity of the clause that decides the sentence, flipped by negation ("was not great", "never
boring") and taken from the second clause of a contrast ("..., but the ending was dull"), so a bag of words does
not solve it. Dev sentences are decided by (subject, adjective) pairs that no training sentence contains, so dev
accuracy measures generalisation, not memorisation. Both splits are balanced. Everything follows from SEED, so
rerunning the script rewrites the same files byte for byte:

    python scripts/make_demo_data.py            # writes kasa/data/demo/{train,dev}.tsv
    python scripts/make_demo_data.py --out DIR
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from kasa.cli.parser import ArgumentParser

SEED = 0
TRAIN_PER_CLASS = 400
DEV_PER_CLASS = 100
HELD_OUT_FRACTION = 0.25  # of (subject, adjective) pairs, reserved for dev

DOMAINS = {
    "movie": (
        "the plot", "the acting", "the soundtrack", "the ending", "the dialogue", "the script", "this film",
        "the sequel", "the lead actor", "the pacing",
    ),
    "restaurant": (
        "the pasta", "the service", "the soup", "the dessert", "the steak", "the coffee", "this restaurant",
        "the waiter", "the pizza", "the breakfast",
    ),
    "product": (
        "the battery", "the screen", "the keyboard", "this blender", "the charger", "the camera", "this laptop",
        "the vacuum", "the app", "the printer",
    ),
}
DOMAIN_OF = {subject: domain for domain, subjects in DOMAINS.items() for subject in subjects}
POSITIVE = (
    "great", "excellent", "wonderful", "delightful", "superb", "fantastic", "impressive", "lovely", "solid",
    "enjoyable", "brilliant", "pleasant", "outstanding", "charming",
)
NEGATIVE = (
    "terrible", "awful", "disappointing", "bland", "poor", "mediocre", "dreadful", "boring", "sloppy",
    "frustrating", "horrible", "weak", "annoying", "dull",
)
INTENSIFIERS = ("", "", "really ", "very ", "quite ", "absolutely ", "pretty ")

# One clause: (template, negated). {s} is a subject, {i} an intensifier, {a} an adjective.
CLAUSES = (
    ("{s} was {i}{a}", False),
    ("{s} is {i}{a}", False),
    ("I thought {s} was {i}{a}", False),
    ("honestly, {s} was {i}{a}", False),
    ("{s} turned out {i}{a}", False),
    ("I found {s} {i}{a}", False),
    ("{s} was not {a}", True),
    ("{s} was never {a}", True),
    ("{s} was not {a} at all", True),
    ("I would not call {s} {a}", True),
    ("nobody could say {s} was {a}", True),
    ("{s} was far from {a}", True),
)
# Whole sentences that turn on an expectation; not combined into contrasts.
EXPECTATIONS = (("I expected {s} to be {a}, but it was not", True), ("I expected {s} to be {a}, and it was", False))
# Contrasts: the second clause decides the label; the first has the opposite polarity.
CONTRASTS = ("{first}, but {second}", "although {first}, {second}", "{first}; however, {second}")
CONTRAST_RATE = 0.3


def _fill(rng: random.Random, template: str, subject: str, adjective: str) -> str:
    """`template` with its slots filled; the intensifier is drawn here so that it varies independently."""
    return template.format(s=subject, i=rng.choice(INTENSIFIERS), a=adjective)


def _sentence(rng: random.Random, pairs: list[tuple[str, str]]) -> tuple[str, int]:
    """A review sentence and its label; every (subject, adjective) pair in it comes from `pairs`."""
    subject, adjective = rng.choice(pairs)
    if rng.random() < CONTRAST_RATE:
        template, negated = rng.choice(CLAUSES)
        label = int((adjective in POSITIVE) != negated)
        first_template, first_negated = rng.choice(CLAUSES)
        # the first clause's polarity, (adjective positive) != negated, must be the opposite of the label
        want_positive = (label == 0) != first_negated
        other = [
            (s, a) for s, a in pairs
            if s != subject and DOMAIN_OF[s] == DOMAIN_OF[subject] and (a in POSITIVE) == want_positive
        ]
        first = _fill(rng, first_template, *rng.choice(other))
        text = rng.choice(CONTRASTS).format(first=first, second=_fill(rng, template, subject, adjective))
    else:
        template, negated = rng.choice(CLAUSES + EXPECTATIONS)
        label = int((adjective in POSITIVE) != negated)
        text = _fill(rng, template, subject, adjective)
    return text[0].upper() + text[1:] + ".", label


def _split(rng: random.Random, pairs: list[tuple[str, str]], per_class: int, taken: set[str]) -> list[tuple[str, int]]:
    """`per_class` unique sentences of each label, none of them in `taken` (which grows)."""
    rows: list[tuple[str, int]] = []
    counts = [0, 0]
    while min(counts) < per_class:
        text, label = _sentence(rng, pairs)
        if counts[label] < per_class and text not in taken:
            taken.add(text)
            counts[label] += 1
            rows.append((text, label))
    return rows


def make_demo_data(out: Path) -> None:
    """Write train.tsv and dev.tsv into `out`."""
    rng = random.Random(SEED)
    pairs = [(subject, adjective) for subject in DOMAIN_OF for adjective in POSITIVE + NEGATIVE]
    rng.shuffle(pairs)
    held_out = int(len(pairs) * HELD_OUT_FRACTION)
    dev_pairs, train_pairs = pairs[:held_out], pairs[held_out:]
    taken: set[str] = set()
    splits = {
        "train": _split(rng, train_pairs, TRAIN_PER_CLASS, taken),
        "dev": _split(rng, dev_pairs, DEV_PER_CLASS, taken),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
        (out / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{out / f'{name}.tsv'}: {len(rows)} rows")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(__file__).resolve().parents[1] / "kasa" / "data" / "demo"
    parser.add_argument("--out", type=Path, default=default, help=f"output folder (default {default})")
    make_demo_data(parser.parse_args().out)
