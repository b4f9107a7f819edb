"""MkDocs hook: show the doctests in our docstrings as Python console code blocks.

Many docstrings in ``mpo`` carry doctests outside an ``Examples`` section. Markdown
would render them as a paragraph (and read an output such as ``[4, 4]`` as a
link). This hook adds a Markdown preprocessor, used by the pages and by
mkdocstrings alike, that fences every run of lines starting at a ``>>>`` line and
ending at the next blank line as a ``pycon`` block. Lines already inside a fence
are left alone.
"""

from __future__ import annotations

import re

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

FENCE = re.compile(r"^\s*(```|~~~)")


class DoctestFences(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        in_fence = in_doctest = False
        for line in lines:
            if in_doctest and not line.strip():
                out.extend(["```", line])
                in_doctest = False
                continue
            if not in_doctest and FENCE.match(line):
                in_fence = not in_fence
            elif not in_fence and not in_doctest and line.lstrip().startswith(">>>"):
                out.append(line[: len(line) - len(line.lstrip())] + "```pycon")
                in_doctest = True
            out.append(line)
        if in_doctest:
            out.append("```")
        return out


class DoctestFencesExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        # Above the fenced-code preprocessors, so the fences added here are highlighted.
        md.preprocessors.register(DoctestFences(md), "doctest_fences", 40)


@event_priority(100)  # before mkdocstrings reads the extensions
def on_config(config):
    config.markdown_extensions.append(DoctestFencesExtension())
    return config
