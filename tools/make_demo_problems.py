"""Regenerate tokenskip/data/demo_arithmetic.jsonl: the embedded demo's problem set.

One-step addition/subtraction word problems with small numbers: the embedded demo model
(SmolLM2-135M-Instruct, 135M parameters) solves some of these and almost no GSM8K problem, so the
demo produces real kept samples on a laptop. Deterministic (fixed seed).
"""

import json
import random
from pathlib import Path

NAMES = ["Tom", "Anna", "Sam", "Mia", "Leo", "Zoe", "Ben", "Ivy"]
ITEMS = ["apples", "books", "pens", "cards", "coins", "shells", "stickers", "marbles"]


def problems(count: int = 48, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        kind = i % 3
        if kind == 0:
            q, ans = f"What is {a} + {b}?", a + b
        elif kind == 1:
            q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
        else:
            a = max(a, b + 1)
            q, ans = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
        out.append({"id": f"demo-{i:03d}", "question": q, "answer": str(ans)})
    return out


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "tokenskip" / "data" / "demo_arithmetic.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems()))
    print(f"wrote {path}")
