"""Robust parsing of model answers into one label per concept dimension (see ``docs/evaluation.md``).

Three answer shapes are understood:

* **structured**: a JSON object (keys = the dimensions + ``evidence``), taken between the sentinels
  (``<BEGIN_JSON>`` / ``<END_JSON>``, configurable; a missing end sentinel is tolerated), else from
  the first ``{`` to the last ``}``. Code fences are stripped, curly quotes straightened, trailing
  commas dropped, Python-literal dicts accepted. When that still fails (typically an answer cut off
  mid-``evidence``), ``"key": "value"`` pairs are read by pattern and the rest by prose matching.
* **keys**: the Stage A/B training shape ``artist: X\\nstyle: Y\\ngenre: Z\\n<reason>``.
* **natural**: free prose; labels are found by whole-word matching of canonical forms and aliases.

Every key value is *snapped* to the vocabulary of its dimension. ``Unknown`` (or empty, ``none``,
``n/a``...) stays ``Unknown``: it counts as wrong and is never snapped to a real label. A label of
the vocabulary that merely starts with "unknown" (WikiArt's ``Unknown Genre``) is a real class: the
value naming it in full snaps to it. Nothing in here raises on bad text.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

from cgjax.data.schema import DEFAULT_DIMENSIONS, UNKNOWN, Vocabulary

DEFAULT_SENTINELS: tuple[str, str] = ("<BEGIN_JSON>", "<END_JSON>")
EVIDENCE_KEYS = ("evidence", "reason", "reasoning", "explanation", "justification", "rationale")
MODES = ("structured", "natural", "keys")

#: Canonical values that mean "no answer"; a value starting with ``unknown`` is also Unknown.
UNKNOWN_VALUES = frozenset({"", "unknown", "none", "n a", "na", "null", "nil", "uncertain", "unsure",
                            "not sure", "not known", "unidentified", "unclear", "undetermined", "tbd"})
#: Name particles kept with an artist's last name (``van gogh``, ``da vinci``).
NAME_PARTICLES = frozenset({"van", "von", "de", "da", "di", "del", "della", "der", "den", "du", "la", "le", "ter"})
#: Tokens never used alone as evidence for a label (too common in prose).
GENERIC_TOKENS = frozenset({"painting", "paintings", "art", "artwork", "genre", "style", "work", "picture",
                            "image", "the", "and", "of", "a", "an", "in", "on", "school", "period", "still",
                            "life", "early", "late", "high", "new"})

_QUOTES = {"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"',
           "\u00bb": '"', "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'"}
_QUOTE_RE = re.compile("[" + "".join(_QUOTES) + "]")
_FENCE_RE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?")
_TRAILING_COMMA_RE = re.compile(r",\s*([}\]])")


def canonical(text: Any) -> str:
    """Lower case ASCII, diacritics stripped, every run of non-alphanumerics -> one space."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return re.sub(r"[^0-9a-z]+", " ", text).strip()


def straighten_quotes(text: str) -> str:
    return _QUOTE_RE.sub(lambda m: _QUOTES[m.group(0)], text)


def stem(token: str) -> str:
    """A light stem for fuzzy comparisons: ``-ist/-ists/-istic`` -> ``-ism``, plural ``s`` dropped."""
    for suf in ("istic", "ists", "ist"):
        if token.endswith(suf) and len(token) > len(suf) + 2:
            return token[: -len(suf)] + "ism"
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    if token.endswith("s") and not token.endswith(("ss", "us", "is")) and len(token) > 3:
        return token[:-1]
    return token


def is_unknown(value: Any) -> bool:
    c = canonical("" if value is None else value)
    return c in UNKNOWN_VALUES or c.startswith("unknown ")


# ------------------------------------------------------------------------------------------------
# label matching


