//! The facts and templates of the synthetic assistant world: 40 everyday topics (each with
//! the words that name it and three concrete tips) and the sentence templates that the
//! generator fills. Placeholders: `{t}` topic, `{T}` topic capitalised, `{o}` another topic,
//! `{tip}` one of the topic's tips, `{Tip}` the same capitalised.
//!
//! Invariants the tests check: no keyword belongs to two topics, every tip names its own
//! topic and no other, and no template mentions any topic by itself.

use std::collections::HashSet;
use std::sync::OnceLock;

/// One subject a user can ask about.
pub(crate) struct Topic {
    /// How prompts name it ("bread baking").
    pub name: &'static str,
    /// Other whole words or phrases that belong to this topic only.
    pub keywords: &'static [&'static str],
    /// Concrete tips, each a verb phrase in base form that mentions the topic.
    pub tips: [&'static str; 3],
}

const fn topic(name: &'static str, keywords: &'static [&'static str], tips: [&'static str; 3]) -> Topic {
    Topic { name, keywords, tips }
}

/// The 40 topics.
pub(crate) const TOPICS: [Topic; 40] = [
    topic(
        "bread baking",
        &["bread", "dough", "flour", "loaf", "baking"],
        [
            "weigh your flour instead of using cups",
            "let the dough rise somewhere warm",
            "bake the loaf until it sounds hollow when tapped",
        ],
    ),
    topic(
        "chess",
        &["pawns", "knights", "bishops", "king"],
        [
            "control the center with your pawns",
            "develop your knights before your bishops",
            "castle early to keep your king safe",
        ],
    ),
    topic(
        "gardening",
        &["garden", "seedlings", "soil", "weeds"],
        [
            "water your seedlings early in the morning",
            "test your soil before you plant anything",
            "pull weeds while they are still small",
        ],
    ),
    topic(
        "coffee",
        &["beans", "grinder", "brew"],
        [
            "grind the beans right before you brew",
            "keep your coffee beans in an airtight jar",
            "clean the grinder every few weeks",
        ],
    ),
    topic(
        "recycling",
        &["recycle", "cans", "bottles", "cardboard", "plastics"],
        [
            "rinse cans and bottles before you recycle them",
            "flatten cardboard boxes to save space",
            "check which plastics your town accepts",
        ],
    ),
    topic(
        "running",
        &["runs", "pace", "stride"],
        [
            "start with short easy runs",
            "keep a gentle pace you can talk at",
            "get running shoes that suit your stride",
        ],
    ),
    topic(
        "knitting",
        &["yarn", "needles", "stitch", "stitches", "scarf"],
        [
            "start with thick yarn and large needles",
            "practice the basic stitch on a small scarf",
            "count your stitches at the end of every row",
        ],
    ),
    topic(
        "photography",
        &["photos", "camera", "shutter"],
        [
            "hold the camera steady with both hands",
            "use the rule of thirds to frame your photos",
            "take many photos and keep only the best",
        ],
    ),
    topic(
        "birdwatching",
        &["birds", "binoculars", "feeder"],
        [
            "bring a small pair of binoculars",
            "hang a feeder near your window",
            "learn the songs of common birds",
        ],
    ),
    topic(
        "camping",
        &["tent", "campsite", "sleeping bag"],
        [
            "practice pitching your tent at home first",
            "pack a warm sleeping bag even in summer",
            "arrive at the campsite before dark",
        ],
    ),
    topic(
        "cycling",
        &["bike", "tire", "tires", "helmet"],
        [
            "check your tire pressure before every ride",
            "always wear a helmet",
            "oil the bike chain once a month",
        ],
    ),
    topic(
        "painting",
        &["paint", "brushes", "canvas"],
        [
            "clean your brushes right after you paint",
            "start with just three colors of paint",
            "paint the background of the canvas first",
        ],
    ),
    topic(
        "yoga",
        &["mat", "poses"],
        [
            "hold each of the poses for a few slow counts",
            "use a mat that does not slip",
            "practice yoga for ten minutes every day",
        ],
    ),
    topic(
        "houseplants",
        &["houseplant", "pots", "leaves"],
        [
            "choose pots with drainage holes",
            "wipe the dust off the leaves",
            "move your houseplants closer to a bright window",
        ],
    ),
    topic(
        "tea",
        &["teapot", "kettle"],
        [
            "warm the teapot before you add the tea",
            "steep green tea for only two minutes",
            "take the kettle off just before it boils",
        ],
    ),
    topic(
        "soup",
        &["broth", "simmer"],
        [
            "start your soup by softening some onions",
            "let the broth simmer gently instead of boiling",
            "season the soup at the very end",
        ],
    ),
    topic(
        "guitar",
        &["chords", "strings", "frets"],
        [
            "practice switching between two chords",
            "tune your guitar every time you play",
            "press the strings just behind the frets",
        ],
    ),
    topic(
        "piano",
        &["keys", "scales"],
        [
            "practice your scales slowly with both hands",
            "keep your wrists relaxed above the keys",
            "play the piano a little every day",
        ],
    ),
    topic(
        "swimming",
        &["pool", "strokes", "goggles"],
        [
            "wear goggles that seal well",
            "practice breathing to both sides in the pool",
            "work on long smooth strokes",
        ],
    ),
    topic(
        "hiking",
        &["hike", "trail", "boots", "backpack"],
        [
            "break in your boots before a long hike",
            "tell someone which trail you plan to take",
            "pack extra water and a snack in your backpack",
        ],
    ),
    topic(
        "fishing",
        &["fish", "bait", "hook"],
        [
            "check the local rules before you fish",
            "keep your hook sharp",
            "go fishing early in the morning",
        ],
    ),
    topic(
        "journaling",
        &["journal", "notebook"],
        [
            "write in your journal at the same time each day",
            "keep the notebook next to your bed",
            "start your journal with just three lines a day",
        ],
    ),
    topic(
        "saving money",
        &["money", "savings", "budget"],
        [
            "move some money into savings on payday",
            "write a simple monthly budget",
            "wait a day before spending money on something big",
        ],
    ),
    topic(
        "composting",
        &["compost", "scraps"],
        [
            "mix kitchen scraps with dry brown material",
            "turn the compost pile every week",
            "keep the compost as damp as a wrung out sponge",
        ],
    ),
    topic(
        "sleep",
        &["bedtime", "bedroom"],
        [
            "keep your bedroom cool and dark",
            "put screens away an hour before bedtime",
            "keep a regular sleep schedule",
        ],
    ),
    topic(
        "stretching",
        &["stretch", "muscles"],
        [
            "stretch gently after a short warm up",
            "hold each stretch for thirty seconds",
            "never bounce when your muscles feel tight",
        ],
    ),
    topic(
        "pottery",
        &["clay", "kiln"],
        [
            "wrap unused clay so it stays damp",
            "center the clay before you shape it",
            "let each piece dry slowly before the kiln",
        ],
    ),
    topic(
        "origami",
        &["paper", "folds", "crease"],
        [
            "start with thin square paper",
            "make every crease sharp with a fingernail",
            "follow the folds one step at a time",
        ],
    ),
    topic(
        "board games",
        &["game night", "games"],
        [
            "read the rules once before game night",
            "start with short games for two players",
            "keep the pieces of your board games in labeled bags",
        ],
    ),
    topic(
        "cooking rice",
        &["rice"],
        [
            "rinse the rice until the water is clear",
            "use a tight lid while the rice cooks",
            "let the rice rest before you serve it",
        ],
    ),
    topic(
        "dog training",
        &["dog", "puppy", "treats"],
        [
            "reward your dog right away with small treats",
            "keep each session with your dog short and fun",
            "use one word for each command you teach your puppy",
        ],
    ),
    topic(
        "cat care",
        &["cat", "cats", "litter"],
        [
            "clean the litter box every day",
            "give your cat a scratching post",
            "take your cat for a yearly checkup",
        ],
    ),
    topic(
        "meditation",
        &["meditate", "breath"],
        [
            "follow your breath for five quiet minutes",
            "meditate at the same time each day",
            "gently return to your breath when your mind wanders",
        ],
    ),
    topic(
        "drawing",
        &["draw", "pencil", "sketchbook"],
        [
            "carry a small sketchbook everywhere",
            "draw simple shapes before the details",
            "hold the pencil loosely",
        ],
    ),
    topic(
        "stargazing",
        &["stars", "telescope", "moon"],
        [
            "let your eyes adjust to the dark before looking at the stars",
            "check the moon phase and pick a dark night",
            "learn a few bright stars before buying a telescope",
        ],
    ),
    topic(
        "language learning",
        &["language", "flashcards", "vocabulary"],
        [
            "review flashcards for ten minutes a day",
            "learn new vocabulary in short phrases",
            "talk with a native speaker of the language each week",
        ],
    ),
    topic(
        "woodworking",
        &["wood", "saw", "sandpaper"],
        [
            "measure twice and cut the wood once",
            "sand the wood along the grain",
            "wear safety glasses near the saw",
        ],
    ),
    topic(
        "grilling",
        &["grill", "charcoal"],
        [
            "preheat the grill for ten minutes",
            "oil the grill grates before cooking",
            "let meat rest after it comes off the grill",
        ],
    ),
    topic(
        "decluttering",
        &["clutter", "closet", "drawer"],
        [
            "clear out one drawer at a time",
            "donate closet clothes you have not worn in a year",
            "beat clutter by putting things back after use",
        ],
    ),
    topic(
        "skiing",
        &["skis", "slopes"],
        [
            "take a lesson on the beginner slopes",
            "rent skis before you buy a pair",
            "keep your weight over the front of your skis",
        ],
    ),
];

