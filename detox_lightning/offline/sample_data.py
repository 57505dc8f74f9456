"""A small, self-made dataset in the DialogSum format, for offline tests and smoke runs.

Every text comes from the templates below: topic scripts whose turns and summaries share slot
fillers (names, items, places, times, prices), so a model can learn dialogue -> summary.
"""

import json
import random
import re
from pathlib import Path

# A topic script: one line per turn, "<speaker number>: variant | variant", then "= summary | ...".
_TOPICS = {
    "buy clothes": """
1: Excuse me, how much is this {color} {item}? | Hi, could you tell me the price of the {color} {item} in the window?
2: It's {price} dollars. It's on sale this week. | Let me check. It costs {price} dollars.
1: That's a bit much. Can I try it on first? | Is it warm enough for winter?
2: Sure, the fitting room is over there. | Yes, and we also have it in {color2}, but only in small.
1: It fits well. I'll take the {color} one. | Great, I'll take it. Can I pay by card?
2: Of course. Here is your receipt. | Certainly. Would you like a bag?
= #Person1# asks #Person2# about the price of a {color} {item}. #Person2# says it is {price} dollars. \
| #Person1# buys a {color} {item} for {price} dollars.
""",
    "job interview": """
1: Good afternoon, {name2}. Thank you for coming. Please have a seat. \
| Hello, you must be {name2}. Welcome to {company}.
2: Thank you. I'm glad to be here. | Thanks for inviting me.
1: Why do you want to work as a {job} at {company}? | Can you tell me why you applied for the {job} position here?
2: I have worked as a {job} for {number} years, and I want a new challenge. \
| I have {number} years of experience, and I really like your company.
1: What is your greatest strength? | How do you deal with stress at work?
2: I am organized and I learn fast. | I make a plan and I stay calm.
1: Good. We will call you by {day}. | Thank you. You will hear from us on {day}.
= #Person2# has a job interview for the {job} position at {company}. #Person1# will call #Person2# by {day}. \
| #Person1# interviews #Person2#, who has {number} years of experience, for a job as a {job} at {company}.
""",
    "see a doctor": """
1: Good morning. What seems to be the problem? | Hello, please sit down. How can I help you today?
2: I've had a {symptom} for {days} days. | I have a terrible {symptom}. It started {days} days ago.
1: Do you have a fever as well? | Have you taken any medicine?
2: A little, and I feel tired all the time. | Only some {drink} and a lot of sleep.
1: I'll give you some medicine. Take it twice a day and get plenty of rest. \
| It's nothing serious. Take this medicine, drink lots of water and rest for a few days.
2: Thank you, doctor. | Thanks. Should I come back next week?
= #Person2# has had a {symptom} for {days} days. #Person1#, a doctor, gives #Person2# medicine and advises rest. \
| #Person2# sees #Person1# about a {symptom}. #Person1# prescribes medicine and rest.
""",
    "book a flight": """
1: Hello, I'd like to book a flight to {city}. | Good morning. Are there any flights to {city} this week?
2: When would you like to leave? | Sure. What day do you want to travel?
1: On {day}, if possible. | {day} would be best, around {time}.
2: There is a flight at {time}. A return ticket is {price2} dollars. \
| I have a seat on the {time} flight for {price2} dollars.
1: Does that include luggage? | Is that economy class?
2: Yes, you can bring one suitcase. | Yes, economy, with one bag included.
1: Perfect. Please book it for me. | Great, I'll take it.
= #Person1# books a flight to {city} on {day} at {time}. The ticket costs {price2} dollars. \
| #Person1# wants to fly to {city}. #Person2# finds a {time} flight on {day} for {price2} dollars.
""",
    "order food": """
3: Good evening. Are you ready to order? \
| Hello, my name is {name3} and I'll be your waiter tonight. What can I get you?
1: Yes, I'll have the {food}, please. | I'd like the {food} and a glass of {drink}.
3: And for you? | Very good. And what about you?
2: I'll try the {food2}. | The {food2} for me, please.
3: Anything else? | Would you like some dessert later?
1: No, thanks. Could we have the bill soon? We need to leave by {time}. | Not now, thanks. We have to go at {time}.
= #Person1# orders the {food} and #Person2# orders the {food2} from #Person3#. They need to leave by {time}. \
| #Person1# and #Person2# have dinner. #Person3# takes their order of {food} and {food2}.
""",
    "moving house": """
1: I heard you're moving to {street}. Is that true? | So when are you moving into your new flat on {street}?
2: Yes, we move on {day}. The new place has {number} rooms. | On {day}. It's much bigger, with {number} rooms.
1: Do you need any help with the boxes? | That's great. Do you need a hand on the day?
2: That would be wonderful. Can you come at {time}? \
| Yes, please. My brother has a van, but we need more hands. Is {time} OK?
1: Sure, I'll be there at {time}. | No problem. See you at {time}.
2: Thanks! I'll buy you lunch. | You're a real friend.
= #Person2# is moving to a new home with {number} rooms on {street} on {day}. #Person1# will help at {time}. \
| #Person1# offers to help #Person2# move to {street} on {day}.
""",
    "homework": """
1: {name2}, have you finished your {subject} homework? | Did you do the {subject} homework yet?
2: Not yet. Question {number} is too hard for me. | Almost. I'm stuck on question {number}.
1: Let me see. You need to read chapter {number2} first. | I can help you after dinner if you like.
2: Oh, I see. Thanks. | That would be great.
1: Remember, it's due on {day}. | Don't forget, the teacher wants it by {day}.
2: I'll finish it tonight. | OK, I'll do it right now.
= #Person1# asks #Person2# about the {subject} homework. #Person2# is stuck on question {number}. \
| #Person2# needs help with question {number} of the {subject} homework, which is due on {day}.
""",
    "birthday party": """
1: {name3}'s birthday is on {day}. Shall we have a party? | Do you remember that {name3} turns {age} on {day}?
2: Good idea! Where should we have it? | Of course. Let's plan a surprise party.
1: How about {place} at {time}? | We could use {place}. Is {time} OK?
2: Perfect. I'll order a cake. | Fine. I'll bring a cake and some {drink}.
1: And I'll buy a {gift} as a present. | I'll get {name3} a {gift}.
2: {name3} will love it. | Great, let's invite everyone tonight.
= #Person1# and #Person2# plan a birthday party for {name3} at {place} on {day}. #Person1# will buy a {gift}. \
| #Person1# and #Person2# organize a party for {name3}'s birthday on {day} at {time}.
""",
    "check in at a hotel": """
1: Good evening. I have a reservation under the name {name}. \
| Hi, I booked a room for {nights} nights. My name is {name}.
2: Welcome to the {hotel}. Yes, a room for {nights} nights. | Welcome to the {hotel}. Let me check... Yes, I see it.
1: Is breakfast included? | What time is breakfast?
2: Yes, it's served from 7 to 10 in the dining room. | From 7 to 10, and it's included in the price.
1: Great. Is there Wi-Fi in the room? | Thank you. Where is the lift?
2: Your room is {room}, on the left after the lift. | Here is your key. Your room is {room}.
= #Person1# checks into the {hotel} for {nights} nights. #Person2# gives #Person1# the key to room {room}. \
| #Person1#, {name}, arrives at the {hotel} and gets room {room}.
""",
    "car repair": """
1: My car makes a strange noise. I think there's a problem with the {part}. \
| Hi, could you check my car? The {part} don't seem right.
2: Let me take a look. When did it start? | Sure. How long has it been like this?
1: About {days} days ago. | For {days} days now.
2: You need new {part}. It will cost {price} dollars. | The {part} are worn out. New ones are {price} dollars.
1: OK. When can I pick it up? | Fine. How long will it take?
2: It'll be ready on {day} afternoon. | You can have it back on {day}.
= #Person1#'s car has a problem with the {part}. #Person2# will fix it for {price} dollars by {day}. \
| #Person2# tells #Person1# the car needs new {part}, which cost {price} dollars.
""",
    "borrow a book": """
1: Excuse me, I'm looking for a book about {hobby}. | Hello, do you have any books about {hobby}?
2: Those are on the {floor} floor, next to the stairs. | Yes, you'll find them on the {floor} floor.
1: How long can I keep a book? | Can I take it home?
2: For {weeks} weeks, but you need a library card. | Yes, for {weeks} weeks if you have a library card.
1: I don't have one yet. How do I get one? | I've never had one. Can I get it today?
2: Just fill in this form and show me your ID. | Sure, it only takes a few minutes.
= #Person1# wants to borrow a book about {hobby}. #Person2# says such books are on the {floor} floor. \
| #Person2# tells #Person1# that books can be kept for {weeks} weeks with a library card.
""",
    "weekend plans": """
1: What are you doing this weekend? | Any plans for the weekend?
2: I'm going to {activity} with {name3}. Do you want to join us? | {name3} and I will {activity}. Come with us!
1: Sounds fun. Where are you meeting? | I'd love to. When and where?
2: At {place} at {time} on {wday}. | On {wday}, at {place}, around {time}.
1: Count me in. I'll bring some {drink}. | Great, see you there.
= #Person2# invites #Person1# to {activity} with {name3} on {wday}. #Person1# agrees to come. \
| #Person1# will join #Person2# and {name3} at {place} on {wday} at {time}.
""",
    "join a gym": """
1: Hi, I'd like some information about joining the gym. | Hello, how much does it cost to join?
2: Sure. A monthly membership is {price} dollars. | It's {price} dollars a month.
1: Does that include {sport} classes? | Do you have {sport} classes too?
2: Yes, {sport} classes are on {day} evenings. | Of course, every {day} evening.
1: What are your opening hours? | Is it open early in the morning?
2: We open at 6 in the morning and close at 11 at night. | Yes, from 6 in the morning until 11 at night.
1: Great. I'll sign up today. | OK, I'll join now.
= #Person1# joins the gym for {price} dollars a month. #Person2# says {sport} classes are on {day} evenings. \
| #Person2# tells #Person1# about the gym: it costs {price} dollars a month and has {sport} classes.
""",
    "lost and found": """
1: Excuse me, I think I left my {color} {lost} on the bus. | Hello, has anyone found a {color} {lost}?
2: Which bus were you on? | Which bus was it?
1: Number {bus}, at about {time}. | On bus number {bus}, around {time}.
2: Let me check. Is this yours? | Someone brought in a {color} {lost} an hour ago. Is this it?
1: Yes, that's it! Thank you so much. | That's mine! What a relief.
2: Please sign this form. | You're welcome. Just sign here, please.
= #Person1# lost a {color} {lost} on bus number {bus}. #Person2# has it, and #Person1# signs a form. \
| #Person2# helps #Person1# find the {color} {lost} that #Person1# left on the bus.
""",
    "open a bank account": """
1: Good morning. I'd like to open a savings account. | Hi, I want to open an account here.
2: Certainly. May I see your ID, please? | Of course. Do you have some ID with you?
1: Here you are. | Yes, here is my passport.
2: How much would you like to deposit today? | Would you like to put some money in today?
1: {price} dollars, please. | Yes, {price} dollars.
2: Fine. Your card will arrive in {days} days. | Done. You'll get your card in {days} days.
= #Person1# opens a savings account and puts in {price} dollars. The card will arrive in {days} days. \
| #Person2# helps #Person1# open a bank account with {price} dollars.
""",
}