def _word_variants(token: str) -> set[str]:
    """Inflections of one word: -ism/-ist(s)/-istic, plural/singular."""
    out = {token}
    if token.endswith("ism") and len(token) > 5:
        base = token[:-3]
        out |= {base + "ist", base + "ists", base + "istic"}
    elif token.endswith("ist") and len(token) > 5:
        out |= {token[:-3] + "ism", token + "s"}
    if token.endswith(("s", "x", "ch", "sh")) and not token.endswith("ss"):
        out.add(token + "es")
    if token.endswith("y") and len(token) > 3 and token[-2] not in "aeiou":
        out.add(token[:-1] + "ies")
    elif token.endswith("ies") and len(token) > 4:
        out.add(token[:-3] + "y")
    if token.endswith("s") and not token.endswith(("ss", "us", "is")) and len(token) > 3:
        out.add(token[:-1])
    elif not token.endswith("s") and not token.isdigit():
        out.add(token + "s")
    return out


def _phrase_variants(tokens: Sequence[str]) -> set[tuple[str, ...]]:
    """The phrase with its last word inflected, plus the joined form (``postimpressionism``)."""
    out: set[tuple[str, ...]] = set()
    for last in _word_variants(tokens[-1]):
        out.add(tuple(tokens[:-1]) + (last,))
    if len(tokens) > 1:
        out |= {("".join(v),) for v in list(out)}
    return out


@dataclasses.dataclass(frozen=True)
class Mention:
    label: str
    start: int      # token position in the canonical text
    length: int     # tokens
    full: bool      # the label's full form (or an inflection), not a partial alias