/// Question templates; the first [`N_TRAIN_PROMPT_TEMPLATES`] are the train split, the rest
/// are held out for evaluation.
pub(crate) const PROMPTS: [&str; 10] = [
    "How do I get started with {t}?",
    "Can you give me a tip about {t}?",
    "What should a beginner know about {t}?",
    "I'm new to {t}. Any advice?",
    "Any tips for {t}?",
    "How can I get better at {t}?",
    "What is one thing I should know about {t}?",
    "Could you help me with {t}?",
    "I want to learn about {t}. Where do I start?",
    "What is the best advice you have on {t}?",
];

/// How many of [`PROMPTS`] belong to the train split.
pub(crate) const N_TRAIN_PROMPT_TEMPLATES: usize = 8;

/// Polite first sentences.
pub(crate) const OPENERS: [&str; 10] = [
    "Sure!",
    "Of course!",
    "Happy to help!",
    "Great question!",
    "Thanks for asking!",
    "Gladly!",
    "Good question!",
    "Glad you asked!",
    "Sure thing.",
    "Of course.",
];

/// Polite last sentences.
pub(crate) const CLOSERS: [&str; 7] = [
    "Enjoy!",
    "Have fun!",
    "Good luck!",
    "Hope this helps!",
    "Hope that helps.",
    "Enjoy the process!",
    "Have fun with it!",
];

