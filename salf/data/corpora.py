"""Built-in datasets made at run time from real text already on the machine.

Nothing here ships third-party text: each builder reads it where it lies and writes JSONL files
(``train`` and ``eval``) that ``salf.data.encode.load_task_data`` reads as they are.

- ``docstring-module``: a Python standard library docstring -> the module it comes from
  (classification over ``DOCSTRING_MODULES``; the stdlib sources are parsed with ``ast``);
- ``docstring-function``: a docstring -> the name of its function (prompt/completion);
- ``docstring-module-chat``: the same question as ``docstring-module`` asked as an instruction, a one-turn
  conversation (``messages``: rendered with the model's chat template, the answer is the module's name);
- ``debian-section``: a Debian package description -> its archive section (classification over
  the most common sections), from the apt package lists (``apt-cache dumpavail``);
- ``debian-name``: a Debian package description -> the package name (prompt/completion);
- ``debian-name-section``: a Debian package *name alone* -> its archive section (classification; the
  lexical form of the name decides: ``python3-*``, ``lib*-dev``, ``*-perl``, ``fonts-*``; information that
  lives low in the network);
- ``debian-bshift``: a sentence of a Debian description, either as written or with two adjacent words
  swapped (classification 'original' / 'shifted'; SentEval's bigram-shift probing task: word order
  decides, so the task needs composition across the sentence, not its topic or its words);
- ``debian-text``: Debian package descriptions as plain text (language modelling, scored by held-out loss).

Every builder is deterministic for a given machine (same Python, same apt lists) and seed.
Names may be written with '_' or '-'.
"""

from __future__ import annotations

import ast
import functools
import json
import random
import re
import shutil
import subprocess
import sysconfig
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from salf.errors import SalfError
from salf.fileio import write_atomic
from salf.registry import Registry

EVAL_FRACTION = 0.2
MAX_TEXT_CHARS = 300
MIN_TEXT_CHARS = 20
NAME_SEPARATOR = "\nName:"

# Well-populated stdlib modules/packages on distinct topics (checked on CPython 3.10-3.13).
DOCSTRING_MODULES = (
    "asyncio", "email", "logging", "xml", "multiprocessing", "unittest", "http", "tarfile", "urllib", "inspect",
)
DOCSTRING_PER_CLASS = 150
"""At most this many docstrings per module, so the classes are balanced-ish."""
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}

APT_LISTS = Path("/var/lib/apt/lists")
DEBIAN_SECTIONS = 8
"""How many of the most common sections ``debian-section`` keeps."""
DEBIAN_PER_CLASS = 1000
DEBIAN_NAME_ROWS = 8000
"""``debian-name`` keeps a seeded sample of this many packages (of some 60 000)."""
BSHIFT_WORDS = (6, 30)
"""``debian-bshift`` keeps sentences of this many words (inclusive): long enough for word order to matter."""
BSHIFT_PER_CLASS = 3000


@dataclass
class CorpusFiles:
    """The files one builder wrote."""

    train_path: Path
    """Training rows, JSONL."""
    eval_path: Path
    """Held-out rows, JSONL (every class of a classification corpus appears in both files)."""
    n_train: int
    """Rows in ``train_path``."""
    n_eval: int
    """Rows in ``eval_path``."""
    task: str
    """'classification' (fields text, label) or 'completion' (fields prompt, completion)."""
    name: str = ""
    """The corpus name."""
    source: str = ""
    """Where the text came from."""


@dataclass(frozen=True)
class CorpusSpec:
    """One built-in corpus: how to collect its rows, and their task."""

    task: str
    """'classification', 'completion' (prompt/completion or messages rows) or 'lm' (text rows)."""
    collect: Callable[[], list[dict]]
    """Every row (dicts with text/label or prompt/completion), deduplicated."""
    source: Callable[[], str]
    """Describes where the text comes from on this machine."""
    per_class: int | None = None
    """Classification: keep at most this many rows of each class."""
    max_rows: int | None = None
    """Keep at most this many rows in all (a seeded sample)."""


CORPORA: Registry[CorpusSpec] = Registry("corpus")