class LabelMatcher:
    """Finds and snaps labels of every dimension.

    ``vocabs`` maps each dimension to its label names (a ``Vocabulary`` or a list). Aliases: the
    canonical form with hyphen/space/underscore/joined variants, ``-ism``/``-ist`` and plural/singular
    inflections (all dimensions); for ``person_dims`` (default ``artist``) also the last name and
    particle + last name (``van gogh``); for other dimensions the movement word of a multi-word
    label (``pointillism`` for ``Pointillism_Dots``). An alias shared by two labels of a dimension
    is dropped. ``min_score`` is the lowest best-match score accepted by the fallback.
    """

    def __init__(self, vocabs: Mapping[str, Vocabulary | Iterable[str]], *, min_score: float = 0.5,
                 person_dims: Iterable[str] = ("artist",)):
        self.vocabs = {d: [str(n) for n in v if n is not None and canonical(n) not in UNKNOWN_VALUES]
                       for d, v in vocabs.items()}
        self.min_score = float(min_score)
        self.person_dims = frozenset(person_dims)
        self._exact: dict[str, dict[str, str]] = {}
        self._aliases: dict[str, dict[tuple[str, ...], tuple[str, bool]]] = {}
        self._max_len: dict[str, int] = {}
        self._tokens: dict[str, dict[str, tuple[frozenset[str], frozenset[str]]]] = {}
        for d, names in self.vocabs.items():
            self._build(d, names)

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.vocabs)

    def _build(self, dim: str, names: Sequence[str]) -> None:
        exact: dict[str, str] = {}
        full: dict[tuple[str, ...], set[str]] = {}
        partial: dict[tuple[str, ...], set[str]] = {}
        toks: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for name in names:
            c = canonical(name)
            if not c:
                continue
            exact.setdefault(c, name)
            words = c.split()
            for v in _phrase_variants(words):
                full.setdefault(v, set()).add(name)
            stems = frozenset(stem(w) for w in words)
            informative = frozenset(stem(w) for w in words
                                    if w not in GENERIC_TOKENS and w not in UNKNOWN_VALUES and len(w) > 2)
            toks[name] = (stems, informative)
            if len(words) < 2:
                continue
            if dim in self.person_dims:
                cands = [words[-1:]]
                k = len(words) - 2
                while k >= 1 and words[k] in NAME_PARTICLES:
                    cands.append(words[k:])
                    k -= 1
                for cand in cands:
                    if len(cand[-1]) >= 3 and cand[-1] not in NAME_PARTICLES:
                        for v in _phrase_variants(cand):
                            partial.setdefault(v, set()).add(name)
            else:
                for w in words:
                    if w.endswith(("ism", "ist")) and len(w) > 5 and w not in GENERIC_TOKENS:
                        for v in _phrase_variants([w]):
                            partial.setdefault(v, set()).add(name)
        table: dict[tuple[str, ...], tuple[str, bool]] = {}
        for alias, owners in partial.items():
            if len(owners) == 1:
                table[alias] = (next(iter(owners)), False)
        for alias, owners in full.items():  # full forms win over partial aliases
            if len(owners) == 1:
                table[alias] = (next(iter(owners)), True)
            else:
                table.pop(alias, None)
        self._exact[dim] = exact
        self._aliases[dim] = table
        self._max_len[dim] = max((len(a) for a in table), default=1)
        self._tokens[dim] = toks

    # -- prose ------------------------------------------------------------------------------------

    def mentions(self, text: str, dim: str) -> list[Mention]:
        """Whole-word mentions of ``dim``'s labels in ``text``, longest match first, left to right."""
        table = self._aliases.get(dim)
        if not table or not text:
            return []
        words = canonical(text).split()
        out, i, n_max = [], 0, self._max_len[dim]
        while i < len(words):
            for n in range(min(n_max, len(words) - i), 0, -1):
                hit = table.get(tuple(words[i:i + n]))
                if hit is not None:
                    out.append(Mention(hit[0], i, n, hit[1]))
                    i += n
                    break
            else:
                i += 1
        return out

    def mentioned_labels(self, text: str, dim: str) -> set[str]:
        return {m.label for m in self.mentions(text, dim)}

    def find(self, text: str, dim: str, *, fallback: bool = True) -> str | None:
        """The label of ``dim`` that ``text`` names, or None.

        Mentions vote: most mentions, then a full-form mention over an alias, then the earliest.
        Without any mention, the best-match fallback (share of the label's informative words
        present in the text, stemmed) must reach ``min_score`` with a unique best.
        """
        ms = self.mentions(text, dim)
        if ms:
            stats: dict[str, list] = {}
            for m in ms:
                s = stats.setdefault(m.label, [0, False, m.start])
                s[0] += 1
                s[1] = s[1] or m.full
            return max(stats, key=lambda k: (stats[k][0], stats[k][1], -stats[k][2]))
        return self._best_in_text(text, dim) if fallback else None

    def _best_in_text(self, text: str, dim: str) -> str | None:
        words = {stem(w) for w in canonical(text).split()}
        if not words:
            return None
        scores = {}
        for name, (_, informative) in self._tokens.get(dim, {}).items():
            if informative:
                scores[name] = len(informative & words) / len(informative)
        return _unique_best(scores, self.min_score)

    # -- key values -------------------------------------------------------------------------------

    def snap(self, value: Any, dim: str) -> str:
        """A key value snapped to ``dim``'s vocabulary; ``Unknown`` when empty/unknown or unmatched."""
        if value is None:
            return UNKNOWN
        if isinstance(value, (list, tuple)):
            value = next((v for v in value if not is_unknown(v)), "")
        if isinstance(value, dict):
            return UNKNOWN
        value = str(value).strip()
        names = self.vocabs.get(dim, [])
        if value in names:
            return value
        c = canonical(value)
        if c in self._exact.get(dim, {}):
            return self._exact[dim][c]
        if is_unknown(value):  # unless it names a label in full ("unknown genres" -> Unknown Genre)
            hit = self._aliases.get(dim, {}).get(tuple(c.split()))
            return hit[0] if hit is not None and hit[1] else UNKNOWN
        found = self.find(value, dim, fallback=False)
        if found is not None:
            return found
        best = self._best_for_value(c, dim)
        return best if best is not None else UNKNOWN

    def _best_for_value(self, c: str, dim: str) -> str | None:
        """Token Jaccard / containment between a short value and each label (stemmed)."""
        v = frozenset(stem(w) for w in c.split())
        if not v:
            return None
        scores = {}
        for name, (lab, informative) in self._tokens.get(dim, {}).items():
            inter = len(v & lab)
            if not inter:
                continue
            jac = inter / len(v | lab)
            value_in_label = inter / len(v)  # "vincent" -> vincent-van-gogh
            label_in_value = len(informative & v) / len(informative) if informative else 0.0
            scores[name] = max(jac, value_in_label, label_in_value)
        return _unique_best(scores, self.min_score)


