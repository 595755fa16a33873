"""Regenerate the real-model quickstart's task (src/tunelab/assets/quickstart/orders-*.jsonl).

The task: a café customer's order, in words, becomes the till's ticket code, e.g.
``"Two lattes and a muffin to go, please."`` -> ``"LAT2 MUF1"``.
The rule is made up, so no base model can guess it, yet it is small and regular
enough for LoRA to learn from a few hundred examples in a few dozen steps:

each item in the order it was said, as the menu's three-letter code followed by its
quantity in digits (``a``/``one`` -> 1, ``two`` -> 2, ``3`` -> 3); where it is eaten
("to go", "for here") is said but not coded.  A version that also coded it (``TOGO``/``HERE``,
first or last) was learnt too slowly for the quickstart: after 24-40 LoRA steps SmolLM2-135M
got every item right but guessed that word (held-out exact match 30-57%).

Held-out orders are combinations never seen in training (the rule is what is
learnt, not the strings).  Deterministic for the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# item (singular, plural) -> till code; most codes are the first three letters, a few are not.
MENU = {
    ("latte", "lattes"): "LAT",
    ("espresso", "espressos"): "ESP",
    ("cappuccino", "cappuccinos"): "CAP",
    ("tea", "teas"): "TEA",
    ("hot chocolate", "hot chocolates"): "HCH",
    ("orange juice", "orange juices"): "OJU",
    ("croissant", "croissants"): "CRO",
    ("muffin", "muffins"): "MUF",
    ("bagel", "bagels"): "BAG",
    ("cookie", "cookies"): "COO",
    ("scone", "scones"): "SCO",
    ("brownie", "brownies"): "BRO",
}
COUNTS = {1: ["a", "one", "1"], 2: ["two", "2"], 3: ["three", "3"], 4: ["four", "4"]}
AWAY = ["to go", "to take away", "takeaway"]
HERE = ["for here", "to eat in", ""]
OPENINGS = ["", "Hi, ", "Can I get ", "I'd like ", "Could I have ", "Please, ", "Hello! "]
CLOSINGS = [".", ", please.", ", thanks.", "!", " please.", "?"]


def _phrase(count: int, names: tuple[str, str], rng: random.Random) -> str:
    word = rng.choice(COUNTS[count])
    name = names[0] if count == 1 else names[1]
    if word == "a" and name[0] in "aeiou":
        word = "an"
    return f"{word} {name}"


def _join(parts: list[str]) -> str:
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def order(rng: random.Random) -> tuple[str, str]:
    """One (customer's words, ticket code) pair."""
    items = rng.sample(list(MENU), rng.randint(1, 3))
    counts = [rng.choice([1, 1, 2, 2, 3, 4]) for _ in items]
    away = rng.random() < 0.5
    where = rng.choice(AWAY if away else HERE)
    body = _join([_phrase(n, names, rng) for n, names in zip(counts, items, strict=True)])
    text = rng.choice(OPENINGS) + body + (f" {where}" if where else "") + rng.choice(CLOSINGS)
    text = text[0].upper() + text[1:]
    code = " ".join(f"{MENU[names]}{n}" for n, names in zip(counts, items, strict=True))
    return text, code


def _row(text: str, code: str) -> dict:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": code}]}


def main(out: Path = Path("src/tunelab/assets/quickstart"), seed: int = 21, train: int = 400, valid: int = 40) -> None:
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    seen_codes: set[str] = set()
    while len(rows) < train:
        text, code = order(rng)
        rows.append((text, code))
        seen_codes.add(code)
    held: list[tuple[str, str]] = []
    while len(held) < valid:  # a held-out order is one whose ticket was never in training
        text, code = order(rng)
        if code not in seen_codes:
            held.append((text, code))
            seen_codes.add(code)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("orders-train.jsonl", rows), ("orders-valid.jsonl", held)):
        (out / name).write_text("".join(json.dumps(_row(*r)) + "\n" for r in part), encoding="utf-8")


if __name__ == "__main__":
    main()