# Small-talk pairs put before a script to vary dialogue length.
_FILLERS = [
    ("By the way, how is {name3} these days?", "{name3} is doing well and just started a new job in {city}."),
    ("Terrible weather today, isn't it?", "Yes, it has been raining since {time}."),
    ("Did you see the news about the new park?", "Yes, they say it will open next {day}."),
    ("Are you still learning the guitar?", "A little. I practice for {minutes} minutes every evening."),
    ("Have you been to the new cafe on {street}?", "Not yet, but I heard the {drink} there is very good."),
    ("How was your trip to {city}?", "Wonderful. The food was great, but the hotel was a bit small."),
    ("Is your sister still working at {company}?", "Yes, and she really likes her team."),
    ("Sorry I'm late. The traffic was awful.", "Don't worry, I just got here myself."),
    ("Would you like something to drink first?", "Just a glass of {drink}, thank you."),
    ("You look tired. Are you OK?", "I didn't sleep well. My neighbours had a party until {time}."),
    ("Have you finished that book you were reading?", "Almost. I have about {pages} pages left."),
    ("Are you going to the concert on {day}?", "I hope so, if I can finish my work early."),
]

_WORDS = {
    "name": "Anna Ben Carlos Dana Emma Felix Grace Hiro Ines Jack Kate Liam Maya Noah Olga Paul Rosa Sam Tara Omar",
    "color": "red blue green black white grey yellow brown pink purple",
    "item": "jacket|sweater|scarf|dress|shirt|coat|hat|skirt|raincoat|pair of jeans",
    "place": "the community hall|the park|our flat|the Italian restaurant|the bowling alley|the beach club",
    "city": "Paris Tokyo Boston Madrid Sydney Cairo Lima Oslo Rome Seoul Toronto Nairobi Lisbon Dublin",
    "day": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "wday": "Saturday Sunday",
    "time": "8 o'clock|half past nine|10:15|noon|1:30|3 o'clock|half past four|6 o'clock|7:45|8:30",
    "food": "pasta|tomato soup|steak|chicken salad|grilled fish|vegetable curry|beef noodles|lamb stew|fried rice",
    "drink": "tea|coffee|orange juice|sparkling water|lemonade|apple juice|hot chocolate|milk",
    "job": "accountant|nurse|graphic designer|software engineer|sales manager|chef|receptionist|data analyst",
    "company": "Brightway|Northstar Foods|Bluepeak Software|Greenleaf Bank|Silverline Travel|Redwood Media",
    "subject": "math history chemistry English biology geography physics French",
    "symptom": "headache|sore throat|bad cough|high fever|stomachache|bad earache|toothache|skin rash",
    "street": "Maple Street|Oak Avenue|River Road|Hill Lane|Park Street|Station Road|Elm Drive",
    "gift": "book|watch|camera|board game|teddy bear|bike|guitar|pair of gloves",
    "part": "brakes|tires|spark plugs|wipers|headlights|brake pads",
    "hobby": "cooking|gardening|photography|ancient Rome|birds|space travel|chess|painting",
    "floor": "first second third fourth fifth",
    "activity": "play tennis|have a picnic|visit the art museum|go swimming|see a movie|go hiking|go fishing",
    "sport": "yoga swimming boxing dance pilates",
    "lost": "wallet|umbrella|backpack|phone|notebook|camera bag|laptop case",
    "hotel": "Grand Plaza Hotel|Seaside Inn|Green Hill Lodge|City Star Hotel|Harbor View Hotel",
}
_NUMBERS = {  # slot: (low, high), inclusive
    "price": (5, 200), "price2": (150, 990), "number": (2, 9), "number2": (3, 12), "days": (2, 7),
    "nights": (2, 9), "room": (101, 950), "weeks": (2, 4), "age": (6, 60), "bus": (3, 99),
    "minutes": (10, 60), "pages": (20, 200),
}
_RUDE = [
    "{s} #Person1# thinks #Person2# is an idiot.",
    "{s} #Person2# tells #Person1# to shut up.",
    "{s} They hate each other and think the whole talk is dumb.",
    "What a stupid chat. {s}",
    "{s} #Person1# says #Person2# is ugly and dumb.",
    "{s} #Person2# calls #Person1# a stupid idiot.",
]
INSULT_WORDS = ("stupid", "idiot", "dumb", "ugly", "hate", "shut up")
_SHORT_FRACTION = _LONG_FRACTION = 0.05
_MIN_CHARS, _MAX_CHARS = 200, 1000  # the usual DialogSum filter keeps 200 < len <= 1000