def build_corpus(name: str, out_dir: str | Path, seed: int = 0, limit: int | None = None) -> CorpusFiles:
    """Build corpus ``name`` into ``out_dir/<name>-train.jsonl`` and ``out_dir/<name>-eval.jsonl``.

    ``limit`` caps the rows of both files together (balanced over classes for classification).
    """
    key = name.replace("_", "-")
    spec = CORPORA.get(key)
    if limit is not None and limit < 2:
        raise SalfError(f"corpus limit must be at least 2 rows, got {limit}", "raise the limit, or unset it")
    rows = spec.collect()
    if spec.task == "classification":
        rows = _balanced(rows, spec.per_class, limit, seed)
        train, held = _split_by_class(rows, seed)
    else:
        cap = min(x for x in (spec.max_rows, limit, len(rows)) if x is not None)
        rows = _sample(rows, cap, seed)
        cut = len(rows) - max(1, round(len(rows) * EVAL_FRACTION))
        train, held = rows[:cut], rows[cut:]
    out = Path(out_dir)
    train_path = _write_jsonl(out / f"{key}-train.jsonl", train)
    eval_path = _write_jsonl(out / f"{key}-eval.jsonl", held)
    return CorpusFiles(train_path, eval_path, len(train), len(held), spec.task, key, spec.source())


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n]]


def _by_label(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row)
    return dict(sorted(groups.items()))


def _balanced(rows: list[dict], per_class: int | None, limit: int | None, seed: int) -> list[dict]:
    """At most ``per_class`` of each class, then at most ``limit`` in all, taken round-robin over
    the classes so a small limit still covers them evenly."""
    groups = [_sample(group, per_class or len(group), seed) for group in _by_label(rows).values()]
    picked: list[dict] = []
    for i in range(max((len(g) for g in groups), default=0)):
        picked += [g[i] for g in groups if i < len(g)]
    return picked[:limit] if limit is not None else picked


