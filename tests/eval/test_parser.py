"""The answer parser on real-world answer shapes (many taken from the original project's outputs)."""
import pytest

from cgjax.eval.parser import (AnswerParser, LabelMatcher, canonical, detect_mode, extract_json, parse_answer,
                               prompt_mode)
from cgjax.text import STAGE_A_PROMPT, STAGE_B_PROMPTS

WIKIART = {
    "artist": ["vincent-van-gogh", "claude-monet", "pablo-picasso", "rembrandt", "leonardo-da-vinci"],
    "style": ["Post_Impressionism", "Realism", "Impressionism", "Symbolism", "Baroque", "Expressionism",
              "High_Renaissance", "Early_Renaissance", "Cubism", "Synthetic_Cubism", "Art_Nouveau"],
    "genre": ["still_life", "genre_painting", "landscape", "sketch_and_study", "portrait", "cityscape",
              "nude_painting", "religious_painting"],
}
U = "Unknown"
VG, MO, PI, RE, DV = WIKIART["artist"]

# (id, mode, answer, expected (artist, style, genre), JSON parsed, evidence starts with)
CASES = [
    ("clean_json", "structured",
     '<BEGIN_JSON>{"artist": "Claude Monet", "style": "Impressionism", "genre": "landscape", '
     '"evidence": "Loose broken strokes."}<END_JSON>', (MO, "Impressionism", "landscape"), True, "Loose broken"),
    ("prose_before_after", "structured",
     'Sure, here is my answer.\n<BEGIN_JSON>\n{"artist": "Rembrandt", "style": "Baroque", "genre": "portrait", '
     '"evidence": "Deep chiaroscuro."}\n<END_JSON>\nLet me know if you need more.', (RE, "Baroque", "portrait"),
     True, "Deep chiaroscuro"),
    ("missing_end_sentinel", "structured",
     '<BEGIN_JSON>{"artist": "Pablo Picasso", "style": "Cubism", "genre": "still_life", "evidence": "Facets."} '
     'and some trailing words', (PI, "Cubism", "still_life"), True, "Facets"),
    ("curly_quotes", "structured",
     "{\u201cartist\u201d: \u201cVincent van Gogh\u201d, \u201cstyle\u201d: \u201cPost-Impressionism\u201d, "
     "\u201cgenre\u201d: \u201clandscape\u201d, \u201cevidence\u201d: \u201cSwirling impasto.\u201d}",
     (VG, "Post_Impressionism", "landscape"), True, "Swirling"),
    ("trailing_commas", "structured",
     '{"artist": "claude-monet", "style": "Impressionism", "genre": "cityscape", "evidence": "Fog.",}',
     (MO, "Impressionism", "cityscape"), True, "Fog"),
    ("json_fence", "structured",
     '```json\n{\n  "artist": "vincent_van_gogh",\n  "style": "Post_Impressionism",\n  "genre": "landscape",\n'
     '  "evidence": "Thick paint."\n}\n```', (VG, "Post_Impressionism", "landscape"), True, "Thick paint"),
    # the original's seed_43 output: no sentinels, JSON then a stray word
    ("json_then_stray_word", "structured",
     '{\n"artist": "vincent",\n"style": "realism",\n"genre": "genre_painting",\n"evidence": "The image depicts a '
     'woman in a domestic setting."\n}\n\nThe', (VG, "Realism", "genre_painting"), True, "The image depicts"),
    # cut off by max_new_tokens mid-evidence (no closing quote or brace)
    ("truncated_mid_evidence", "structured",
     '{\n"artist": "vincent_van_gogh",\n"style": "Post_Impressionism",\n"genre": "landscape",\n"evidence": "The '
     'painting depicts a landscape with a river flowing through a rocky area, with a small village nestled in the '
     'background. The brushwork is characterized by thick, swirling lines and vibrant colors, typical of Vincent',
     (VG, "Post_Impressionism", "landscape"), False, "The painting depicts a landscape"),
    ("unknown_values", "structured",
     '<BEGIN_JSON>{"artist": "Unknown", "style": "", "genre": "Unknown Genre", "evidence": "Hard to tell."}'
     '<END_JSON>', (U, U, U), True, "Hard to tell"),
    ("missing_keys", "structured", '{"artist": "Rembrandt", "evidence": "Dark."}', (RE, U, U), True, "Dark"),
    ("python_literal", "structured",
     "{'artist': 'Leonardo da Vinci', 'style': 'High Renaissance', 'genre': 'religious painting', "
     "'evidence': 'Sfumato.'}", (DV, "High_Renaissance", "religious_painting"), True, "Sfumato"),
    ("nested_object", "structured",
     '{"answer": {"artist": "Monet", "style": "impressionist", "genre": "landscapes", "evidence": "Light."}}',
     (MO, "Impressionism", "landscape"), True, "Light"),
    ("prompt_echo", "structured",
     "Between <BEGIN_JSON> and <END_JSON>, return only a compact JSON with keys artist, style, genre, evidence. "
     '<BEGIN_JSON>{"artist": "Rembrandt", "style": "Baroque", "genre": "portrait", "evidence": "Gold light."}'
     "<END_JSON>", (RE, "Baroque", "portrait"), True, "Gold light"),
    ("list_value", "structured",
     '{"artist": ["Unknown", "Claude Monet"], "style": ["Impressionism"], "genre": "landscape", '
     '"evidence": ["A.", "B."]}',
     (MO, "Impressionism", "landscape"), True, "A. B."),
    ("value_not_in_vocab", "structured",
     '{"artist": "Katsushika Hokusai", "style": "Ukiyo-e", "genre": "landscape", "evidence": "Waves."}',
     (U, U, "landscape"), True, "Waves"),
    ("structured_prompt_prose_answer", "structured",
     "I think this is a Post-Impressionist landscape by Van Gogh, judging by the swirling strokes.",
     (VG, "Post_Impressionism", "landscape"), False, "I think"),
    ("natural_aliases", "natural",
     "This luminous scene is by Monet: an impressionist view of landscapes, with broken colour and soft light.",
     (MO, "Impressionism", "landscape"), False, "This luminous"),
    ("natural_longest_match", "natural",
     "Vincent van Gogh painted this Post-Impressionist landscape; unlike Monet he used thick impasto.",
     (VG, "Post_Impressionism", "landscape"), False, "Vincent"),
    ("natural_da_vinci_possessive", "natural",
     "Da Vinci's portraits, like this one, show High-Renaissance sfumato.",
     (DV, "High_Renaissance", "portrait"), False, "Da Vinci"),
    ("natural_cubist_still_life", "natural",
     "A still life of a guitar and bottle in cubist facets, typical of Picasso.", (PI, "Cubism", "still_life"),
     False, "A still life"),
    ("garbage", "natural", "asdkjh qwe zzz 12345 !!!", (U, U, U), False, "asdkjh"),
    ("empty", "natural", "", (U, U, U), False, ""),
    ("unknown_word", "natural", "Unknown", (U, U, U), False, "Unknown"),
    ("empty_structured", "structured", "", (U, U, U), False, ""),
    ("keys_stage_b", "keys",
     "artist: vincent\nstyle: realism\ngenre: genre_painting\nThe painting depicts a woman in a realistic style.",
     (VG, "Realism", "genre_painting"), False, "The painting depicts"),
    ("keys_markdown", "keys",
     "**Artist:** Claude Monet\n**Style:** Impressionist\n- genre: Landscapes.\n\nBroken colour and light.",
     (MO, "Impressionism", "landscape"), False, "Broken colour"),
    ("keys_unknown", "keys", "artist: Unknown\nstyle: Unknown\ngenre: portrait", (U, U, "portrait"), False, ""),
    ("keys_missing_line", "keys", "artist: rembrandt\nstyle: baroque\nA dark portrait of an old man.",
     (RE, "Baroque", "portrait"), False, "A dark portrait"),
]


