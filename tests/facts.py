"""200 short synthetic facts (names, numbers, preferences) and questions about them, for the
long-conversation memory test and bench/inject.py. Deterministic."""
from __future__ import annotations

NAMES = ["Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jamal", "Keiko", "Luca",
         "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wes", "Xenia",
         "Yusuf", "Zara", "Arjun", "Bianca", "Conor", "Dalia", "Emil", "Fiona", "Goran", "Hana", "Ivo", "Jana",
         "Kofi", "Lena", "Marco", "Nadia"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Hanoi", "Dublin", "Nairobi", "Quito", "Kyoto", "Perth", "Tunis", "Riga"]
PETS = ["a cat", "a dog", "a parrot", "a rabbit", "a turtle", "a hamster", "a goldfish", "a horse"]
FOODS = ["pizza", "sushi", "pasta", "curry", "tacos", "dumplings", "paella", "falafel", "ramen", "pancakes"]


def facts() -> list[tuple[str, str, str]]:
    """(fact, question, answer) for 40 names x 5 attributes = 200 facts."""
    out = []
    for i, n in enumerate(NAMES):
        colour, city = COLOURS[(3 * i) % len(COLOURS)], CITIES[(5 * i + 1) % len(CITIES)]
        pet, food = PETS[(7 * i + 2) % len(PETS)], FOODS[(3 * i + 4) % len(FOODS)]
        age = 21 + (i * 7) % 53
        out += [(f"{n}'s favourite colour is {colour}.", f"What is {n}'s favourite colour?", colour),
                (f"{n} lives in {city}.", f"In which city does {n} live?", city),
                (f"{n} is {age} years old.", f"How old is {n}?", str(age)),
                (f"{n} has {pet} as a pet.", f"What pet does {n} have?", pet.split()[-1]),
                (f"{n}'s favourite food is {food}.", f"What is {n}'s favourite food?", food)]
    return out


def questions(n: int = 20) -> list[int]:
    """Indices of the facts asked about: spread over names and attributes."""
    return [(i * 37 + i // 5) % 200 for i in range(n)]
