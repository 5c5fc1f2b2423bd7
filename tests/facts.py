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


# --- fact sets for memory quality (bench/memory_qa.py, tests/test_memory_qa.py) -----------------
# Each entry: (fact, question, paraphrased question, answer). The paraphrase asks for the same
# thing in other words than the fact's (a new user's question rarely copies the stored wording).

PARAPHRASES = {"colour": "Which hue does {n} like best?", "city": "Where is {n}'s home?",
               "age": "What is {n}'s age?", "pet": "What animal does {n} keep at home?",
               "food": "Which dish does {n} enjoy most?"}


def personal_set() -> list[tuple[str, str, str, str]]:
    """facts() with a paraphrase of each question."""
    kinds = ["colour", "city", "age", "pet", "food"]
    return [(f, q, PARAPHRASES[kinds[i % 5]].format(n=NAMES[i // 5]), a) for i, (f, q, a) in enumerate(facts())]


NAMES_B = ["Aurelio", "Beatrix", "Cosimo", "Delphine", "Ezra", "Fenna", "Gideon", "Hollis", "Isolde", "Jasper",
           "Kasimir", "Lorna", "Matthias", "Nerys", "Orla", "Percival", "Rafferty", "Saoirse", "Thaddeus", "Ulrike",
           "Valentin", "Wilhelmina", "Yannick", "Zephyr", "Anouk"]
BRANDS = ["Volvo", "Toyota", "Fiat", "Skoda", "Subaru", "Renault", "Mazda", "Peugeot"]
JOBS = ["plumber", "pilot", "dentist", "librarian", "carpenter", "chemist", "baker", "surveyor", "nurse", "judge"]
INSTRUMENTS = ["cello", "trumpet", "harp", "banjo", "oboe", "accordion", "violin", "drums"]
ALLERGENS = ["peanuts", "shellfish", "sesame", "strawberries", "mustard", "celery", "kiwi", "walnuts"]
SISTERS = ["Mirela", "Odette", "Rowena", "Tamsin", "Philippa", "Ysolde", "Clementine", "Henrietta", "Ottilie"]
WORDS = ["falcon", "maple", "harbor", "comet", "juniper", "velvet", "quartz", "meadow", "ember", "tundra"]


def household_set() -> list[tuple[str, str, str, str]]:
    """200 facts (25 names x 8 relations) worded unlike facts(): vehicles, birth years, jobs,
    passwords, relatives, instruments, allergies, flights."""
    out = []
    for i, n in enumerate(NAMES_B):
        brand, job = BRANDS[(3 * i + 1) % len(BRANDS)], JOBS[(7 * i + 3) % len(JOBS)]
        year = 1950 + (i * 13) % 55
        pw = f"{WORDS[(i * 3) % len(WORDS)]}{10 + (i * 29) % 90}"
        sister, inst = SISTERS[(5 * i + 2) % len(SISTERS)], INSTRUMENTS[(5 * i) % len(INSTRUMENTS)]
        allergen, city = ALLERGENS[(3 * i + 5) % len(ALLERGENS)], CITIES[(7 * i + 4) % len(CITIES)]
        hour = f"{6 + (i * 5) % 15}:{(i * 17) % 6}0"
        out += [(f"{n} drives a {brand}.", f"What car does {n} drive?", f"Which vehicle brand does {n} own?", brand),
                (f"{n} was born in {year}.", f"In what year was {n} born?", f"When did {n} come into the world?",
                 str(year)),
                (f"{n} works as a {job}.", f"What is {n}'s job?", f"What does {n} do for a living?", job),
                (f"The wifi password in {n}'s flat is {pw}.", f"What is the wifi password in {n}'s flat?",
                 f"How do I get online at {n}'s apartment?", pw),
                (f"{n}'s sister is called {sister}.", f"What is the name of {n}'s sister?",
                 f"Who is {n}'s female sibling?", sister),
                (f"{n} plays the {inst}.", f"Which instrument does {n} play?",
                 f"What does {n} make music with?", inst),
                (f"{n} is allergic to {allergen}.", f"What is {n} allergic to?",
                 f"What should {n} avoid eating?", allergen),
                (f"{n}'s flight to {city} leaves at {hour}.", f"When does {n}'s flight to {city} leave?",
                 f"What time does {n} depart for {city}?", hour)]
    return out


PLACES = ["Vexlor", "Quandry", "Osterhald", "Mirrowdale", "Tesk", "Brunhaven", "Calloway", "Drexmoor", "Elsworth",
          "Fairnholt", "Glimmerby", "Harrowgate", "Ilverton", "Jorvik Minor", "Kestrel Bay", "Lindqvist", "Marrowfield",
          "Norhaven", "Oakhurst", "Pellingham"]
LEADERS = ["Dr. Mbeki", "Professor Laine", "Captain Ruiz", "Dr. Okonkwo", "Ms. Varga", "Mr. Tanaka", "Dr. Quist"]
ROUTES = [("the number 14 bus", "14"), ("the blue tram line", "tram"), ("the night ferry", "ferry"),
          ("the coastal railway", "railway"), ("cable car four", "cable car")]


def world_set() -> list[tuple[str, str, str, str]]:
    """120 invented facts about invented places (20 places x 6 relations)."""
    out = []
    for i, p in enumerate(PLACES):
        length, pop = 150 + (i * 37) % 800, 1000 * (3 + (i * 11) % 90)
        leader, (route, by) = LEADERS[(3 * i + 1) % len(LEADERS)], ROUTES[(2 * i) % len(ROUTES)]
        year, river = 1200 + (i * 47) % 700, WORDS[(i * 7 + 1) % len(WORDS)].capitalize()
        out += [(f"The bridge in {p} is {length} metres long.", f"How long is the bridge in {p}?",
                 f"What is the length of {p}'s bridge?", str(length)),
                (f"{p} has a population of {pop}.", f"What is the population of {p}?",
                 f"How many people live in {p}?", str(pop)),
                (f"The town council of {p} is led by {leader}.", f"Who leads the town council of {p}?",
                 f"Who is in charge of {p}'s local government?", leader.split()[-1]),
                (f"The castle of {p} was built in {year}.", f"When was the castle of {p} built?",
                 f"In which year was {p}'s fortress constructed?", str(year)),
                (f"You reach {p} from the airport by {route}.", f"How do you reach {p} from the airport?",
                 f"What transport goes from the airport to {p}?", by),
                (f"The river through {p} is called the {river}.", f"What is the river through {p} called?",
                 f"Which river flows through {p}?", river)]
    return out


# General questions that need no memory: they share words with the facts above (colour, city,
# age, pet, food, job, car, year, bridge...) but are about something else.
GENERAL_QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "What colour is the sky on a clear day?",
    "Which city is the capital of Japan?", "What is a good name for a pet cat?", "How old is the universe?",
    "What food is Italy famous for?", "What does a plumber do?", "Who wrote Romeo and Juliet?",
    "What is 12 plus 7?", "Translate 'good morning' into Spanish.", "What is the boiling point of water in Celsius?",
    "Name three musical instruments.", "What year did the Second World War end?", "How long is a marathon?",
    "What is the largest ocean on Earth?", "Why do cats purr?", "Give me a tip for sleeping better.",
    "What is the chemical symbol for gold?", "How many days are in a leap year?", "What is the tallest animal?",
    "Which planet is known as the red planet?", "What is photosynthesis?", "Write a haiku about autumn.",
    "What does a pilot do?", "Which language is spoken in Brazil?", "What is the speed of light?",
    "How do airplanes fly?", "What is the population of the world?", "Who painted the Mona Lisa?",
    "What is a river?", "Which car brand makes the Model 3?", "What should I eat for breakfast?",
    "How does a password manager work?", "What is the longest bridge in the world?",
    "How many strings does a violin have?",
    "What is an allergy?", "When was the first flight of the Wright brothers?", "What is a castle?",
    "How do I connect to wifi?"]


# --- held out from the tests: the relevance check's calibration (bench/memory_relevance.py) ---------
# Everyday facts of other shapes (fact, question, paraphrase, answer), and general questions that
# share words with them (wifi, dentist, penicillin, rent...) but are about something else.
EVERYDAY = [
 ("The wifi password at the Elm Street office is bluefinch42.", "What is the wifi password at the Elm Street office?", "How do I get online at the Elm Street office?", "bluefinch42"),
 ("Marta's dentist appointment is on Thursday at 3 pm.", "When is Marta's dentist appointment?", "What day does Marta see the dentist?", "Thursday"),
 ("The spare key to the cabin is under the blue flowerpot.", "Where is the spare key to the cabin?", "How can I get into the cabin if I lost my key?", "flowerpot"),
 ("Tobias is allergic to penicillin.", "What is Tobias allergic to?", "Which medicine must Tobias avoid?", "penicillin"),
 ("The project deadline for Orion is March 14.", "When is the Orion project deadline?", "By what date must Orion be finished?", "March 14"),
 ("Our landlord is called Mr. Abernathy.", "What is our landlord's name?", "Who owns the flat we rent?", "Abernathy"),
 ("The book club meets at the Linden Café.", "Where does the book club meet?", "Which café hosts the reading group?", "Linden"),
 ("Priya's flight to Montreal leaves from gate B22.", "Which gate does Priya's flight leave from?", "Where should Priya board for Montreal?", "B22"),
 ("The garage door code is 7719.", "What is the garage door code?", "How do I open the garage?", "7719"),
 ("Farouk drives a green Lancia.", "What car does Farouk drive?", "Which vehicle belongs to Farouk?", "Lancia"),
 ("The village of Pellwick is famous for its copper bells.", "What is Pellwick famous for?", "Why do people know the village of Pellwick?", "bells"),
 ("Sven's favourite film is Solaris.", "What is Sven's favourite film?", "Which movie does Sven like most?", "Solaris"),
 ("The tallest tower in Karvossa is 212 metres high.", "How tall is the tallest tower in Karvossa?", "What is the height of Karvossa's highest tower?", "212"),
 ("Ilse teaches chemistry at Northgate school.", "What does Ilse teach?", "Which subject is Ilse's job?", "chemistry"),
 ("The monthly rent for the studio is 640 euros.", "What is the monthly rent for the studio?", "How much does the studio cost per month?", "640"),
 ("Dario's cat is named Pistachio.", "What is the name of Dario's cat?", "What did Dario call his cat?", "Pistachio"),
 ("The festival in Ombria takes place every August.", "When is the festival in Ombria?", "In which month does Ombria celebrate its festival?", "August"),
 ("Noor's bicycle lock combination is 3-8-1.", "What is Noor's bicycle lock combination?", "How does Noor unlock her bike?", "3-8-1"),
 ("The water heater was last serviced in 2021.", "When was the water heater last serviced?", "What year did the boiler get its last check?", "2021"),
 ("Lukas speaks fluent Icelandic.", "Which language does Lukas speak fluently?", "What foreign tongue has Lukas mastered?", "Icelandic"),
]
GENERAL_QUESTIONS_2 = [
 "What is the wifi standard used by most routers?", "How do I change a flat tyre on a bicycle?", "What is a good gift for a teacher?",
 "How far is the Moon from Earth?", "What is penicillin?", "Explain what a landlord is.", "Recommend a classic science fiction film.",
 "What does a dentist do?", "How many minutes are in a day?", "What is copper used for?", "Who invented the telephone?",
 "How do I make a cup of tea?", "What is the capital of Canada?", "What is a combination lock?", "Why is the sea salty?",
 "What are the primary colours?", "How do vaccines work?", "What is the rent-to-income ratio?", "Name a famous festival in Brazil.",
 "What languages are spoken in Switzerland?", "How tall is Mount Everest?", "What is the largest desert?",
 "Suggest a name for a book club.", "What is chemistry?", "How do I reset a forgotten password?", "What is a gate at an airport?",
 "What is the square root of 81?", "Give me a recipe for pancakes.", "Why do leaves change colour in autumn?",
 "What is the difference between weather and climate?", "How does a water heater work?", "What is the fastest land animal?",
 "Who was the first person on the Moon?", "What is inflation?", "How do I learn a new language quickly?",
 "What is a deadline?", "Which instrument has 88 keys?", "What does a garage door opener do?", "Tell me a joke about cats.",
 "What is the main ingredient of guacamole?",
]


# --- a scripted conversation for ChatMemory (tests/test_memory_qa.py) ----------------------------
ME = [("My sister's name is Odette.", "What is my sister's name?", "Odette"),
      ("I drive a Volvo.", "What car do I drive?", "Volvo"),
      ("I was born in Riga.", "Where was I born?", "Riga"),
      ("My dog is called Pixel.", "What is my dog called?", "Pixel"),
      ("My locker number is 317.", "What is my locker number?", "317"),
      ("I work as a surveyor.", "What is my job?", "surveyor"),
      ("My favourite colour is blue.", "What is my favourite colour?", "blue"),
      ("I play the oboe.", "Which instrument do I play?", "oboe"),
      ("I am allergic to sesame.", "What am I allergic to?", "sesame"),
      ("My best friend is called Tamsin.", "What is my best friend called?", "Tamsin"),
      ("My flight to Quito leaves at 7:40.", "When does my flight to Quito leave?", "7:40"),
      ("The wifi password at home is juniper42.", "What is the wifi password at home?", "juniper42")]
UPDATES = [("My favourite colour is now green.", "What is my favourite colour?", "green"),
           ("I now drive a Subaru.", "What car do I drive?", "Subaru")]
SMALL_TALK = ["Tell me a fun fact about octopuses.", "Give me a tip for staying focused.",
              "What is a good book to read?",
              "Describe a sunset in one sentence.", "How do I make a cup of tea?", "Tell me a short joke.",
              "What are clouds made of?", "Suggest a name for a goldfish.", "Why is the sea salty?",
              "What is a healthy snack?", "Write a line of poetry about rain.", "How do bees make honey?"]


def conversation_script(turns: int = 110) -> tuple[list[str], list[tuple[int, str, str]]]:
    """A conversation of `turns` user messages: the facts of ME stated early, small talk, two of
    them updated (UPDATES) midway, and every fact asked at the end. Returns the messages and the
    (turn index, question, answer) of the questions."""
    msgs = [f for f, _, _ in ME]
    while len(msgs) < turns // 2:
        msgs.append(SMALL_TALK[len(msgs) % len(SMALL_TALK)])
    msgs += [u for u, _, _ in UPDATES]
    asks = {q: a for _, q, a in ME}
    asks.update({q: a for _, q, a in UPDATES})
    n_small = turns - len(msgs) - len(asks)
    msgs += [SMALL_TALK[(i * 5) % len(SMALL_TALK)] for i in range(max(n_small, 0))]
    questions = []
    for q, a in asks.items():
        questions.append((len(msgs), q, a))
        msgs.append(q)
    return msgs, questions