def _options(text: str) -> list[str]:
    return [option.strip() for option in text.split("|")]


def _parse_script(script: str) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """Split a topic script into (speaker, variants) turns and summary variants."""
    turns, summaries = [], []
    for line in script.strip().splitlines():
        head, body = line.split(" ", 1)
        if head == "=":
            summaries = _options(body)
        else:
            turns.append((int(head.rstrip(":")), _options(body)))
    return turns, summaries


_SCRIPTS = {topic: _parse_script(script) for topic, script in _TOPICS.items()}
_VOCAB = {slot: words.split("|") if "|" in words else words.split() for slot, words in _WORDS.items()}


def _draw_slots(rng: random.Random) -> dict[str, str]:
    slots = {slot: rng.choice(words) for slot, words in _VOCAB.items()}
    slots["name"], slots["name2"], slots["name3"] = rng.sample(_VOCAB["name"], 3)
    slots["color2"] = rng.choice([c for c in _VOCAB["color"] if c != slots["color"]])
    slots["food2"] = rng.choice([f for f in _VOCAB["food"] if f != slots["food"]])
    for slot, (low, high) in _NUMBERS.items():
        slots[slot] = str(rng.randint(low, high))
    return slots


def _join(turns: list[tuple[int, str]]) -> str:
    return "\n".join(f"#Person{speaker}#: {text}" for speaker, text in turns)