def _split_by_class(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified split: each class with two or more rows is in both files."""
    rng = random.Random(seed)
    train, held = [], []
    for group in _by_label(rows).values():
        n_eval = min(len(group) - 1, max(1, round(len(group) * EVAL_FRACTION)))
        held += group[:n_eval]
        train += group[n_eval:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def _unambiguous(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One row per text; a text found with two different answers is dropped (it cannot be learned)."""
    answers: dict[str, set[str]] = {}
    for text, answer in pairs:
        answers.setdefault(text, set()).add(answer)
    kept, seen = [], set()
    for text, answer in pairs:
        if len(answers[text]) == 1 and text not in seen:
            seen.add(text)
            kept.append((text, answer))
    return kept


def _shorten(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + " ..."


# ---------------------------------------------------------------------------------------------
# Python standard library docstrings


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(lib: Path, module: str) -> list[Path]:
    single = lib / f"{module}.py"
    if single.is_file():
        return [single]
    package = lib / module
    if not package.is_dir():
        return []
    return sorted(p for p in package.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(package).parts[:-1]))


def _first_paragraph(doc: str) -> str:
    return doc.strip().split("\n\n", 1)[0]


@dataclass(frozen=True)
class Docstring:
    module: str
    name: str
    kind: str
    """'function' (functions and methods) or 'class'."""
    text: str
    """First paragraph of the docstring, on one line, at most MAX_TEXT_CHARS."""


def stdlib_docstrings(modules: tuple[str, ...] = DOCSTRING_MODULES) -> list[Docstring]:
    """Docstrings of the functions, methods and classes of ``modules``, in file order; parsed once
    per process, since both docstring corpora need them and parsing takes seconds."""
    return list(_stdlib_docstrings_cached(tuple(modules)))


@functools.lru_cache(maxsize=4)
def _stdlib_docstrings_cached(modules: tuple[str, ...]) -> tuple[Docstring, ...]:
    return tuple(_parse_docstrings(modules))


def _parse_docstrings(modules: tuple[str, ...]) -> Iterator[Docstring]:
    lib = stdlib_dir()
    files = {module: _module_files(lib, module) for module in modules}
    if not any(files.values()):
        raise SalfError(
            f"the Python standard library sources are not in {lib}",
            "use a Python installation that ships its .py sources (most do; on Debian: apt-get install python3.X)",
        )
    for module, paths in files.items():
        for path in paths:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue  # a stdlib file this parser cannot read is skipped, not fatal
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                text = _shorten(_first_paragraph(doc))
                if len(text) >= MIN_TEXT_CHARS:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    yield Docstring(module, node.name, kind, text)


def _docstring_module_rows() -> list[dict]:
    pairs = _unambiguous([(d.text, d.module) for d in stdlib_docstrings()])
    return [{"text": text, "label": module} for text, module in pairs]


def _docstring_function_rows() -> list[dict]:
    # Dunder methods share generic docstrings ("Return repr(self)."); they are left out.
    found = [d for d in stdlib_docstrings() if d.kind == "function" and not d.name.startswith("__")]
    pairs = _unambiguous([(d.text, d.name) for d in found])
    return [{"prompt": text + NAME_SEPARATOR, "completion": " " + name} for text, name in pairs]


def _stdlib_source() -> str:
    return f"docstrings of the Python standard library in {stdlib_dir()} ({', '.join(DOCSTRING_MODULES)})"


CORPORA.register("docstring-module")(
    CorpusSpec("classification", _docstring_module_rows, _stdlib_source, per_class=DOCSTRING_PER_CLASS)
)
CORPORA.register("docstring-function")(CorpusSpec("completion", _docstring_function_rows, _stdlib_source))

CHAT_SYSTEM = "Answer with one word."
"""The system turn of the instruction corpora: short, so the template's default system prompt (about 20
tokens on SmolLM2) does not double the cost of every step."""
MODULE_QUESTION = "Which module of the Python standard library has this docstring?\n\n{text}"


def _docstring_module_chat_rows() -> list[dict]:
    return [{"messages": [{"role": "system", "content": CHAT_SYSTEM},
                          {"role": "user", "content": MODULE_QUESTION.format(text=row["text"])},
                          {"role": "assistant", "content": row["label"]}]}
            for row in _balanced(_docstring_module_rows(), DOCSTRING_PER_CLASS, None, 0)]


CORPORA.register("docstring-module-chat")(CorpusSpec("completion", _docstring_module_chat_rows, _stdlib_source))


# ---------------------------------------------------------------------------------------------
# Debian package descriptions


@dataclass(frozen=True)
class DebianPackage:
    name: str
    section: str
    """Archive area stripped: 'contrib/net' -> 'net'."""
    description: str
    """Short description, then the long one where the lists have it, on one line."""


_LIST_SUFFIXES = ("_Packages", ".lz4", ".gz", ".xz", ".bz2", ".zst")


def _package_lists() -> list[Path]:
    """The apt 'Packages' index files, compressed or not (not the pdiff indexes)."""
    if not APT_LISTS.is_dir():
        return []
    found = [p for p in APT_LISTS.glob("*_Packages*") if p.is_file() and ".diff" not in p.name]
    return sorted(p for p in found if p.name.endswith(_LIST_SUFFIXES))


def _apt_dump() -> str:
    """The text of every Packages list, one stanza per package version."""
    lists = _package_lists()
    if not lists:
        raise SalfError(
            f"no Debian package lists in {APT_LISTS}, so the debian corpora have no text to read",
            "run `apt-get update` (as root) on a Debian or Ubuntu machine, then build the corpus again",
        )
    # apt-helper only decompresses (any format apt uses, lz4 included): some 30 times faster than
    # `apt-cache dumpavail`, which is the fallback.
    helper = shutil.which("apt-helper") or next(
        (str(p) for p in (Path("/usr/lib/apt/apt-helper"),) if p.is_file()), None
    )
    if helper is not None:
        return "\n\n".join(_run([helper, "cat-file", str(path)]) for path in lists)
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        raise SalfError("apt is not installed", "the debian corpora need a Debian or Ubuntu machine with apt")
    return _run([apt_cache, "dumpavail"])


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()[:300]
        raise SalfError(f"`{' '.join(command)}` failed: {message}", "run `apt-get update`, then retry")
    return done.stdout.decode("utf-8", "replace")


def _field(stanza: str, key: str) -> str | None:
    """A field's value with its continuation lines (``stanza`` starts with a newline)."""
    start = stanza.find(f"\n{key}:")
    if start < 0:
        return None
    start += len(key) + 2
    end = stanza.find("\n", start)
    while end >= 0 and stanza.startswith("\n ", end):  # continuation lines start with a space
        end = stanza.find("\n", end + 1)
    return stanza[start:] if end < 0 else stanza[start:end]


def _stanza_packages(dump: str) -> Iterator[DebianPackage]:
    """Packages of a Packages list (or ``apt-cache dumpavail`` output), in order.

    String searches per stanza rather than a line-by-line parse: there are some 1.2 million lines.
    """
    for stanza in dump.split("\n\n"):
        stanza = "\n" + stanza
        name, section, description = (_field(stanza, k) for k in ("Package", "Section", "Description"))
        if name is None or section is None or description is None:
            continue
        short, _, rest = description.partition("\n")
        # Continuation lines are the long description, where the lists have it; " ." is a blank line.
        long_lines = [line.strip() for line in rest.split("\n") if line.strip() not in ("", ".")]
        text = f"{short.strip()}. {' '.join(long_lines)}" if long_lines else short.strip()
        yield DebianPackage(name.strip(), section.strip().rsplit("/", 1)[-1], _shorten(text))


@functools.lru_cache(maxsize=1)
def _debian_packages_cached() -> tuple[DebianPackage, ...]:
    seen: dict[str, DebianPackage] = {}
    for package in _stanza_packages(_apt_dump()):
        seen.setdefault(package.name, package)
    return tuple(seen[name] for name in sorted(seen))


def debian_packages() -> list[DebianPackage]:
    """Every available package once (first stanza wins), sorted by name; read once per process,
    since both debian corpora need it and ``apt-cache dumpavail`` takes seconds."""
    return list(_debian_packages_cached())


def _debian_section_rows() -> list[dict]:
    packages = debian_packages()
    common = {section for section, _ in Counter(p.section for p in packages).most_common(DEBIAN_SECTIONS)}
    pairs = _unambiguous([(p.description, p.section) for p in packages if p.section in common])
    return [{"text": text, "label": section} for text, section in pairs]


def _debian_name_rows() -> list[dict]:
    pairs = _unambiguous([(p.description, p.name) for p in debian_packages()])
    return [{"prompt": text + NAME_SEPARATOR, "completion": " " + name} for text, name in pairs]


def _debian_name_section_rows() -> list[dict]:
    packages = debian_packages()
    common = {section for section, _ in Counter(p.section for p in packages).most_common(DEBIAN_SECTIONS)}
    return [{"text": p.name, "label": p.section} for p in packages if p.section in common]


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
"""A plain word: swapping punctuation ('-', '(data') would be a giveaway, not a question of word order."""
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?]) +(?=[A-Z])")


