"""Regenerate the quickstart's shipped data (src/tunelab/assets/quickstart/).

Two sets, both written from templates here, deterministic for the seed:
- ``corpus.jsonl`` (text): short grocery sentences plus chat-formatted exchanges of
  *other* tasks (counting, repeating, picking the first item).  The quickstart
  "pretrains" its tiny random model on it, so the base knows the words and the
  chat markers, like an instruct model does.
- ``train.jsonl`` / ``valid.jsonl`` (chat): the fine-tuning task the base has
  never seen — turn a comma-separated request into a bulleted shopping list
  with a count.  Valid prompts are held out from training.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ITEMS = [
    "apples",
    "bananas",
    "bread",
    "butter",
    "carrots",
    "cheese",
    "chicken",
    "coffee",
    "eggs",
    "flour",
    "garlic",
    "grapes",
    "honey",
    "jam",
    "lemons",
    "lettuce",
    "milk",
    "mushrooms",
    "noodles",
    "oats",
    "olives",
    "onions",
    "oranges",
    "pasta",
    "peanuts",
    "pears",
    "pepper",
    "potatoes",
    "rice",
    "salt",
    "soap",
    "spinach",
    "sugar",
    "tea",
    "tomatoes",
    "yogurt",
    "beans",
    "cereal",
    "cookies",
    "juice",
]
PEOPLE = ["Anna", "Ben", "Carla", "Dev", "Ella", "Finn", "Gita", "Hugo", "Ines", "Jon"]
PLACES = ["the market", "the shop", "the corner store", "the bakery", "the farm stand"]
ASKS = ["Make a shopping list", "Turn this into a list", "Write these as a list", "List these items"]


def _join(xs: list[str]) -> str:
    return ", ".join(xs[:-1]) + " and " + xs[-1] if len(xs) > 1 else xs[0]


def _sentence(rng: random.Random) -> str:
    pick = rng.randrange(6)
    who, where = rng.choice(PEOPLE), rng.choice(PLACES)
    if pick == 0:
        return f"{who} went to {where} and bought {_join(rng.sample(ITEMS, rng.randint(2, 4)))}."
    if pick == 1:
        return f"We are out of {_join(rng.sample(ITEMS, rng.randint(1, 3)))}, so {who} will get some tomorrow."
    if pick == 2:
        return f"For dinner {who} cooked {rng.choice(ITEMS)} with {rng.choice(ITEMS)}."
    if pick == 3:
        return f"There are {rng.randint(2, 9)} {rng.choice(ITEMS)} on the table."
    if pick == 4:
        return f"{who} asked for {rng.choice(ITEMS)}, but {where} had only {rng.choice(ITEMS)}."
    return f"Remember to buy {_join(rng.sample(ITEMS, rng.randint(2, 5)))}."


def _other_task(rng: random.Random) -> str:
    xs = rng.sample(ITEMS, rng.randint(2, 5))
    kind = rng.random()
    if kind < 0.4:
        user, answer = f"Repeat these: {', '.join(xs)}", ", ".join(xs)
    elif kind < 0.7:
        user, answer = f"How many things are in: {', '.join(xs)}?", f"There are {len(xs)} things."
    else:
        user, answer = f"Which of these is first: {', '.join(xs)}?", f"The first one is {xs[0]}."
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def _task(rng: random.Random) -> dict:
    xs = rng.sample(ITEMS, rng.randint(2, 5))
    user = f"{rng.choice(ASKS)}: {', '.join(xs)}"
    answer = "Shopping list:\n" + "\n".join(f"- {x}" for x in xs) + f"\n({len(xs)} items)"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def main(out: Path = Path("src/tunelab/assets/quickstart"), seed: int = 11) -> None:
    rng = random.Random(seed)
    corpus = [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))} for _ in range(1200)]
    corpus += [{"text": _other_task(rng)} for _ in range(1200)]
    rng.shuffle(corpus)
    task = [_task(rng) for _ in range(1200)]
    seen = {t["messages"][0]["content"] for t in task[:1100]}
    valid = [t for t in task[1100:] if t["messages"][0]["content"] not in seen]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("train.jsonl", task[:1100]), ("valid.jsonl", valid)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