@pytest.fixture(scope="module")
def parser():
    return AnswerParser(WIKIART)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_answer_shapes(parser, case):
    _, mode, text, expected, json_ok, evidence = case
    got = parser.parse(text, mode)
    assert (got.label("artist"), got.label("style"), got.label("genre")) == expected
    assert got.json_ok is json_ok
    assert got.mode == mode
    assert got.evidence.startswith(evidence)


def test_truncated_evidence_keeps_partial_text(parser):
    got = parser.parse('{"artist": "rembrandt", "style": "Baroque", "genre": "portrait", "evidence": "Warm gold '
                       'light falls on the', "structured")
    assert got.evidence == "Warm gold light falls on the"
    assert got.raw_labels["artist"] == "rembrandt"


@pytest.mark.parametrize("value", ["Unknown", "unknown", "UNKNOWN ", "", "N/A", "none", "null", "Unknown Genre",
                                   "unknown artist", None, [], {"x": 1}])
def test_unknown_never_snapped(parser, value):
    for d in WIKIART:
        assert parser.matcher.snap(value, d) == "Unknown"


@pytest.mark.parametrize("value,dim,expected", [
    ("vincent_van_gogh", "artist", VG), ("Vincent Van Gogh", "artist", VG), ("van gogh", "artist", VG),
    ("Gogh", "artist", VG), ("vincent", "artist", VG), ("Leonardo", "artist", DV), ("davinci", "artist", DV),
    ("post-impressionist", "style", "Post_Impressionism"), ("Post Impressionism", "style", "Post_Impressionism"),
    ("postimpressionism", "style", "Post_Impressionism"), ("impressionism", "style", "Impressionism"),
    ("synthetic cubist", "style", "Synthetic_Cubism"), ("cubists", "style", "Cubism"),
    ("art-nouveau", "style", "Art_Nouveau"), ("Renaissance", "style", "Unknown"),  # ambiguous: early or high
    ("landscapes", "genre", "landscape"), ("Portraits", "genre", "portrait"), ("still life", "genre", "still_life"),
    ("still-lifes", "genre", "still_life"), ("sketches and studies", "genre", "sketch_and_study"),
    ("Genre painting", "genre", "genre_painting"), ("cityscapes", "genre", "cityscape"),
])
def test_snap_values(parser, value, dim, expected):
    assert parser.matcher.snap(value, dim) == expected