def _unique_best(scores: Mapping[str, float], min_score: float) -> str | None:
    if not scores:
        return None
    best = max(scores.values())
    if best < min_score:
        return None
    winners = [k for k, s in scores.items() if s == best]
    return winners[0] if len(winners) == 1 else None


# ------------------------------------------------------------------------------------------------
# JSON extraction


def _strip_fences(text: str) -> str:
    return _FENCE_RE.sub("", text)


def _payload_candidates(text: str, sentinels: tuple[str, str]) -> list[str]:
    start, end = sentinels
    low, s_low, e_low = text.lower(), start.lower(), end.lower()
    out = []
    pos = low.find(s_low) if s_low else -1
    while pos != -1:
        body_start = pos + len(start)
        e = low.find(e_low, body_start) if e_low else -1
        if e != -1:
            out.append(text[body_start:e])
        else:
            r = text.rfind("}")
            out.append(text[body_start:r + 1] if r > body_start else text[body_start:])
        pos = low.find(s_low, body_start)
    first = text.find("{")
    if first != -1:
        last = text.rfind("}")
        out.append(text[first:last + 1] if last > first else text[first:])
    return [c for c in out if "{" in c]


def _loads(payload: str) -> Any:
    for candidate in (payload, straighten_quotes(payload)):
        for fix in (candidate, _TRAILING_COMMA_RE.sub(r"\1", candidate)):
            try:
                return json.loads(fix, strict=False)
            except (ValueError, RecursionError):
                pass
            try:
                obj = ast.literal_eval(fix)
                if isinstance(obj, dict):
                    return obj
            except Exception:  # literal_eval raises many types on arbitrary text
                pass
    return None


def _lower_keys(obj: Mapping) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in obj.items()}


def _find_dims_object(obj: Any, dims: Sequence[str]) -> dict[str, Any] | None:
    """The object holding the dimension keys (top level, or one level down)."""
    if isinstance(obj, list):
        obj = next((o for o in obj if isinstance(o, dict)), None)
    if not isinstance(obj, dict):
        return None
    low = _lower_keys(obj)
    wanted = {d.lower() for d in dims} | set(EVIDENCE_KEYS)
    if wanted & set(low):
        return low
    for v in low.values():
        if isinstance(v, dict):
            inner = _lower_keys(v)
            if wanted & set(inner):
                return inner
    return None


def extract_json(text: str, sentinels: tuple[str, str] = DEFAULT_SENTINELS,
                 dimensions: Sequence[str] = DEFAULT_DIMENSIONS) -> dict[str, Any] | None:
    """The answer's JSON object with lower-cased keys, or None when no candidate parses."""
    if not text:
        return None
    cleaned = _strip_fences(str(text))
    for payload in _payload_candidates(cleaned, sentinels):
        found = _find_dims_object(_loads(payload.strip()), dimensions)
        if found is not None:
            return found
    return None


def _evidence_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _broken_json_fields(text: str, names: Sequence[str]) -> dict[str, str]:
    """``"name": "value"`` pairs read by pattern from JSON that does not parse (e.g. cut off)."""
    out = {}
    t = straighten_quotes(text)
    for name in names:
        m = re.search(r'["\']?' + re.escape(name) + r'["\']?\s*:\s*"((?:[^"\\]|\\.)*)("|$)', t,
                      re.IGNORECASE | re.DOTALL)
        if m is None:
            m = re.search(r'["\']' + re.escape(name) + r'["\']\s*:\s*\'([^\'\n]*)', t, re.IGNORECASE)
        if m is not None:
            value = m.group(1)
            try:
                value = json.loads('"' + value + '"', strict=False)
            except ValueError:
                pass
            out[name.lower()] = value
    return out