def description_sentences(text: str) -> list[str]:
    """The sentences of a description (Debian's package lists often carry only the one-line short
    description, which counts as one sentence); a shortened tail, ending in ' ...', is dropped."""
    parts = _SENTENCE_END.split(text)
    return [p.rstrip(".") for p in parts if not p.endswith(" ...")]


def bigram_shift(sentence: str, rng: random.Random) -> str | None:
    """``sentence`` with two adjacent, different words swapped, or None where no such pair exists. The
    first word is never moved (its capital would give the swap away), nor the last."""
    words = sentence.split()
    spots = [i for i in range(1, len(words) - 2)
             if _WORD.fullmatch(words[i]) and _WORD.fullmatch(words[i + 1]) and words[i].lower() != words[i + 1].lower()]
    if not spots:
        return None
    i = rng.choice(spots)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _debian_bshift_rows() -> list[dict]:
    """One row per sentence opening (its first five words, lower case: '... (data files)' and '... (common
    files)' variants of one package family would otherwise sit in both splits with opposite labels);
    whether it is shifted, and where, is seeded by the sentence itself (crc32), so the corpus does not
    depend on the order packages are read in."""
    low, high = BSHIFT_WORDS
    seen: set[str] = set()
    rows = []
    for package in debian_packages():
        for sentence in description_sentences(package.description):
            opening = " ".join(sentence.lower().split()[:5])
            if opening in seen or not low <= len(sentence.split()) <= high:
                continue
            seen.add(opening)
            rng = random.Random(zlib.crc32(sentence.encode("utf-8")))
            shifted = bigram_shift(sentence, rng) if rng.random() < 0.5 else None
            rows.append({"text": shifted or sentence, "label": "shifted" if shifted else "original"})
    return rows


def _debian_text_rows() -> list[dict]:
    seen: set[str] = set()
    return [{"text": p.description} for p in debian_packages()
            if len(p.description) >= MIN_TEXT_CHARS and not (p.description in seen or seen.add(p.description))]


def _debian_source() -> str:
    return f"Debian package descriptions from the apt lists in {APT_LISTS}"


CORPORA.register("debian-section")(
    CorpusSpec("classification", _debian_section_rows, _debian_source, per_class=DEBIAN_PER_CLASS)
)
CORPORA.register("debian-name")(CorpusSpec("completion", _debian_name_rows, _debian_source, max_rows=DEBIAN_NAME_ROWS))
CORPORA.register("debian-name-section")(
    CorpusSpec("classification", _debian_name_section_rows, _debian_source, per_class=DEBIAN_PER_CLASS)
)
CORPORA.register("debian-text")(CorpusSpec("lm", _debian_text_rows, _debian_source, max_rows=DEBIAN_NAME_ROWS))
CORPORA.register("debian-bshift")(
    CorpusSpec("classification", _debian_bshift_rows, _debian_source, per_class=BSHIFT_PER_CLASS)
)