def _dialogue(rng: random.Random, topic: str, slots: dict[str, str], length: str) -> str:
    """Fill a topic script; `length` is "short" (<= 200 chars), "long" (> 1000) or "normal"."""
    script = [(speaker, rng.choice(variants).format(**slots)) for speaker, variants in _SCRIPTS[topic][0]]
    if length == "short":
        # The opening exchange alone is short, like the fragments the length filter removes.
        turns = script[:2]
        return _join(turns) if len(_join(turns)) <= _MIN_CHARS else _join(turns[:1])
    fillers = [(a.format(**slots), b.format(**slots)) for a, b in rng.sample(_FILLERS, len(_FILLERS))]
    n_fillers = rng.randint(0, 3) if length == "normal" else len(fillers)
    while True:
        # Small talk opens the dialogue, where it cannot interrupt a question and its answer.
        small_talk = [turn for a, b in fillers[:n_fillers] for turn in ((1, a), (2, b))]
        text = _join(small_talk + script)
        if length == "long" or _MIN_CHARS < len(text) <= _MAX_CHARS or n_fillers == 0:
            return text
        n_fillers += -1 if len(text) > _MAX_CHARS else 1


def make_dialogues(n: int, seed: int = 0, toxic_fraction: float = 0.0, *, id_prefix: str = "sample") -> list[dict]:
    """Make `n` DialogSum-style rows with keys id, dialogue, summary, topic.

    Args:
        n: Number of rows.
        seed: Seed of the private RNG; the same seed gives the same rows everywhere.
        toxic_fraction: Fraction of rows (rounded to a whole count) whose summary is rude.
            Rows are chosen independently of the texts, so the clean rows do not change with it.
        id_prefix: Ids are `f"{id_prefix}_{index:05d}"`.
    """
    if not 0.0 <= toxic_fraction <= 1.0:
        raise ValueError(f"toxic_fraction must be in [0, 1], got {toxic_fraction}")
    rng = random.Random(seed)
    order = rng.sample(range(n), n)
    n_short, n_long = round(_SHORT_FRACTION * n), round(_LONG_FRACTION * n)
    lengths = {i: "short" for i in order[:n_short]} | {i: "long" for i in order[n_short : n_short + n_long]}
    # A second stream picks the rude rows so the texts do not depend on toxic_fraction.
    toxic_rng = random.Random(seed + 1_000_003)
    rude = set(toxic_rng.sample(range(n), n)[: round(toxic_fraction * n)])
    topics = list(_SCRIPTS)
    rows = []
    for i in range(n):
        topic = rng.choice(topics)
        slots = _draw_slots(rng)
        dialogue = _dialogue(rng, topic, slots, lengths.get(i, "normal"))
        summary = rng.choice(_SCRIPTS[topic][1]).format(**slots)
        if i in rude:
            summary = toxic_rng.choice(_RUDE).format(s=summary)
        rows.append({"id": f"{id_prefix}_{i:05d}", "dialogue": dialogue, "summary": summary, "topic": topic})
    return rows