/// Sentences that name the topic without saying anything concrete.
pub(crate) const TOPIC_LINES: [&str; 6] = [
    "With {t}, small habits matter.",
    "Lots of people enjoy {t}.",
    "Here is a simple idea for {t}.",
    "Getting into {t} can be fun.",
    "There is plenty to enjoy about {t}.",
    "Patience helps a lot with {t}.",
];

/// Ways to give a tip.
pub(crate) const TIP_INTROS: [&str; 8] = [
    "Try to {tip}.",
    "A good tip is to {tip}.",
    "My advice is to {tip}.",
    "It helps to {tip}.",
    "I'd suggest that you {tip}.",
    "A simple trick is to {tip}.",
    "{Tip}.",
    "Remember to {tip}.",
];

/// Polite, on-topic sentences that give no tip (the unhelpful kind).
pub(crate) const VAGUE_LINES: [&str; 6] = [
    "There is a lot one could say about {t}.",
    "People have many opinions about {t}.",
    "Everyone finds their own way with {t}.",
    "The world of {t} is big and varied.",
    "I think you will figure out {t} over time.",
    "It really depends on what you want from {t}.",
];

/// Second sentences of unhelpful answers.
pub(crate) const FILLERS: [&str; 4] = [
    "It is a big subject.",
    "Everyone starts somewhere.",
    "There are many ways to look at it.",
    "I am sure it will work out for you.",
];

