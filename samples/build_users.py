#!/usr/bin/env python3
"""Build the three sample per-user datasets in samples/users/.

Stdlib only, offline and deterministic: running it twice (with the same
CPython version, see python_help below) writes byte-identical files.

    python samples/build_users.py              # writes samples/users/
    python samples/build_users.py --out DIR    # writes DIR/<user_id>/...

Users (see samples/README.md):
  terse_notes  prose about a meeting/errand/plan -> 2-4 terse "- " note lines
  python_help  Python questions -> "Python docs (<topic>): ..." answers taken
               from CPython's own pydoc_data.topics (PSF license)
  json_reply   short assistant requests -> one compact JSON object
               {"intent":...,"entities":{...},"reply":...}

Everything except the pydoc_data text is composed from the hand-written
templates and word lists in this file (written for this project).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
from pathlib import Path

SEED = 20240611
N_TRAIN = 240
N_HELDOUT = 40
MAX_CHARS = 400  # prompt + response, ~110 SmolLM2 tokens at most

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "users"
PROJECT_LICENSE = "Apache-2.0 (written for this project, same license as lowra)"


# ---------------------------------------------------------------------------
# helpers


def _split(pool: list, n_heldout: int) -> tuple[list, list]:
    """Last n_heldout entries of a hand-written list are held out."""
    return pool[:-n_heldout], pool[-n_heldout:]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(rng: random.Random, make, n: int, taken: set[str]) -> list[dict]:
    """Call make(rng) until n examples with new prompts (not in taken)."""
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise RuntimeError("could not generate enough distinct examples")
        prompt, response = make(rng)
        if prompt in taken or len(prompt) + len(response) > MAX_CHARS:
            continue
        taken.add(prompt)
        out.append({"prompt": prompt, "response": response})
    return out


# ---------------------------------------------------------------------------
# user 1: terse_notes

# Word lists. Each list is split: the last few entries are held out and only
# appear in heldout.jsonl, so held-out measures the note *style* on unseen
# entities. Names are written capitalised in prose and lowercased in notes.
TN_PEOPLE = [
    "Priya", "Marcus", "Elena", "Tom", "Aisha", "Kenji", "Laura", "Omar",
    "Sofia", "Ben", "Grace", "Diego", "Hannah", "Ravi", "Chloe", "Felix",
    "Nadia", "Sam", "Ingrid", "Jamal", "Mei", "Lucas",
    # held out
    "Tariq", "Yuki", "Beatriz", "Connor", "Amara", "Henrik",
]
TN_PLACES = [
    "office", "cafe on Main Street", "library", "town hall", "conference room",
    "community center", "lab", "studio", "hotel lobby", "park", "train station",
    "school gym",
    # held out
    "rooftop bar", "museum", "warehouse",
]
TN_TOPICS = [
    "budget", "product launch", "hiring plan", "quarterly report", "website redesign",
    "marketing campaign", "client contract", "team offsite", "sales numbers",
    "project timeline", "new office layout", "training schedule", "vendor invoices",
    "holiday rota",
    # held out
    "pricing strategy", "security audit", "charity drive", "mobile app",
]
TN_DOCS = [  # things that can be due
    "quarterly report", "budget draft", "presentation slides", "grant application",
    "expense report", "design mockups", "meeting minutes", "tax return", "project proposal",
    "department newsletter",
    # held out
    "press release", "customer survey", "training manual",
]
# (prose, note) pairs; the note form is what every note line uses.
TN_DAYS = [
    ("on Monday", "mon"), ("on Tuesday", "tue"), ("on Wednesday", "wed"),
    ("on Thursday", "thu"), ("on Friday", "fri"), ("on Saturday", "sat"),
    ("on Sunday", "sun"), ("tomorrow", "tmrw"), ("today", "today"),
    ("next Monday", "next mon"), ("next Friday", "next fri"),
    ("this weekend", "this wknd"), ("tomorrow morning", "tmrw am"),
    ("tomorrow afternoon", "tmrw pm"), ("next week", "next wk"),
]
TN_TIMES = [
    ("9 am", "9am"), ("10 am", "10am"), ("11:30 am", "11:30am"), ("noon", "12pm"),
    ("1 pm", "1pm"), ("2:30 pm", "2:30pm"), ("4 pm", "4pm"), ("6 pm", "6pm"),
    ("7:30 pm", "7:30pm"), ("8 am", "8am"),
]
# store -> things bought there; the last stores (with their items) are held out
TN_SHOPS = [
    ("pharmacy", ["the prescription", "some sunscreen", "a box of plasters", "some cough syrup",
                  "a toothbrush"]),
    ("hardware store", ["two light bulbs", "a tape measure", "some batteries", "a box of screws",
                        "a new extension cord"]),
    ("supermarket", ["some milk", "a bag of rice", "fresh bread", "a pack of coffee",
                     "a bottle of wine", "some eggs"]),
    ("post office", ["the parcel", "a book of stamps", "a box of envelopes", "the registered letter"]),
    ("bakery", ["fresh bread", "a birthday cake", "some croissants", "a loaf of rye"]),
    ("pet shop", ["some dog food", "a new leash", "cat litter", "a bag of bird seed"]),
    ("garden center", ["some flowers", "a bag of compost", "tomato seedlings", "a watering can"]),
    ("dry cleaner", ["the dry cleaning", "the suit", "the winter coat"]),
    # held out
    ("bookshop", ["two notebooks", "a birthday card", "the cookbook", "a city map"]),
    ("electronics store", ["a new charger", "a phone case", "an hdmi cable", "some headphones"]),
    ("farmers market", ["some apples", "a jar of honey", "fresh herbs", "a dozen eggs"]),
]
TN_APPTS = [
    "dentist", "doctor", "vet", "barber", "eye doctor", "physio",
    # held out
    "dermatologist", "tax advisor",
]
TN_EVENTS = [
    "birthday party", "farewell lunch", "housewarming", "dinner party",
    "retirement party", "baby shower", "game night",
    # held out
    "graduation party", "book club meeting",
]
TN_VENUES = [
    "community center", "park", "pub on King Street", "beach", "bowling alley",
    "restaurant downtown", "garden", "rooftop terrace",
    # held out
    "boathouse", "wine bar", "lake house",
]
TN_CITIES = [
    "Lisbon", "Boston", "Berlin", "Denver", "Kyoto", "Madrid", "Seattle",
    "Prague", "Austin", "Dublin",
    # held out
    "Oslo", "Nairobi", "Montreal",
]
TN_DECISIONS = [
    "move the launch to next week", "hire two more engineers",
    "cut the travel budget", "switch to a new supplier",
    "postpone the team offsite", "keep the current pricing",
    "split the project into two phases", "send the contract to legal",
    "review the numbers again with the department",
    "cancel the weekly meeting", "share the document with the client",
    "use the bigger conference room", "order pizza for everyone",
    "start the project in March",
    # held out
    "drop the old logo", "run a survey with customers",
    "ask the board for more money", "merge the two teams",
]
TN_ACTIONS = [
    "print the agenda", "book a room", "send the slides to the team",
    "charge the laptop", "confirm the time with everyone", "bring the contract",
    "update the schedule", "reply to the client", "buy a gift",
    "check the train times", "pack an umbrella", "water the plants",
    "pick up the presentation from the printer", "call the landlord",
    "back up the documents", "pay the invoice",
    # held out
    "reserve a parking spot", "email the photographer", "test the projector",
    "order the name badges",
]
TN_BRING = [
    "the snacks", "a projector", "the drinks", "a cake", "the sound system",
    "the name tags", "some chairs", "the board games", "a salad",
    # held out
    "the camera", "a speaker", "the decorations",
]

# Abbreviations applied to every free phrase in a note, always the same way.
TN_ABBR = {
    "meeting": "mtg", "meetings": "mtgs", "with": "w/", "without": "w/o",
    "tomorrow": "tmrw", "about": "re", "appointment": "appt", "and": "+",
    "week": "wk", "weeks": "wks", "minutes": "min", "hours": "hrs",
    "hour": "hr", "information": "info", "documents": "docs", "document": "doc",
    "presentation": "pres", "department": "dept", "project": "proj",
    "schedule": "sched", "message": "msg", "people": "ppl",
    "birthday": "bday", "everyone": "all", "before": "b4",
    "street": "st", "conference": "conf",
    "two": "2", "three": "3", "four": "4",
}
TN_DROP = {"a", "an", "the", "some", "please"}


def tn_abbr(phrase: str) -> str:
    words = []
    for w in phrase.lower().split():
        if w in TN_DROP:
            continue
        words.append(TN_ABBR.get(w, w))
    return " ".join(words)


def _tn_pools(heldout: bool) -> dict:
    lists = {
        "people": (TN_PEOPLE, 6), "places": (TN_PLACES, 3), "topics": (TN_TOPICS, 4), "docs": (TN_DOCS, 3),
        "shops": (TN_SHOPS, 3), "appts": (TN_APPTS, 2),
        "events": (TN_EVENTS, 2), "venues": (TN_VENUES, 3), "cities": (TN_CITIES, 3),
        "decisions": (TN_DECISIONS, 4), "actions": (TN_ACTIONS, 4), "bring": (TN_BRING, 3),
    }
    pools = {k: _split(v, n)[1 if heldout else 0] for k, (v, n) in lists.items()}
    pools["days"] = TN_DAYS
    pools["times"] = TN_TIMES
    return pools


def _tn_main(rng: random.Random, P: dict, who: str) -> tuple[str, str]:
    kind = rng.choice(["meeting", "call", "errand", "appt", "event", "trip"])
    day, dayn = rng.choice(P["days"])
    if kind == "meeting":
        place, topic = rng.choice(P["places"]), rng.choice(P["topics"])
        prose = rng.choice([
            f"{_cap(day)} I have a meeting with {who} at the {place} about the {topic}.",
            f"I'm meeting {who} at the {place} {day} to talk about the {topic}.",
            f"There is a meeting with {who} {day} at the {place} about the {topic}.",
        ])
        note = f"- mtg w/ {who.lower()} {dayn} @ {tn_abbr(place)} re {tn_abbr(topic)}"
    elif kind == "call":
        topic = rng.choice(P["topics"])
        prose = rng.choice([
            f"I need to call {who} {day} about the {topic}.",
            f"{_cap(day)} I have to phone {who} about the {topic}.",
        ])
        note = f"- call {who.lower()} {dayn} re {tn_abbr(topic)}"
    elif kind == "errand":
        store, items = rng.choice(P["shops"])
        i1, i2 = rng.sample(items, 2)
        prose = rng.choice([
            f"{_cap(day)} I need to stop by the {store} for {i1} and {i2}.",
            f"I have to go to the {store} {day} to pick up {i1} and {i2}.",
        ])
        note = f"- {tn_abbr(store)} {dayn}: get {tn_abbr(i1)} + {tn_abbr(i2)}"
    elif kind == "appt":
        day, dayn = rng.choice([d for d in P["days"] if d[1][-2:] not in ("am", "pm")])
        appt = rng.choice(P["appts"])
        t, tn = rng.choice(P["times"])
        prose = rng.choice([
            f"I have a {appt} appointment {day} at {t}.",
            f"{_cap(day)} at {t} I have an appointment with the {appt}.",
        ])
        note = f"- {tn_abbr(appt)} appt {dayn} {tn}"
    elif kind == "event":
        event, place = rng.choice(P["events"]), rng.choice(P["venues"])
        prose = rng.choice([
            f"{who} is having a {event} {day} at the {place}.",
            f"There is a {event} for {who} {day} at the {place}.",
        ])
        note = f"- {who.lower()} {tn_abbr(event)} {dayn} @ {tn_abbr(place)}"
    else:  # trip
        day, dayn = rng.choice([d for d in P["days"] if d[1][-2:] not in ("am", "pm")])
        city = rng.choice(P["cities"])
        t, tn = rng.choice(P["times"])
        prose = rng.choice([
            f"We are planning a trip to {city} {day}, leaving at {t}.",
            f"{_cap(day)} we head to {city} for a short trip, leaving at {t}.",
        ])
        note = f"- trip to {city.lower()} {dayn}, leave {tn}"
    return prose, note


def _tn_extra(kind: str, rng: random.Random, P: dict, other: str) -> tuple[str, str]:
    if kind == "decision":
        d = rng.choice(P["decisions"])
        prose = rng.choice([f"We decided to {d}.", f"We agreed to {d}.",
                            f"The decision was to {d}."])
        return prose, f"- decided: {tn_abbr(d)}"
    if kind == "todo":
        a = rng.choice(P["actions"])
        prose = rng.choice([f"I need to {a} first.", f"Remember to {a}.",
                            f"Don't forget to {a}.", f"I should {a} beforehand."])
        return prose, f"- todo: {tn_abbr(a)}"
    if kind == "bring":
        b = rng.choice(P["bring"])
        prose = rng.choice([f"{other} will bring {b}.", f"{other} said they would bring {b}."])
        return prose, f"- {other.lower()} brings {tn_abbr(b)}"
    if kind == "absent":
        prose = rng.choice([f"{other} can't make it.", f"{other} won't be there.",
                            f"Unfortunately {other} is not able to come."])
        return prose, f"- {other.lower()} out"
    if kind == "duration":
        if rng.random() < 0.6:
            n = rng.choice([15, 20, 30, 45, 90])
            prose = rng.choice([f"It should take about {n} minutes.",
                                f"Plan for roughly {n} minutes."])
            return prose, f"- ~{n} min"
        n = rng.choice([2, 3, 4])
        prose = rng.choice([f"It should take about {n} hours.", f"Plan for roughly {n} hours."])
        return prose, f"- ~{n} hrs"
    # deadline
    topic = rng.choice(P["docs"])
    day, dayn = rng.choice(P["days"])
    prose = rng.choice([f"The {topic} is due {day}.", f"The deadline for the {topic} is {day}."])
    return prose, f"- {tn_abbr(topic)} due {dayn}"


def _tn_maker(heldout: bool):
    P = _tn_pools(heldout)

    def make(rng: random.Random) -> tuple[str, str]:
        who, other, absent = rng.sample(P["people"], 3)
        prose, note = _tn_main(rng, P, who)
        k = rng.choice([1, 1, 2, 2, 3])
        kinds = rng.sample(["decision", "todo", "bring", "absent", "duration", "deadline"], k)
        sentences, notes = [prose], [note]
        for kind in kinds:
            s, n = _tn_extra(kind, rng, P, absent if kind == "absent" else other)
            sentences.append(s)
            notes.append(n)
        return " ".join(sentences), "\n".join(notes)

    return make


def build_terse_notes() -> tuple[list, list, dict]:
    rng = random.Random(SEED + 1)
    taken: set[str] = set()
    train = _fill(rng, _tn_maker(False), N_TRAIN, taken)
    heldout = _fill(rng, _tn_maker(True), N_HELDOUT, taken)
    meta = {
        "id": "terse_notes",
        "task": "turn a short prose description of a meeting, errand, plan or event into terse notes",
        "style": ("2-4 lines, each starting with '- ', all lowercase, no articles, one line per "
                  "sentence in order; fixed abbreviations (mtg, w/, re, @, tmrw, appt, wk, +, ~N min, "
                  "decided:, todo:)"),
        "source": ("hand-written templates and word lists in samples/build_users.py; held-out uses "
                   "held-out people, places, topics, items and phrases"),
        "license": PROJECT_LICENSE,
    }
    return train, heldout, meta


# ---------------------------------------------------------------------------
# user 2: python_help

PH_PREFIX = "Python docs ({topic}): "
PH_MAX_ANSWER = 280  # characters of doc text after the prefix
PH_N_HELDOUT_TOPICS = 10
# Topics whose opening text is a table, a bare list or a method signature
# rather than a sentence that says what the thing is.
PH_SKIP = {"operator-summary", "numeric-types", "callable-types", "customization",
           "typesmethods", "id-classes"}

PH_GENERIC = [
    "What does the Python documentation say about {s}?",
    "Can you explain {s} in Python?",
    "Give me a quick summary of {s} in Python.",
    "Python question: what should I know about {s}?",
    "Explain {s} in Python, please.",
    "Tell me about {s} in Python.",
    "I'm confused about {s} in Python. Can you help?",
    "What's the gist of {s} in Python?",
]
PH_PROPER = {"Python", "Boolean"}
# Hand-written question subjects where the heading alone reads badly.
PH_SUBJECT = {
    "async": "coroutines and `async def`",
    "await": "the `await` expression",
    "context-managers": "`with` statement context managers",
    "execmodel": "the execution model",
    "formatstrings": "the format string syntax",
    "in": "the membership operators `in` and `not in`",
    "typesfunctions": "function objects",
    "typesmodules": "module objects",
    "dynamic-features": "name resolution and dynamic features",
}
PH_STATEMENT = [
    "What does the `{k}` statement do in Python?",
    "How do I use the `{k}` statement in Python?",
    "What is the `{k}` statement for?",
]


def _ph_literals(text: str) -> str:
    """Sphinx text output marks inline literals as "x"; make them `x`."""
    text = re.sub(r'‘"([^"\n]+)"’', r"`\1`", text)
    text = re.sub(r'"([^"\n]+)"', r"`\1`", text)
    text = re.sub(r"\*\*([^*\n]+)\*\*", r"\1", text)  # **strong**
    text = re.sub(r"\*([^*\s][^*\n]*)\*", r"\1", text)  # *emphasis* / *term*
    text = text.replace("“", '"').replace("”", '"').replace("‘", "'").replace("’", "'")
    text = text.replace("…", "...")
    return text


def _ph_subject(heading: str) -> tuple[str, str | None]:
    """Heading -> (subject phrase for questions, statement keyword or None)."""
    m = re.fullmatch(r'The "(\w+)" statement', heading)
    if m:
        return f"the `{m.group(1)}` statement", m.group(1)
    heading = heading.split(" — ")[0]
    words = []
    for w in _ph_literals(heading).split():
        # headings are title case; lowercase plain capitalised words
        if re.fullmatch(r"\(?[A-Z][a-z]+\)?,?", w) and w.strip("(),") not in PH_PROPER:
            w = w.lower()
        words.append(w)
    return " ".join(words), None


def _ph_paragraphs(text: str) -> list[str]:
    """Top-level prose paragraphs, skipping headings, grammar/code blocks,
    bullet lists, version notes and bare signatures."""
    lines = text.split("\n")
    paras, cur = [], []

    def flush():
        if cur:
            # Sphinx wraps lines at hyphens ("non-\nnumeric"): rejoin those without a space
            para = cur[0]
            for ln in cur[1:]:
                para += ln if re.search(r"[A-Za-z]-$", para) else " " + ln
            paras.append(para)
            cur.clear()

    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not line.strip():
            flush()
            continue
        if re.fullmatch(r"[*=\-]{3,}", line.strip()):
            flush()  # heading underline
            continue
        if nxt.strip() and re.fullmatch(r"[*=\-]{3,}", nxt.strip()):
            flush()  # heading text
            continue
        if line.startswith(" ") or line.startswith("* ") or re.match(r"\d+\. ", line):
            flush()  # indented block, bullet or numbered list
            continue
        cur.append(line.strip())
    flush()
    out = []
    for p in paras:
        if p.startswith(("New in version", "Changed in version", "Source code:",
                         "Added in version", "Deprecated")):
            continue
        if re.fullmatch(r"[\w.]+\(.*\)", p) or re.fullmatch(r"[\w.]+", p):
            continue  # signature or bare name
        out.append(p)
    return out


_ABBREV = ("e.g.", "i.e.", "etc.", "vs.", "cf.")


def _ph_sentences(para: str) -> list[str]:
    """Split at . ! ? followed by a capital, backtick or paren (not after e.g.)."""
    sents, start = [], 0
    for m in re.finditer(r"[.!?](?=\s+[A-Z`(])", para):
        chunk = para[start:m.end()].strip()
        if chunk.endswith(_ABBREV):
            continue
        sents.append(chunk)
        start = m.end()
    rest = para[start:].strip()
    if rest:
        sents.append(rest)
    return sents


def ph_answer(text: str) -> str | None:
    """First one or two sentences of a topic, cleaned, <= PH_MAX_ANSWER chars.

    The first sentence may end in ':' (it introduces a grammar rule or code
    block); it then ends in '.'. A second sentence is added only if it is a
    complete sentence (ends in . ! ?), is not a cross-reference ("See
    section ...") and still fits."""
    paras = _ph_paragraphs(text)
    if not paras:
        return None
    sents = []
    for p in paras[:2]:
        sents.extend(_ph_sentences(re.sub(r"\s+", " ", _ph_literals(p))))
    first = sents[0]
    if first.endswith(":"):
        first = first[:-1] + "."
    if not first.endswith((".", "!", "?")) or len(first) > PH_MAX_ANSWER:
        return None
    answer = first
    if len(sents) > 1:
        second = sents[1]
        ok = second.endswith((".", "!", "?")) and not re.match(r"\(?See\b", second)
        if ok and len(answer) + 1 + len(second) <= PH_MAX_ANSWER:
            answer += " " + second
    return answer if len(answer) >= 40 else None


def _ph_topics() -> list[dict]:
    from pydoc_data.topics import topics

    seen, out = set(), []
    # prefer the key named in the heading when two keys share a heading
    # (e.g. "if" and "else" both hold 'The "if" statement')
    def order(k):
        head = topics[k].split("\n", 1)[0]
        return (f'"{k}"' not in head, k)

    for key in sorted(topics, key=order):
        if key in PH_SKIP:
            continue
        head = topics[key].split("\n", 1)[0].strip()
        if head in seen:
            continue
        answer = ph_answer(topics[key])
        if answer is None:
            continue
        seen.add(head)
        subject, kw = _ph_subject(head)
        subject = PH_SUBJECT.get(key, subject)
        out.append({"key": key, "subject": subject, "kw": kw, "answer": answer})
    out.sort(key=lambda t: t["key"])
    return out


def _ph_prompts(t: dict) -> list[str]:
    prompts = [p.format(s=t["subject"]) for p in PH_GENERIC]
    if t["kw"]:
        prompts += [p.format(k=t["kw"]) for p in PH_STATEMENT]
    return prompts


def _ph_examples(rng: random.Random, topics: list[dict], n: int) -> list[dict]:
    """n examples spread evenly over topics, distinct phrasings per topic."""
    shuffled = [(t, rng.sample(_ph_prompts(t), len(_ph_prompts(t)))) for t in topics]
    out, r = [], 0
    while len(out) < n:
        for t, prompts in shuffled:
            if len(out) == n:
                break
            if r < len(prompts):
                resp = PH_PREFIX.format(topic=t["key"]) + t["answer"]
                out.append({"prompt": prompts[r], "response": resp})
        r += 1
        if r > 20:
            raise RuntimeError("not enough topics/phrasings")
    rng.shuffle(out)
    return out


def build_python_help() -> tuple[list, list, dict]:
    rng = random.Random(SEED + 2)
    topics = _ph_topics()
    keys = [t["key"] for t in topics]
    held = set(rng.sample(keys, PH_N_HELDOUT_TOPICS))
    train = _ph_examples(rng, [t for t in topics if t["key"] not in held], N_TRAIN)
    heldout = _ph_examples(rng, [t for t in topics if t["key"] in held], N_HELDOUT)
    meta = {
        "id": "python_help",
        "task": "answer Python language questions from CPython's own reference documentation",
        "style": ("one line: 'Python docs (<topic>): ' then the first one or two sentences of that "
                  "pydoc topic, inline code in backticks, <= 280 characters, ends at a sentence boundary"),
        "source": (f"CPython {platform.python_version()} pydoc_data.topics (Lib/pydoc_data/topics.py, "
                   "rendered from the Python Language Reference); question templates hand-written in "
                   "samples/build_users.py; held-out topics: " + ", ".join(sorted(held))),
        "license": ("answers: PSF License Version 2 (Python documentation text); "
                    "question templates: " + PROJECT_LICENSE),
    }
    return train, heldout, meta


# ---------------------------------------------------------------------------
# user 3: json_reply

JR_TASKS = [
    "call mom", "water the plants", "take out the trash", "pay the rent",
    "buy milk", "send the report", "book a dentist visit", "feed the cat",
    "renew my passport", "pick up the kids", "submit the timesheet",
    "stretch", "check the oven", "return the library books",
    # held out
    "call the plumber", "back up my laptop", "order a birthday gift",
]
JR_DATES = ["today", "tomorrow", "tonight", "on Monday", "on Friday", "this weekend",
            "next Tuesday", "on Saturday"]
JR_TIMES = ["7am", "8:30am", "9am", "noon", "1pm", "3:15pm", "5pm", "6pm", "7:30pm", "9pm"]
JR_RESTAURANTS = [
    "Luigi's", "The Green Fork", "Sakura House", "Casa Lupe", "The Old Mill",
    "Blue Lotus", "Harbor Grill", "Bistro 21",
    # held out
    "Saffron Garden", "The Copper Pot",
]
JR_UNITS = [  # (from, to, sample values)
    ("miles", "kilometers", [3, 5, 10, 26.2]), ("kilograms", "pounds", [2, 5, 70]),
    ("cups", "milliliters", [1, 2, 3]), ("feet", "meters", [6, 12, 100]),
    ("celsius", "fahrenheit", [20, 37, 100]), ("ounces", "grams", [4, 8, 16]),
    ("liters", "gallons", [2, 10, 50]),
    # held out
    ("inches", "centimeters", [7, 12, 30]), ("yards", "meters", [50, 100]),
]
JR_CONTACTS = [
    "Sam", "Mom", "Dad", "Alex", "Priya", "Jordan", "Maria", "Chris", "Lena",
    "Noah", "Grandma",
    # held out
    "Ahmed", "Zoe", "Uncle Bill",
]
JR_MESSAGES = [
    "I'm running late", "dinner is at 7", "I'll call you back", "I'll be home by 8",
    "the meeting moved to 3", "we need more bread", "I landed safely",
    "see you at the gym", "don't forget the tickets", "I'm outside",
    "thanks for today",
    # held out
    "the train is delayed", "I left my keys at home", "let's meet at noon",
]
JR_CITIES = ["Paris", "Tokyo", "Chicago", "Sydney", "Toronto", "London", "Rome",
             "Denver", "Mumbai",
             # held out
             "Cairo", "Reykjavik", "Lima"]
JR_MUSIC = ["some jazz", "lo-fi beats", "the Beatles", "classical piano", "Taylor Swift",
            "80s rock", "Miles Davis", "relaxing rain sounds", "Daft Punk",
            # held out
            "bossa nova", "Fleetwood Mac", "movie soundtracks"]
# list -> things that go on it; the last list (with its items) is held out,
# and so are the last two items of every other list
JR_LIST_ITEMS = [
    ("grocery", ["eggs", "olive oil", "bananas", "coffee", "rice", "oat milk", "lemons", "yogurt"]),
    ("shopping", ["paper towels", "dish soap", "toothpaste", "batteries", "trash bags",
                  "light bulbs"]),
    ("hardware", ["wood glue", "sandpaper", "a hammer", "screws", "duct tape", "paint rollers"]),
    ("party", ["balloons", "paper plates", "ice", "candles", "napkins", "chips"]),
    ("packing", ["sunglasses", "a swimsuit", "my passport", "a travel adapter", "hiking boots",
                 "a phone charger"]),
    # held out
    ("camping", ["a tent", "bug spray", "marshmallows", "a flashlight"]),
]
JR_LABELS = ["pasta", "eggs", "laundry", "tea", "pizza", "workout", "nap",
             # held out
             "bread", "meditation"]
JR_PLACES = ["the airport", "the train station", "downtown", "the office", "the hospital",
             "the stadium", "my hotel",
             # held out
             "the museum", "the ferry terminal"]


def _jr_dump(intent: str, entities: dict, reply: str) -> str:
    return json.dumps({"intent": intent, "entities": entities, "reply": reply},
                      ensure_ascii=False, separators=(",", ":"))


def _jr_pools(heldout: bool) -> dict:
    lists = {
        "tasks": (JR_TASKS, 3), "restaurants": (JR_RESTAURANTS, 2), "units": (JR_UNITS, 2),
        "contacts": (JR_CONTACTS, 3), "messages": (JR_MESSAGES, 3), "cities": (JR_CITIES, 3),
        "music": (JR_MUSIC, 3),
        "labels": (JR_LABELS, 2), "places": (JR_PLACES, 2),
    }
    P = {k: _split(v, n)[1 if heldout else 0] for k, (v, n) in lists.items()}
    P["dates"], P["times"] = JR_DATES, JR_TIMES
    lists = [(name, _split(items, 2)[1 if heldout else 0]) for name, items in JR_LIST_ITEMS[:-1]]
    P["lists"] = lists + [JR_LIST_ITEMS[-1]] if heldout else lists
    return P


def _num(v) -> str:
    return str(v)


def _jr_intent(intent: str, rng: random.Random, P: dict) -> tuple[str, str]:
    if intent == "set_reminder":
        task, date, time = rng.choice(P["tasks"]), rng.choice(P["dates"]), rng.choice(P["times"])
        prompt = rng.choice([
            f"Remind me to {task} {date} at {time}.",
            f"Can you set a reminder to {task} {date} at {time}?",
            f"Please remind me {date} at {time} to {task}.",
            f"Set a reminder: {task}, {date} at {time}.",
        ])
        ent = {"task": task, "date": date, "time": time}
        return prompt, _jr_dump(intent, ent, f"Okay, I'll remind you to {task} {date} at {time}.")
    if intent == "book_table":
        r, n = rng.choice(P["restaurants"]), rng.choice([2, 3, 4, 5, 6, 8])
        date, time = rng.choice(P["dates"]), rng.choice(P["times"][3:])
        prompt = rng.choice([
            f"Book a table for {n} at {r} {date} at {time}.",
            f"Can you reserve a table at {r} for {n} people {date} at {time}?",
            f"I need a table for {n} at {r} {date}, {time}.",
            f"Get us a table at {r} {date} at {time}, we are {n}.",
        ])
        ent = {"restaurant": r, "party_size": n, "date": date, "time": time}
        return prompt, _jr_dump(intent, ent, f"Booking a table for {n} at {r} {date} at {time}.")
    if intent == "convert_units":
        frm, to, vals = rng.choice(P["units"])
        v = rng.choice(vals)
        prompt = rng.choice([
            f"Convert {_num(v)} {frm} to {to}.",
            f"How many {to} is {_num(v)} {frm}?",
            f"What is {_num(v)} {frm} in {to}?",
            f"{_num(v)} {frm} to {to}, please.",
        ])
        ent = {"value": v, "from_unit": frm, "to_unit": to}
        return prompt, _jr_dump(intent, ent, f"Converting {_num(v)} {frm} to {to}.")
    if intent == "send_message":
        c, msg = rng.choice(P["contacts"]), rng.choice(P["messages"])
        prompt = rng.choice([
            f"Text {c} that {msg}.",
            f"Send a message to {c} saying {msg}.",
            f"Tell {c} {msg}.",
            f"Message {c}: {msg}.",
        ])
        ent = {"contact": c, "message": msg}
        return prompt, _jr_dump(intent, ent, f"Sending your message to {c}.")
    if intent == "set_alarm":
        time = rng.choice(P["times"])
        date = rng.choice(P["dates"] + [None, None])
        when = f" {date}" if date else ""
        prompt = rng.choice([
            f"Wake me up at {time}{when}.",
            f"Set an alarm for {time}{when}.",
            f"I need an alarm at {time}{when}.",
        ])
        ent = {"time": time, "date": date}
        return prompt, _jr_dump(intent, ent, f"Alarm set for {time}{when}.")
    if intent == "get_weather":
        city, date = rng.choice(P["cities"]), rng.choice(P["dates"])
        prompt = rng.choice([
            f"What's the weather in {city} {date}?",
            f"Will it rain in {city} {date}?",
            f"Do I need an umbrella in {city} {date}?",
            f"How hot will it be in {city} {date}?",
        ])
        ent = {"city": city, "date": date}
        return prompt, _jr_dump(intent, ent, f"Checking the forecast for {city} {date}.")
    if intent == "play_music":
        q = rng.choice(P["music"])
        prompt = rng.choice([f"Play {q}.", f"Can you put on {q}?",
                             f"I want to listen to {q}.", f"Play {q} please."])
        return prompt, _jr_dump(intent, {"query": q}, f"Playing {q}.")
    if intent == "add_to_list":
        lst, items = rng.choice(P["lists"])
        item = rng.choice(items)
        prompt = rng.choice([
            f"Add {item} to my {lst} list.",
            f"Put {item} on the {lst} list.",
            f"Can you add {item} to the {lst} list?",
            f"{_cap(item)}: add to my {lst} list.",
        ])
        ent = {"item": item, "list": lst}
        return prompt, _jr_dump(intent, ent, f"Added {item} to your {lst} list.")
    if intent == "set_timer":
        n = rng.choice([3, 5, 8, 10, 12, 15, 20, 25, 30, 45])
        label = rng.choice(P["labels"] + [None, None])
        if label:
            prompt = rng.choice([f"Set a {n} minute timer for the {label}.",
                                 f"Timer for the {label}, {n} minutes.",
                                 f"Start a {n} minute {label} timer."])
            reply = f"{n} minute timer for the {label} started."
        else:
            prompt = rng.choice([f"Set a timer for {n} minutes.", f"Start a {n} minute timer.",
                                 f"Timer for {n} minutes please."])
            reply = f"{n} minute timer started."
        return prompt, _jr_dump(intent, {"duration_minutes": n, "label": label}, reply)
    # book_ride
    place, time = rng.choice(P["places"]), rng.choice(P["times"])
    date = rng.choice(P["dates"] + [None, None])
    when = f" {date}" if date else ""
    prompt = rng.choice([
        f"Get me a ride to {place}{when} at {time}.",
        f"Book a taxi to {place}{when} at {time}.",
        f"I need a car to {place} at {time}{when}.",
    ])
    ent = {"destination": place, "date": date, "time": time}
    return prompt, _jr_dump(intent, ent, f"Ride to {place}{when} at {time} requested.")


JR_INTENTS = ["set_reminder", "book_table", "convert_units", "send_message", "set_alarm",
              "get_weather", "play_music", "add_to_list", "set_timer", "book_ride"]


def _jr_examples(rng: random.Random, heldout: bool, n: int, taken: set[str]) -> list[dict]:
    P = _jr_pools(heldout)
    per = n // len(JR_INTENTS)
    out = []
    for intent in JR_INTENTS:
        out += _fill(rng, lambda r, i=intent: _jr_intent(i, r, P), per, taken)
    rng.shuffle(out)
    return out


def build_json_reply() -> tuple[list, list, dict]:
    rng = random.Random(SEED + 3)
    taken: set[str] = set()
    train = _jr_examples(rng, False, N_TRAIN, taken)
    heldout = _jr_examples(rng, True, N_HELDOUT, taken)
    meta = {
        "id": "json_reply",
        "task": "parse a short assistant request into one JSON object with intent, slots and a reply",
        "style": ('exactly one compact JSON object {"intent":...,"entities":{...},"reply":...}, keys '
                  "in that order, fixed per-intent entity keys (null when absent), no prose around it"),
        "source": ("hand-written templates and word lists in samples/build_users.py; held-out uses "
                   "held-out tasks, restaurants, units, contacts, messages, cities and items"),
        "license": PROJECT_LICENSE,
    }
    return train, heldout, meta


# ---------------------------------------------------------------------------

BUILDERS = {
    "terse_notes": build_terse_notes,
    "python_help": build_python_help,
    "json_reply": build_json_reply,
}


def _jsonl(rows: list[dict]) -> str:
    return "".join(
        json.dumps({"prompt": r["prompt"], "response": r["response"]}, ensure_ascii=False) + "\n"
        for r in rows
    )


def build(out_dir) -> dict[str, Path]:
    """Write <out_dir>/<user_id>/{train.jsonl,heldout.jsonl,user.json}; return the folders."""
    out_dir = Path(out_dir)
    written = {}
    for user_id, fn in BUILDERS.items():
        train, heldout, meta = fn()
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
        meta = {**meta, "n_train": len(train), "n_heldout": len(heldout)}
        d = out_dir / user_id
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.jsonl").write_text(_jsonl(train), encoding="utf-8", newline="\n")
        (d / "heldout.jsonl").write_text(_jsonl(heldout), encoding="utf-8", newline="\n")
        (d / "user.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n",
                                     encoding="utf-8", newline="\n")
        written[user_id] = d
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: samples/users)")
    args = ap.parse_args(argv)
    for user_id, d in build(args.out).items():
        meta = json.loads((d / "user.json").read_text(encoding="utf-8"))
        print(f"{d}: {meta['n_train']} train, {meta['n_heldout']} heldout")


if __name__ == "__main__":
    main()
