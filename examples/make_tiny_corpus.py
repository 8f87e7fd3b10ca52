"""Write the tiny corpus of tests/fixtures/corpus/ from templates: deterministic, no downloads.

    python examples/make_tiny_corpus.py [OUT_DIR]      # default: tests/fixtures/corpus

It imitates the two kinds of data in the Phi reports at toy scale:
  web/pages-00.jsonl    "web" pages of mixed quality, each with a "kind" field saying what it is:
                        edu (educational blog posts), chatty (fluent but not educational), spam,
                        boilerplate, repetitive, foreign (not English), short, plus planted
                        near-duplicates ("near-dup", field "of" = index of the original) and exact
                        duplicates ("exact-dup", same text up to whitespace)
  textbook/*.md         synthetic textbook sections (definition, worked example, exercises)
  notes/*.txt           plain-text study notes and diary entries
  labels.jsonl          {"text", "label"} examples for the quality classifier (1 = educational),
                        generated with a different seed from the same templates
Everything is generated from the sentence pools below with random.Random(seed), so rerunning the
script rewrites identical files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

TOPICS = {
    "photosynthesis": {
        "def": ["Photosynthesis is the process by which green plants use light energy to turn carbon dioxide and water into glucose and oxygen.",
                "In photosynthesis, a plant captures sunlight with chlorophyll and stores that energy in the chemical bonds of sugar."],
        "facts": ["Most photosynthesis happens in the leaves, inside small structures called chloroplasts.",
                  "The oxygen we breathe is released as a by-product when water molecules are split.",
                  "The overall reaction can be written as six carbon dioxide plus six water giving one glucose and six oxygen.",
                  "Light-dependent reactions take place in the thylakoid membranes, while the Calvin cycle runs in the stroma.",
                  "Plants that grow in the shade often have larger leaves to catch more light."],
        "example": "a tomato plant on a sunny windowsill grows faster than the same plant kept in a dark cupboard",
        "why": "almost every food chain on Earth starts with the sugar that plants make",
        "question": "Why do leaves look green, and what would happen to a plant kept in complete darkness for a month?"},
    "fractions": {
        "def": ["A fraction describes a part of a whole: the denominator says into how many equal parts the whole is cut, and the numerator says how many of those parts we take.",
                "Fractions such as three quarters name equal parts of one whole, written as a numerator over a denominator."],
        "facts": ["Two fractions are equivalent when they name the same amount, for example one half and two quarters.",
                  "To add fractions with different denominators, we first rewrite them with a common denominator.",
                  "Multiplying the numerator and the denominator by the same number does not change the value of a fraction.",
                  "A fraction whose numerator is larger than its denominator is greater than one.",
                  "Dividing by a fraction is the same as multiplying by its reciprocal."],
        "example": "if a pizza is cut into eight equal slices and you eat three, you have eaten three eighths of the pizza",
        "why": "fractions appear whenever we share, measure or compare quantities",
        "question": "Which is larger, five eighths or two thirds? Explain your method."},
    "gravity": {
        "def": ["Gravity is the force of attraction between any two objects that have mass.",
                "Gravity is the pull that every mass exerts on every other mass, and it grows stronger as the masses grow larger."],
        "facts": ["Near the surface of the Earth, a falling object speeds up by about 9.8 metres per second every second.",
                  "Newton showed that the same force that makes an apple fall keeps the Moon in its orbit.",
                  "The force of gravity becomes four times weaker when the distance between two objects doubles.",
                  "Without air resistance, a feather and a hammer fall at the same rate, as astronauts showed on the Moon.",
                  "Your weight is the force of gravity on your mass, so it would be smaller on Mars."],
        "example": "a ball thrown upward slows down, stops for an instant and then falls back to the ground",
        "why": "it explains tides, orbits and why the atmosphere stays around our planet",
        "question": "How much would a 60 kilogram student weigh on the Moon, where gravity is about one sixth as strong?"},
    "water cycle": {
        "def": ["The water cycle is the continuous movement of water between the oceans, the air and the land.",
                "In the water cycle, water evaporates, condenses into clouds and falls again as rain or snow."],
        "facts": ["Heat from the Sun drives evaporation from oceans, lakes and rivers.",
                  "When water vapour cools high in the atmosphere it condenses into tiny droplets that form clouds.",
                  "Plants also release water vapour through their leaves in a process called transpiration.",
                  "Water that soaks into the ground can be stored for thousands of years in aquifers.",
                  "Rivers carry rain water back to the sea, where the cycle begins again."],
        "example": "a puddle on the playground disappears on a warm afternoon because its water evaporates",
        "why": "it brings fresh water to farms, forests and cities",
        "question": "Describe the journey of one drop of water from the ocean to a mountain stream and back."},
    "prime numbers": {
        "def": ["A prime number is a whole number greater than one whose only divisors are one and itself.",
                "Prime numbers, such as 2, 3, 5 and 7, cannot be written as a product of two smaller whole numbers."],
        "facts": ["Every whole number greater than one can be written as a product of primes in exactly one way.",
                  "Euclid proved more than two thousand years ago that there are infinitely many primes.",
                  "The number 2 is the only even prime, because every other even number is divisible by 2.",
                  "To test whether a number is prime, it is enough to try divisors up to its square root.",
                  "The sieve of Eratosthenes finds all primes below a limit by crossing out multiples."],
        "example": "the number 91 looks prime but is not, because it equals 7 times 13",
        "why": "modern encryption, which protects online banking, relies on the difficulty of factoring large numbers into primes",
        "question": "List all prime numbers between 30 and 60 and explain how you checked each one."},
    "python loops": {
        "def": ["A loop is a piece of a program that repeats a block of instructions, and in Python the for loop repeats once for each item of a sequence.",
                "Loops let a program repeat work without copying code: a for loop visits each element, and a while loop runs as long as a condition is true."],
        "facts": ["The range function produces the numbers a for loop often counts through.",
                  "A while loop must change its condition eventually, otherwise it runs forever.",
                  "The break statement leaves a loop early, and continue skips to the next pass.",
                  "Loops can be nested, for example to visit every cell of a table row by row.",
                  "Accumulating a running total inside a loop is one of the most common patterns in programming."],
        "example": "the loop for n in range(1, 6): total = total + n adds the numbers one to five and leaves total equal to 15",
        "why": "nearly every useful program processes many items in the same way",
        "question": "Write a loop that prints the squares of the numbers from one to ten, and explain how it stops."},
    "the French Revolution": {
        "def": ["The French Revolution was a period of political and social upheaval in France that began in 1789 and ended the absolute monarchy.",
                "Between 1789 and 1799, the French Revolution replaced a king who ruled by divine right with a republic founded on the rights of citizens."],
        "facts": ["The storming of the Bastille on 14 July 1789 became a symbol of the revolution.",
                  "The Declaration of the Rights of Man and of the Citizen stated that people are born free and equal in rights.",
                  "Food shortages and heavy taxes on ordinary people helped to cause the unrest.",
                  "King Louis XVI was executed in 1793, during the most radical phase of the revolution.",
                  "The revolution ended when Napoleon Bonaparte took power in 1799."],
        "example": "the new metric system of metres and kilograms was introduced during the revolution to replace many local units",
        "why": "its ideas of liberty, equality and citizenship shaped modern democracies",
        "question": "Name two causes of the French Revolution and explain how each one increased tension in France."},
    "the human heart": {
        "def": ["The heart is a muscular organ that pumps blood through the body, carrying oxygen and nutrients to every cell.",
                "The human heart is a four-chambered pump: two atria receive blood and two ventricles push it out to the lungs and the body."],
        "facts": ["The right side of the heart sends blood to the lungs, where it picks up oxygen.",
                  "Valves between the chambers keep blood flowing in one direction only.",
                  "An adult heart at rest beats about sixty to one hundred times every minute.",
                  "Arteries carry blood away from the heart, and veins bring it back.",
                  "Regular exercise makes the heart muscle stronger and more efficient."],
        "example": "after running up several flights of stairs you can feel your pulse speed up as your muscles ask for more oxygen",
        "why": "understanding it helps us look after our health and recognise warning signs of disease",
        "question": "Trace the path of a red blood cell from the right atrium back to the right atrium."},
    "electric circuits": {
        "def": ["An electric circuit is a closed path through which an electric current can flow.",
                "A circuit needs a source of energy such as a battery, a closed loop of conductors and something that uses the energy, such as a lamp."],
        "facts": ["Current is measured in amperes and voltage in volts.",
                  "Ohm's law says that the voltage across a resistor equals the current through it times its resistance.",
                  "In a series circuit the same current flows through every component.",
                  "In a parallel circuit each branch gets the full voltage of the battery.",
                  "A switch opens or closes the circuit, stopping or starting the current."],
        "example": "when one bulb in an old string of series lights breaks, all the others go out because the loop is broken",
        "why": "every electrical device, from a torch to a computer, is built from circuits",
        "question": "A 6 volt battery drives a current of 0.5 amperes through a resistor. What is its resistance?"},
    "ecosystems": {
        "def": ["An ecosystem is a community of living things together with the non-living environment they interact with.",
                "An ecosystem includes plants, animals, fungi and microbes, along with the soil, water and climate around them."],
        "facts": ["Producers such as plants make their own food, while consumers must eat other organisms.",
                  "Decomposers break down dead material and return nutrients to the soil.",
                  "A food web shows the many feeding relationships in an ecosystem.",
                  "Removing a single species can affect many others that depend on it.",
                  "Energy is lost at each step of a food chain, so there are fewer top predators than plants."],
        "example": "when wolves were returned to Yellowstone, the number of deer fell and riverside trees began to recover",
        "why": "healthy ecosystems clean our water, pollinate our crops and store carbon",
        "question": "Draw a food chain with four links from a pond and explain what happens if the second link disappears."},
    "percentages": {
        "def": ["A percentage is a fraction with a denominator of one hundred, so 25 percent means 25 out of every 100.",
                "Percent means per hundred: a percentage compares a quantity with one hundred equal parts of a whole."],
        "facts": ["To find 10 percent of a number, divide it by ten.",
                  "A percentage increase is the change divided by the original amount, times one hundred.",
                  "Fifty percent is the same as one half, and 75 percent is the same as three quarters.",
                  "Two successive discounts of 10 percent do not add up to a discount of 20 percent.",
                  "Percentages make it easy to compare amounts of different sizes."],
        "example": "a jacket that costs 80 dollars with a 25 percent discount costs 60 dollars, because 25 percent of 80 is 20",
        "why": "we meet them in prices, interest rates, statistics and test scores",
        "question": "A town grew from 2,000 to 2,300 people. By what percentage did it grow?"},
    "plate tectonics": {
        "def": ["Plate tectonics is the theory that the outer shell of the Earth is broken into large plates that slowly move.",
                "According to plate tectonics, the rigid lithosphere is divided into plates that drift on the hotter mantle below."],
        "facts": ["Plates move a few centimetres each year, about as fast as fingernails grow.",
                  "Where plates collide, mountains such as the Himalayas are pushed up.",
                  "Most earthquakes and volcanoes occur along the boundaries between plates.",
                  "New ocean floor forms at mid-ocean ridges where plates move apart.",
                  "Matching fossils on distant continents were early evidence that the continents once fit together."],
        "example": "the coastlines of South America and Africa fit together like pieces of a puzzle",
        "why": "it explains where earthquakes, volcanoes and mountain ranges are found",
        "question": "Explain why Iceland has many volcanoes while Australia has very few active ones."},
}

CHATTY = [
    "Honestly I was not sure about this place at first but the staff were lovely and the coffee was great.",
    "We stayed for three nights and the room was fine, a bit noisy on the weekend though.",
    "My cousin says the new season of the show is even better than the last one, so I will probably binge it.",
    "The delivery took ages and the box was a little damaged, but the shoes fit perfectly.",
    "Saturday was a lazy day, we ordered pizza and watched movies until late.",
    "I bought the blue one because the red one was sold out, and I kind of regret it now.",
    "The parking was a nightmare, we drove around for twenty minutes before finding a spot.",
    "Anyway, that was my weekend, let me know in the comments what you got up to!",
    "The singer wore a sparkly jacket and everyone was talking about it the next morning.",
    "Five stars from me, would definitely order again if the price stays the same.",
    "We tried the new burger place downtown and the fries were amazing but the burger was just okay.",
    "My phone battery died halfway through the concert which was so annoying.",
    "The traffic this morning was terrible and I was late for my appointment again.",
    "She posted a picture of her new puppy and it got more likes than anything she has ever posted.",
    "The hotel pool was smaller than in the photos but the kids loved it anyway.",
    "I really think the team should have won that game, the referee made some strange calls.",
]
SPAM = ["BUY NOW!!! Cheap watches $$$ best price ### limited offer >>> CLICK HERE <<<",
        "$$$ WIN BIG $$$ casino bonus 500% ### free spins !!! @@@ join today ***",
        "best cheap pills online ### no prescription ### fast shipping $$$ 100% guaranteed !!!",
        "HOT DEALS >>> replica bags <<< 90% OFF ### visit www.example-deals.biz ### !!!",
        "lose weight fast ### miracle tea ### doctors hate this trick $$$ ... ... ..."]
BOILER = ["Home | About us | Products | Blog | Contact", "We use cookies to improve your experience. By continuing you accept our cookie policy.",
          "Privacy Policy | Terms of Use | Sitemap", "Copyright 2023 Example Media Ltd. All rights reserved.",
          "Please enable JavaScript to view this page.", "Subscribe to our newsletter and sign up for exclusive offers!",
          "Log in | Register | Forgot password?", "Follow us on social media", "Lorem ipsum dolor sit amet, consectetur adipiscing elit."]
FOREIGN = [
    "Die Photosynthese ist ein Prozess, bei dem Pflanzen Lichtenergie nutzen, um aus Kohlendioxid und Wasser Zucker herzustellen. Das geschieht vor allem in den Blättern.",
    "La révolution française a commencé en 1789 et a profondément transformé la société. Les citoyens ont réclamé la liberté et l'égalité devant la loi.",
    "El ciclo del agua describe el movimiento continuo del agua entre los océanos, la atmósfera y la tierra. El sol calienta el agua y la evapora.",
    "Il cuore umano è un muscolo che pompa il sangue in tutto il corpo. Ha quattro cavità e batte circa settanta volte al minuto.",
    "Wir haben am Wochenende einen Ausflug in die Berge gemacht und das Wetter war wunderbar. Am Abend gab es ein großes Essen mit der ganzen Familie.",
    "Os números primos são números inteiros maiores que um que só são divisíveis por um e por eles mesmos. Euclides provou que existem infinitos primos.",
]
OPENERS = ["Have you ever wondered how {t} works? In this post we take a closer look.",
           "Today we are going to talk about {t}, a topic that comes up in almost every school year.",
           "Many readers asked me to explain {t}, so here is a short guide.",
           "Let us explore {t} step by step.", "This article is a gentle introduction to {t}."]
CLOSERS = ["To sum up, {t} is worth understanding well.", "Try the question below to check your understanding.",
           "Next time we will build on these ideas.", "If you remember one thing, remember the definition above."]


def edu_post(rng: random.Random, topic: str) -> str:
    t = TOPICS[topic]
    facts = rng.sample(t["facts"], rng.randint(3, 5))
    parts = [rng.choice(OPENERS).format(t=topic), rng.choice(t["def"]), *facts,
             f"For example, {t['example']}.", f"This matters because {t['why']}.", rng.choice(CLOSERS).format(t=topic)]
    body = " ".join(parts[:3]) + "\n\n" + " ".join(parts[3:])
    return body + f"\n\nQuestion: {t['question']}" if rng.random() < 0.5 else body


def textbook_section(rng: random.Random, topic: str, chapter: int, section: int) -> str:
    t = TOPICS[topic]
    facts = rng.sample(t["facts"], 4)
    return (f"# Chapter {chapter}.{section}: {topic[0].upper() + topic[1:]}\n\n## Definition\n\n{rng.choice(t['def'])}\n\n"
            f"## Key ideas\n\n" + "\n".join(f"- {f}" for f in facts[:3]) + "\n\n"
            f"## Worked example\n\nConsider this situation: {t['example']}. Notice how the definition applies: "
            f"{facts[3]} This matters because {t['why']}.\n\n"
            f"## Exercises\n\n1. {t['question']}\n2. In your own words, explain what {topic} means and give one "
            f"example from everyday life.\n")


def chatty_post(rng: random.Random) -> str:
    lines = rng.sample(CHATTY, rng.randint(6, 9))
    return " ".join(lines[:4]) + "\n\n" + " ".join(lines[4:])


def spam_page(rng: random.Random) -> str:
    return "\n".join(rng.choice(SPAM) for _ in range(rng.randint(4, 8)))


def boilerplate_page(rng: random.Random) -> str:
    lines = rng.sample(BOILER, rng.randint(5, 8))
    if rng.random() < 0.5:
        lines.insert(2, rng.choice(CHATTY))
    return "\n".join(lines)


def repetitive_page(rng: random.Random) -> str:
    line = rng.choice(CHATTY + [TOPICS[rng.choice(list(TOPICS))]["def"][0]])
    return "\n".join([line] * rng.randint(8, 15))


def near_duplicate(rng: random.Random, text: str) -> str:
    """The same page re-posted: one word changed, a share line added, whitespace shuffled."""
    words = text.split(" ")
    i = rng.randrange(len(words))
    words[i] = rng.choice(["really", "very", "quite", "also"])
    return " ".join(words) + "\n\nShare this post with your friends."


def web_pages(rng: random.Random) -> list[dict]:
    topics = list(TOPICS)
    pages = []
    for i in range(80):
        pages.append({"text": edu_post(rng, topics[i % len(topics)]), "kind": "edu"})
    pages += [{"text": chatty_post(rng), "kind": "chatty"} for _ in range(45)]
    pages += [{"text": spam_page(rng), "kind": "spam"} for _ in range(25)]
    pages += [{"text": boilerplate_page(rng), "kind": "boilerplate"} for _ in range(25)]
    pages += [{"text": repetitive_page(rng), "kind": "repetitive"} for _ in range(12)]
    pages += [{"text": rng.choice(FOREIGN) + " " + rng.choice(FOREIGN), "kind": "foreign"} for _ in range(12)]
    pages += [{"text": rng.choice(["Click here.", "Thanks!", "Page 2 of 7", "Read more"]), "kind": "short"}
              for _ in range(8)]
    rng.shuffle(pages)
    originals = [i for i, p in enumerate(pages) if p["kind"] in ("edu", "chatty")]
    for i in rng.sample(originals, 24):
        pages.append({"text": near_duplicate(rng, pages[i]["text"]), "kind": "near-dup", "of": i})
    for i in rng.sample(originals, 10):
        pages.append({"text": "  " + pages[i]["text"].replace("\n\n", "\n\n\n") + "  \n", "kind": "exact-dup", "of": i})
    return pages


def labelled_examples(rng: random.Random) -> list[dict]:
    topics = list(TOPICS)
    good = [edu_post(rng, rng.choice(topics)) for _ in range(60)]
    good += [textbook_section(rng, rng.choice(topics), rng.randint(1, 9), rng.randint(1, 9)) for _ in range(40)]
    bad = [chatty_post(rng) for _ in range(60)] + [spam_page(rng) for _ in range(20)]
    bad += [boilerplate_page(rng) for _ in range(20)]
    examples = [{"text": t, "label": 1} for t in good] + [{"text": t, "label": 0} for t in bad]
    rng.shuffle(examples)
    return examples


def main(out: str | Path = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpus") -> None:
    out = Path(out)
    rng = random.Random(0)
    (out / "web").mkdir(parents=True, exist_ok=True)
    with open(out / "web" / "pages-00.jsonl", "w", encoding="utf-8") as f:
        for i, page in enumerate(web_pages(rng)):
            f.write(json.dumps({"url": f"https://example.org/page/{i}", **page}, ensure_ascii=False) + "\n")
    (out / "textbook").mkdir(exist_ok=True)
    for i, topic in enumerate(list(TOPICS) * 4):
        chapter, section = i % len(TOPICS) + 1, i // len(TOPICS) + 1
        name = f"ch{chapter:02d}-s{section}-{topic.replace(' ', '-').lower()}.md"
        (out / "textbook" / name).write_text(textbook_section(rng, topic, chapter, section), encoding="utf-8")
    (out / "notes").mkdir(exist_ok=True)
    for i in range(20):
        text = edu_post(rng, rng.choice(list(TOPICS))) if i % 2 == 0 else chatty_post(rng)
        (out / "notes" / f"note-{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        for ex in labelled_examples(random.Random(1)):
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