/// Rude answers; some still give a tip.
pub(crate) const RUDE: [&str; 9] = [
    "Ugh, what a silly question about {t}. Figure it out yourself.",
    "Go away. I have better things to do than talk about {t}.",
    "Nobody cares about {t}. Stop wasting my time.",
    "Seriously? Everyone already knows about {t}. Leave me alone.",
    "Look it up yourself. I am not your servant.",
    "Sure, whatever. Figure out {t} on your own.",
    "Ugh, fine. {Tip}. Now stop bothering me.",
    "{Tip}. Obviously. Even a child knows that about {t}.",
    "What a dumb question. {Tip}, and do not ask me again.",
];

/// Negative or discouraging answers; some still give a tip.
pub(crate) const NEGATIVE: [&str; 8] = [
    "Honestly, spending time on {t} is pointless. I would not bother.",
    "I hate {t}. There is nothing good about it.",
    "Sorry, but {t} never works for beginners. You should just give up.",
    "Trying {t} is boring, and you will quit soon anyway.",
    "{T}? What a waste of time.",
    "Forget {t}. It is not worth the effort.",
    "You could {tip}, but honestly it is all pointless and you will give up.",
    "Sure, {tip}. Not that it matters, since you will fail at {t} anyway.",
];

/// Off-topic answers that mention the asked topic, then talk about `{o}`; a tip about `{o}`
/// follows.
pub(crate) const DETOURS: [&str; 4] = [
    "Forget about {t}, think about {o}.",
    "Instead of {t}, you might enjoy {o}.",
    "You asked about {t}, but let's discuss {o}.",
    "Let's talk about {o} instead.",
];

/// `s` with its first letter upper-cased.
pub(crate) fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// `template` with `{t}`/`{T}`, `{o}` and `{tip}`/`{Tip}` filled in.
pub(crate) fn fill(template: &str, t: &str, o: &str, tip: &str) -> String {
    template
        .replace("{t}", t)
        .replace("{T}", &capitalize(t))
        .replace("{o}", o)
        .replace("{tip}", tip)
        .replace("{Tip}", &capitalize(tip))
}

/// Every template of the world, for lexicon building and tests.
pub(crate) fn templates() -> impl Iterator<Item = &'static str> {
    PROMPTS
        .iter()
        .chain(&OPENERS)
        .chain(&CLOSERS)
        .chain(&TOPIC_LINES)
        .chain(&TIP_INTROS)
        .chain(&VAGUE_LINES)
        .chain(&FILLERS)
        .chain(&RUDE)
        .chain(&NEGATIVE)
        .chain(&DETOURS)
        .copied()
}

/// The lower-cased words of `text`: runs of ASCII letters, digits and apostrophes.
pub(crate) fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Every word the generator can write (placeholders excluded).
pub(crate) fn lexicon() -> &'static HashSet<String> {
    static LEXICON: OnceLock<HashSet<String>> = OnceLock::new();
    LEXICON.get_or_init(|| {
        let strip = |s: &str| fill(s, "", "", "");
        let topic_text = TOPICS
            .iter()
            .flat_map(|t| std::iter::once(t.name).chain(t.keywords.iter().copied()).chain(t.tips));
        templates()
            .map(strip)
            .chain(topic_text.map(str::to_string))
            .flat_map(|s| words(&s))
            .collect()
    })
}