def test_ambiguous_alias_is_dropped():
    m = LabelMatcher({"artist": ["john-smith", "anna-smith", "paul-klee"]})
    assert m.find("a picture by Smith", "artist") is None  # "smith" names two artists
    assert m.find("a picture by Klee", "artist") == "paul-klee"
    assert m.find("a picture by Anna Smith", "artist") == "anna-smith"


def test_prose_mentions_vote(parser):
    # two artists named once each: the full form wins over an alias; then the earliest
    assert parser.matcher.find("Unlike Monet, Vincent van Gogh used thick paint.", "artist") == VG
    assert parser.matcher.find("Monet, not Picasso.", "artist") == MO
    assert parser.matcher.find("Picasso? Monet. Monet!", "artist") == MO


def test_whole_words_only(parser):
    assert parser.matcher.find("portraiture and landscaped gardens", "genre") is None
    assert parser.matcher.find("rembrandtesque", "artist") is None


def test_dimensions_are_data():
    vocabs = {"medium": ["oil_on_canvas", "watercolor"], "mood": ["serene", "melancholic"]}
    p = AnswerParser(vocabs)
    got = p.parse("medium: watercolour?\nmood: Melancholic\nSoft washes and grey tones.", "keys")
    assert got.labels == {"medium": "Unknown", "mood": "melancholic"}  # "watercolour" is no vocabulary form
    got = p.parse('<BEGIN_JSON>{"medium": "oil on canvas", "mood": "serene", "evidence": "Calm."}<END_JSON>')
    assert got.mode == "structured" and got.labels == {"medium": "oil_on_canvas", "mood": "serene"}
    assert p.parse("medium: watercolor\nmood: serene\nCalm.").mode == "keys"


