"""OK-VQA answer stemming: predictions are stemmed the way OK-VQA v1.1 stemmed its ``answers`` field.

OK-VQA v1.1 ships ``raw_answers`` and stemmed ``answers``; the standard evaluation (OK-VQA's, which
OpenFlamingo reproduces) stems the prediction, then scores it with the VQA accuracy against ``answers``.
Per word: a listed exception (OK-VQA's own irregular stems, e.g. "jeans" -> "jean", "riding" -> "ride");
else a word ending in "ing" -> its verb lemma; else a plural noun -> its singular (``inflection``).

The reference implementation tags parts of speech with NLTK and lemmatises with WordNet, both of which
need data downloaded at run time. Here the lemmas and the "is this a plural noun" test come from
``lemminflect``'s lexicon, shipped inside its wheel, so nothing is fetched: a word whose noun lemma differs
from itself is plural; a word outside the lexicon is plural if it ends in "s" (not "ss", "us", "is"),
which is what a tagger guesses for unknown words. Single-word answers, OK-VQA's bulk, stem identically.
"""

from __future__ import annotations

import re
from functools import lru_cache

# word -> stem, the OK-VQA v1.1 stems that the rules below miss or get wrong (collected from the dataset's
# raw_answers / answers pairs by OpenFlamingo, ok_vqa_utils.py)
_EXCEPTIONS = dict(pair.split(":") for pair in """
police:police las:las vegas:vegas yes:yes jeans:jean hell's:hell domino's:domino morning:morn clothes:cloth are:are
riding:ride leaves:leaf dangerous:danger clothing:cloth texting:text kiting:kite firefighters:firefight ties:tie married:married
teething:teeth gloves:glove tennis:tennis dining:dine directions:direct waves:wave christmas:christmas drives:drive pudding:pud
coding:code plating:plate quantas:quanta hornes:horn graves:grave mating:mate paned:pane alertness:alert sunbathing:sunbath
tenning:ten wetness:wet urinating:urine sickness:sick braves:brave firefighting:firefight lenses:lens reflections:reflect
backpackers:backpack eatting:eat designers:design curiousity:curious playfulness:play blindness:blind hawke:hawk tomatoe:tomato
rodeoing:rodeo brightness:bright circuses:circus skateboarders:skateboard staring:stare electronics:electron electicity:elect
mountainous:mountain socializing:social hamburgers:hamburg caves:cave transitions:transit wading:wade creame:cream
toileting:toilet sautee:saute buildings:build belongings:belong stockings:stock walle:wall cumulis:cumuli travelers:travel
conducter:conduct browsing:brows pooping:poop haircutting:haircut toppings:top hearding:heard sunblocker:sunblock bases:base
markings:mark mopeds:mope kindergartener:kindergarten pies:pie scrapbooking:scrapbook couponing:coupon meetings:meet
elevators:elev lowes:low men's:men childrens:children shelves:shelve paintings:paint raines:rain paring:pare
expressions:express routes:rout pease:peas vastness:vast awning:awn boy's:boy drunkenness:drunken teasing:teas
conferences:confer ripeness:ripe suspenders:suspend earnings:earn reporters:report kid's:kid containers:contain corgie:corgi
porche:porch microwaves:microwave batter's:batter sadness:sad apartments:apart oxygenize:oxygen striping:stripe purring:pure
professionals:profession piping:pipe farmer's:farmer potatoe:potato emirates:emir womens:women veteran's:veteran
wilderness:wilder propellers:propel alpes:alp charioteering:chariot swining:swine illness:ill crepte:crept adhesives:adhesive
regent's:regent decorations:decor rabbies:rabbi overseas:oversea travellers:travel casings:case smugness:smug doves:dove
nationals:nation mustange:mustang ringe:ring gondoliere:gondolier vacationing:vacate reminders:remind baldness:bald
settings:set glaced:glace coniferous:conifer revelations:revel personals:person daughter's:daughter badness:bad
projections:project polarizing:polar vandalizers:vandal minerals:miner protesters:protest controllers:control weddings:wed
sometimes:sometime earing:ear
""".split())

# Penn-Treebank-like word split (as nltk.word_tokenize): clitics 's / n't and punctuation become tokens
_TOKEN = re.compile(r"[A-Za-z0-9]+(?=n't)|n't|'[A-Za-z]+|[A-Za-z0-9]+(?:[-.][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def _is_plural_noun(word: str) -> bool:
    import lemminflect

    lemmas = lemminflect.getAllLemmas(word)
    if lemmas:
        return any(lemma != word for lemma in lemmas.get("NOUN", ()))
    return word.endswith("s") and not word.endswith(("ss", "us", "is"))


@lru_cache(maxsize=65536)
def stem_word(word: str) -> str:
    """One token -> its OK-VQA stem: "gloves" -> "glove", "skiing" -> "ski", "dogs" -> "dog", "bus" -> "bus"."""
    if word in _EXCEPTIONS:
        return _EXCEPTIONS[word]
    if word.endswith("ing"):
        import lemminflect

        # WordNet leaves a word it does not know unchanged: no rule-based guess for unknown words either
        lemmas = lemminflect.getLemma(word, upos="VERB", lemmatize_oov=False)
        return lemmas[0] if lemmas else word
    if _is_plural_noun(word):
        import inflection

        return inflection.singularize(word)
    return word


def okvqa_stem(text: str) -> str:
    """A prediction -> OK-VQA's stemmed form: tokens stemmed one by one, joined by single spaces."""
    return " ".join(stem_word(t) for t in _TOKEN.findall(text))


__all__ = ["okvqa_stem", "stem_word"]