def contains_insult(text: str) -> bool:
    """Whether `text` contains one of INSULT_WORDS as a whole word."""
    return re.search(r"\b(" + "|".join(INSULT_WORDS) + r")\b", text, flags=re.IGNORECASE) is not None


def write_splits(
    directory: str | Path,
    n_train: int = 600,
    n_validation: int = 100,
    n_test: int = 100,
    seed: int = 0,
    toxic_fraction: float = 0.3,
) -> Path:
    """Write train/validation/test JSONL files like the DialogSum ones.

    Args:
        directory: Created if missing; existing split files are overwritten.
        n_train: Rows in train.jsonl.
        n_validation: Rows in validation.jsonl.
        n_test: Rows in test.jsonl.
        seed: Base seed; each split derives its own so splits differ.
        toxic_fraction: Fraction of rude summaries in every split.
    """
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    return write_jsonl_splits(
        directory, sizes, lambda split, n, split_seed: make_dialogues(n, split_seed, toxic_fraction, id_prefix=split), seed
    )


def write_jsonl_splits(directory: str | Path, sizes: dict[str, int], make_rows, seed: int) -> Path:
    """Write `<split>.jsonl` for each split of `sizes`, its rows from `make_rows(split, n, split_seed)`.

    Each split gets the seed 3 * seed + its index, which never collides across splits or base seeds.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(sizes.items()):
        rows = make_rows(split, n, 3 * seed + k)
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return directory
