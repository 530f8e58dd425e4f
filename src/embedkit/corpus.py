"""Real text that ships with every Python: the interpreter's own documentation.

Used by the demo (a bundled sample built from it) and by ``make bench`` (short docstring summaries
plus long documentation passages), so no data is downloaded and nothing is generated words.
"""

from __future__ import annotations

import importlib
import inspect
import re

_STDLIB_MODULES = (
    "os",
    "sys",
    "json",
    "re",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "subprocess",
    "socket",
    "threading",
    "asyncio",
    "logging",
    "argparse",
    "datetime",
    "time",
    "random",
    "math",
    "statistics",
    "string",
    "textwrap",
    "csv",
    "sqlite3",
    "http.client",
    "urllib.request",
    "email",
    "shutil",
    "tempfile",
    "zipfile",
    "tarfile",
    "gzip",
    "hashlib",
    "hmac",
    "secrets",
    "uuid",
    "decimal",
    "fractions",
    "heapq",
    "bisect",
    "array",
    "queue",
    "sched",
    "select",
    "ssl",
    "struct",
    "codecs",
    "unicodedata",
    "locale",
    "gettext",
    "io",
    "pickle",
    "copy",
    "pprint",
    "enum",
    "dataclasses",
    "typing",
    "contextlib",
    "abc",
    "inspect",
    "dis",
    "ast",
    "tokenize",
    "traceback",
    "warnings",
    "unittest",
    "doctest",
    "pdb",
    "timeit",
    "platform",
    "getpass",
    "glob",
    "fnmatch",
    "filecmp",
    "stat",
    "calendar",
    "zoneinfo",
    "ipaddress",
    "mimetypes",
    "base64",
    "binascii",
    "html",
    "xml.etree.ElementTree",
    "wave",
    "colorsys",
    "shlex",
    "configparser",
    "tomllib",
    "operator",
    "weakref",
    "types",
    "gc",
    "signal",
    "mmap",
    "multiprocessing",
    "concurrent.futures",
    "difflib",
    "graphlib",
    "numbers",
    "cmath",
    "smtplib",
    "imaplib",
    "ftplib",
)
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WS = re.compile(r"\s+")


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def doc_passages(words: int = 380, limit: int | None = None) -> list[str]:
    """Passages of about ``words`` words (~500 tokens) from the Python language reference."""
    out: list[str] = []
    for _name, text in sorted(_topics().items()):
        tokens = _WS.sub(" ", text).strip().split(" ")
        for start in range(0, len(tokens) - words // 2, words):
            out.append(" ".join(tokens[start : start + words]))
    return out[:limit] if limit else out


def doc_sentences(min_words: int = 6, max_words: int = 40, limit: int | None = None) -> list[str]:
    """Prose sentences from the language reference (code-heavy lines skipped), de-duplicated."""
    seen: set[str] = set()
    out: list[str] = []
    for _name, text in sorted(_topics().items()):
        for para in text.split("\n\n"):
            if para.startswith((" ", "\t", ">>>")):
                continue
            for sent in _SENT_SPLIT.split(_WS.sub(" ", para).strip()):
                n = len(sent.split())
                if min_words <= n <= max_words and sent not in seen and sent[-1] in ".!?" and "*" not in sent:
                    seen.add(sent)
                    out.append(sent)
    return out[:limit] if limit else out


def docstring_summaries(limit: int | None = None) -> list[str]:
    """First lines of standard-library docstrings: short, real texts (a few thousand)."""
    seen: set[str] = set()
    out: list[str] = []
    for mod_name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:
            continue
        for _attr, obj in sorted(vars(mod).items()):
            candidates = [obj]
            if inspect.isclass(obj):
                candidates += [v for _k, v in sorted(vars(obj).items())]
            for c in candidates:
                doc = getattr(c, "__doc__", None) if callable(c) or inspect.isclass(c) else None
                if not isinstance(doc, str):
                    continue
                line = doc.strip().split("\n", 1)[0].strip()
                if len(line.split()) >= 3 and line not in seen:
                    seen.add(line)
                    out.append(line)
    return out[:limit] if limit else out
