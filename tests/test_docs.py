"""The documentation site builds, and every Python example in it runs and prints what it shows.

Each page under ``docs/`` is a specification: its ```python blocks run in order
in one namespace per page, and a ```text block right after a python block is
that block's printed output, compared exactly.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
# A fenced block: its language, then its body. An output block directly follows its code.
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```[ \t]*$", flags=re.DOTALL | re.MULTILINE)
API_PAGES = {
    "mpo": "api/mpo/index.html",
    "mpo.adapt": "api/adapt/index.html",
    "mpo.finetune": "api/finetune/index.html",
}


def examples(page: Path) -> list[tuple[str, str | None]]:
    """The page's python blocks, each with the output block that follows it (or None)."""
    text = page.read_text()
    blocks = list(FENCE.finditer(text))
    pairs = []
    for i, block in enumerate(blocks):
        if block.group(1) != "python":
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        adjacent = following is not None and not text[block.end() : following.start()].strip()
        output = following.group(2) if adjacent and following.group(1) == "text" else None
        pairs.append((block.group(2), output))
    return pairs


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(
            module, reason=f"{module} is needed to build the docs: pip install -e '.[docs]'"
        )
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


def test_the_site_builds_strictly_with_every_page(site):
    for page in PAGES:
        if "hooks" in page.parts:
            continue
        relative = page.relative_to(DOCS).with_suffix("")
        html = "index.html" if relative.name == "index" else f"{relative}/index.html"
        assert (site / html).is_file(), f"{page} was not rendered"


@pytest.mark.parametrize("module", sorted(API_PAGES))
def test_the_api_reference_documents_every_public_name(site, module):
    pytest.importorskip("torch")
    public = __import__(module, fromlist=["__all__"]).__all__
    html = (site / API_PAGES[module]).read_text()
    headings = set(re.findall(r'<h3 id="([\w.]+)"', html))
    missing = [name for name in public if not any(h.endswith(f".{name}") for h in headings)]
    assert not missing, f"{API_PAGES[module]} lacks {missing}; add '::: {module}.<name>' lines"


def test_the_tutorials_have_examples_with_outputs():
    pages = [page for page in PAGES if examples(page)]
    assert len(pages) >= 4
    assert all(any(output for _, output in examples(page)) for page in pages)


@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=lambda p: p.name)
def test_page_examples_run_and_print_what_the_page_shows(page):
    if "mpo.adapt" in page.read_text():
        pytest.importorskip("transformers")
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    for number, (code, expected) in enumerate(examples(page), start=1):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{page.relative_to(ROOT)} block {number}", "exec"), namespace)
        if expected is not None:
            assert printed.getvalue().rstrip() == expected.rstrip(), (
                f"{page.name} block {number} printed something else than the page shows"
            )
