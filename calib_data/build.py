"""Extract plain English prose from the Wikipedia sample shipped in gensim's wheel.

Usage: python calib_data/build.py [PATH_TO_BZ2]
Writes calib_data/wiki_calib.jsonl and calib_data/wiki_eval.jsonl (one article per line:
{"title", "text"}). The split is by article: every fifth article (ordinal % 5 == 4, in file
order, after dropping redirects and near-empty pages) is held out for evaluation, so the two
files never share an article. The output is deterministic for a given input file.
"""

from __future__ import annotations

import bz2
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GENSIM_PATH = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_PARAGRAPH_WORDS = 12  # shorter lines are captions, list items or leftovers, not prose
MIN_ARTICLE_WORDS = 150
EVAL_EVERY = 5

_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[([^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+.*?=+\s*$", re.M)


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove nested {{...}} or {|...|} spans with a depth counter (regexes cannot nest)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wiki_to_prose(markup: str) -> str:
    text = html.unescape(markup)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _FILE_LINK.sub("", text)
    for _ in range(2):  # links inside link captions
        text = _LINK.sub(lambda m: m.group(2), text)
    text = _EXT_LINK.sub(lambda m: m.group(1), text)
    text = _BOLD_ITALIC.sub("", text)
    text = _HEADING.sub("", text)
    text = _TAG.sub("", text)
    paragraphs = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line or line[0] in "*#:;|!{}[]":
            continue
        if len(line.split()) < MIN_PARAGRAPH_WORDS:
            continue
        paragraphs.append(line)
    return "\n\n".join(paragraphs)


def articles(path: Path):
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = text = ""
            for child in elem.iter():
                tag = child.tag.rsplit("}", 1)[-1]
                if tag == "title":
                    title = child.text or ""
                elif tag == "text":
                    text = child.text or ""
            elem.clear()
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            prose = wiki_to_prose(text)
            if len(prose.split()) >= MIN_ARTICLE_WORDS:
                yield title, prose


def main(argv: list[str]) -> None:
    if argv:
        src = Path(argv[0])
    else:
        import importlib.util

        spec = importlib.util.find_spec("gensim")
        if spec is None or spec.origin is None:
            sys.exit("gensim is not installed: pip install --no-deps gensim, or pass the .bz2 path")
        src = Path(spec.origin).parent.parent / GENSIM_PATH
    here = Path(__file__).parent
    calib, held = [], []
    for i, (title, prose) in enumerate(articles(src)):
        (held if i % EVAL_EVERY == EVAL_EVERY - 1 else calib).append({"title": title, "text": prose})
    for name, rows in (("wiki_calib.jsonl", calib), ("wiki_eval.jsonl", held)):
        with open(here / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        words = sum(len(r["text"].split()) for r in rows)
        print(f"{name}: {len(rows)} articles, {words} words")


if __name__ == "__main__":
    main(sys.argv[1:])