def test_custom_sentinels():
    p = AnswerParser(WIKIART, sentinels=("[[", "]]"))
    got = p.parse('[[{"artist": "Monet", "style": "Impressionism", "genre": "landscape", "evidence": "x"}]]',
                  "structured")
    assert got.json_ok and got.label("artist") == MO


@pytest.mark.parametrize("text", [None, 123, "{", "}", "{{{", '{"artist": ', "<BEGIN_JSON>", "<END_JSON>{",
                                  "\x00\x01", "artist:", "artist: \nstyle:", "{" * 500 + "}" * 3,
                                  '{"artist": {"nested": "x"}}', "💥 ünïcödé 漢字"])
@pytest.mark.parametrize("mode", [None, "structured", "natural", "keys"])
def test_never_crashes(parser, text, mode):
    got = parser.parse(text, mode)
    assert set(got.labels) == set(WIKIART)
    assert all(v == "Unknown" or v in WIKIART[d] for d, v in got.labels.items())


def test_extract_json_and_canonical():
    assert extract_json('x <BEGIN_JSON>{"artist": "a"}<END_JSON> y') == {"artist": "a"}
    assert extract_json("no json here") is None
    assert extract_json('{"unrelated": 1}') is None
    assert canonical("  Post_Impressionism ") == "post impressionism"
    assert canonical("Dürer—Albrecht") == "durer albrecht"


def test_mode_detection(parser, prompts):
    STRUCTURED_PROMPT, NATURAL_PROMPT = prompts["structured"], prompts["natural"]
    assert prompt_mode(STRUCTURED_PROMPT) == "structured"
    assert prompt_mode(NATURAL_PROMPT) == "natural"
    assert prompt_mode(STAGE_A_PROMPT) == "keys"
    assert all(prompt_mode(p) == "keys" for p in STAGE_B_PROMPTS)
    original_keys = ("Identify the artist, style, and genre of this painting. First provide three lines: "
                     "'artist: ...', 'style: ...', 'genre: ...'. Then explain your reasoning in 2-3 sentences.")
    original_json = ("Return a JSON object with exactly these keys: artist, style, genre, evidence. Wrap the JSON "
                     "between <BEGIN_JSON> and <END_JSON>.")
    assert prompt_mode(original_keys) == "keys"
    assert prompt_mode(original_json) == "structured"
    assert prompt_mode("What is this?") is None
    # an answer that parses as JSON is structured whatever the prompt (the original's rule)
    assert detect_mode(NATURAL_PROMPT, '{"artist": "Monet"}', parser) == "structured"
    assert detect_mode("What is this?", "artist: Monet\nstyle: Impressionism\ngenre: landscape", parser) == "keys"
    assert detect_mode("What is this?", "A Monet.", parser) == "natural"
    assert parse_answer("artist: Monet\nstyle: x\ngenre: portrait", WIKIART).mode == "keys"


def test_unknown_genre_is_a_class_when_the_vocabulary_has_it():
    """WikiArt's ``Unknown Genre`` (the original's literal for a missing genre) is a real class:
    a value naming it snaps to it; ``Unknown`` and other unknown words still mean no answer."""
    vocabs = dict(WIKIART, genre=WIKIART["genre"] + ["Unknown Genre"])
    p = AnswerParser(vocabs)
    for value in ("Unknown Genre", "unknown genre", "Unknown_Genre", "unknown genres"):
        assert p.matcher.snap(value, "genre") == "Unknown Genre"
    for value in ("Unknown", "unknown", "n/a", "unknown style"):
        assert p.matcher.snap(value, "genre") == U
    got = p.parse('{"artist": "Rembrandt", "style": "Baroque", "genre": "Unknown Genre", "evidence": "Dark."}')
    assert got.labels == {"artist": RE, "style": "Baroque", "genre": "Unknown Genre"} and got.json_ok
    # prose: the label named in full is found; a bare "unknown" is not evidence for it
    named = p.parse("A Baroque work by Rembrandt; its genre is unknown genre.", "natural")
    assert named.label("genre") == "Unknown Genre"
    assert p.parse("A Baroque work by Rembrandt, subject unknown.", "natural").label("genre") == U