# ------------------------------------------------------------------------------------------------
# answers


@dataclasses.dataclass
class ParsedAnswer:
    """One parsed answer: a label (or ``Unknown``) per dimension, the reason text, how it was read."""

    labels: dict[str, str]
    evidence: str
    mode: str
    json_ok: bool = False
    raw_labels: dict[str, str | None] = dataclasses.field(default_factory=dict)  # values before snapping

    def label(self, dim: str) -> str:
        return self.labels.get(dim, UNKNOWN)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_KEY_LINE = (r"^[ \t]*(?:[-*\u2022>#]+[ \t]*)?\**[ \t]*({dims})[ \t]*\**[ \t]*"  # bullet, **bold**, the key
             r"[:=\uff1a][ \t]*\**[ \t]*(.*?)[ \t]*\**[ \t]*$")               # separator, the value


class AnswerParser:
    """Parses answers for the given dimensions (default: the vocabularies' keys).

    ``vocabs``: dimension -> label names. ``sentinels``: JSON start/end markers.
    """

    def __init__(self, vocabs: Mapping[str, Vocabulary | Iterable[str]], dimensions: Sequence[str] | None = None,
                 *, sentinels: tuple[str, str] = DEFAULT_SENTINELS, min_score: float = 0.5,
                 person_dims: Iterable[str] = ("artist",)):
        self.dimensions = tuple(dimensions if dimensions is not None else vocabs)
        self.matcher = LabelMatcher({d: vocabs.get(d, []) for d in self.dimensions}, min_score=min_score,
                                    person_dims=person_dims)
        self.sentinels = tuple(sentinels)
        self._key_line = re.compile(_KEY_LINE.format(dims="|".join(re.escape(d) for d in self.dimensions)),
                                    re.IGNORECASE | re.MULTILINE)

    def parse(self, text: Any, mode: str | None = None) -> ParsedAnswer:
        """Parses ``text`` as ``mode`` (structured / natural / keys; None: guessed from the text)."""
        text = "" if text is None else str(text)
        if mode is None:
            mode = self.guess_mode(text)
        if mode == "structured":
            return self.parse_structured(text)
        if mode == "keys":
            return self.parse_keys(text)
        if mode == "natural":
            return self.parse_natural(text)
        raise ValueError(f"unknown answer mode {mode!r} (expected one of {MODES})")

    def guess_mode(self, text: str) -> str:
        if extract_json(text, self.sentinels, self.dimensions) is not None:
            return "structured"
        found = {m.group(1).lower() for m in self._key_line.finditer(text)}
        if found and len(found) >= min(2, len(self.dimensions)):
            return "keys"
        return "natural"

    def _unknown(self) -> dict[str, str]:
        return {d: UNKNOWN for d in self.dimensions}

    def parse_structured(self, text: str) -> ParsedAnswer:
        obj = extract_json(text, self.sentinels, self.dimensions)
        if obj is not None:
            raw = {d: obj.get(d.lower()) for d in self.dimensions}
            labels = {d: self.matcher.snap(raw[d], d) for d in self.dimensions}
            evidence = next((_evidence_text(obj[k]) for k in EVIDENCE_KEYS if k in obj), "")
            return ParsedAnswer(labels, evidence.strip(), "structured", True,
                                {d: None if v is None else _evidence_text(v) for d, v in raw.items()})
        # not parseable: read what is there (cut-off JSON, key lines, prose)
        cleaned = _strip_fences(text)
        fields = _broken_json_fields(cleaned, list(self.dimensions) + list(EVIDENCE_KEYS))
        keys = self._key_values(cleaned)
        evidence = next((fields[k] for k in EVIDENCE_KEYS if k in fields), None)
        if evidence is None:
            evidence = self._strip_structure(cleaned)
        labels, raw = {}, {}
        for d in self.dimensions:
            value = fields.get(d.lower(), keys.get(d.lower()))
            raw[d] = value
            if value is not None:
                labels[d] = self.matcher.snap(value, d)
            else:
                labels[d] = self.matcher.find(cleaned, d) or UNKNOWN
        return ParsedAnswer(labels, evidence.strip(), "structured", False, raw)

    def parse_keys(self, text: str) -> ParsedAnswer:
        keys = self._key_values(text)
        reason = "\n".join(line for line in text.splitlines() if not self._key_line.match(line)).strip()
        labels = {}
        for d in self.dimensions:
            if d.lower() in keys:
                labels[d] = self.matcher.snap(keys[d.lower()], d)
            else:
                labels[d] = self.matcher.find(reason, d) or UNKNOWN
        return ParsedAnswer(labels, reason, "keys", False, {d: keys.get(d.lower()) for d in self.dimensions})

    def parse_natural(self, text: str) -> ParsedAnswer:
        labels = {d: self.matcher.find(text, d) or UNKNOWN for d in self.dimensions}
        return ParsedAnswer(labels, text.strip(), "natural", False, {d: None for d in self.dimensions})

    def _key_values(self, text: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for m in self._key_line.finditer(text):
            value = m.group(2).strip().strip("\"'`,;").strip()
            value = value.rstrip(".").strip()
            out.setdefault(m.group(1).lower(), value)
        return out

    @staticmethod
    def _strip_structure(text: str) -> str:
        """The prose of a broken structured answer: sentinels, braces, quotes and keys removed."""
        t = re.sub(r"<\s*/?\s*(begin|end)_json\s*>", " ", text, flags=re.IGNORECASE)
        t = re.sub(r'"[A-Za-z_]+"\s*:', " ", t)
        t = re.sub(r"[{}\"]", " ", t)
        return re.sub(r"\s+", " ", t).strip()


def parse_answer(text: Any, vocabs: Mapping[str, Vocabulary | Iterable[str]], mode: str | None = None,
                 **kwargs) -> ParsedAnswer:
    """One-shot ``AnswerParser(vocabs, **kwargs).parse(text, mode)``."""
    return AnswerParser(vocabs, **kwargs).parse(text, mode)


# ------------------------------------------------------------------------------------------------
# which answer is which mode (the original's run_metrics rules + the Stage A/B shape)


def prompt_mode(prompt: str, sentinels: tuple[str, str] = DEFAULT_SENTINELS) -> str | None:
    """The mode a prompt asks for, or None when the prompt does not say.

    As the original: a prompt naming the sentinels or starting "return a json object" asks for
    structured output unless it says "no json" / "no key-value"; those say natural. A prompt
    asking for ``'artist: ...'`` lines / "key-value lines" / "three lines" (the Stage A/B
    templates over any dimensions) asks for keys.
    """
    p = (prompt or "").lower()
    if "no json" in p or "no key-value" in p or "no key value" in p:
        return "natural"
    s, e = (x.lower() for x in sentinels)
    if (s and s in p) or (e and e in p) or p.startswith("return a json object") or "compact json" in p:
        return "structured"
    if "key-value lines" in p or re.search(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|\d+) lines?\b", p) \
            or re.search(r"'[a-z_]+: \.\.\.'", p):
        return "keys"
    return None


def detect_mode(prompt: str, answer: str, parser: AnswerParser | None = None,
                sentinels: tuple[str, str] = DEFAULT_SENTINELS) -> str:
    """Mode of one prompt/answer pair: structured if the answer parses as JSON (as the original), else
    what the prompt asks for, else what the answer looks like (key lines -> keys, else natural)."""
    sentinels = parser.sentinels if parser is not None else sentinels
    dims = parser.dimensions if parser is not None else DEFAULT_DIMENSIONS
    if extract_json(answer or "", sentinels, dims) is not None:
        return "structured"  # the original: an answer that parses as JSON is structured
    mode = prompt_mode(prompt, sentinels)
    if mode is not None:
        return mode
    return parser.guess_mode(answer or "") if parser is not None else "natural"
