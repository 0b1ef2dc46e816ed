"""Checks a built copy of the course's website: every local link and image resolves, every lesson has a page
that the front page links to, with executed outputs and its "Open in Colab" button, and the API reference
links the lessons.

    python docs/check_site.py build/site        # what `make site` runs after Sphinx; exit status 1 on a problem

tests/test_site.py runs the same checks on a fresh quick-mode build.
"""
from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Set, Tuple
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]


class _Page(HTMLParser):
    """The links (href, src) and the element ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: List[Tuple[str, str]] = []
        self.ids: Set[str] = set()

    def handle_starttag(self, tag: str, attrs) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.links.append((tag, value))
            elif name in ("id", "name") and value:
                self.ids.add(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def _is_external(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.scheme) or url.startswith("//")


def site_pages(site: Path) -> List[Path]:
    """The built pages (the themes' Jinja fragments copied into _static are not pages)."""
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)


def broken_links(site: Path) -> List[str]:
    """Every local href or src of every built page that names a missing file, or a missing #anchor of a
    built page."""
    pages: Dict[Path, _Page] = {p.resolve(): _parse(p) for p in site_pages(site)}
    site = site.resolve()
    problems = []
    for path, page in sorted(pages.items()):
        for tag, url in page.links:
            if _is_external(url) or not url.strip():
                continue
            parts = urlsplit(url)
            target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            where = f"{path.relative_to(site)}: <{tag}> {url}"
            if site not in target.parents and target != site:
                problems.append(f"{where} leaves the site")
            elif not target.is_file():
                problems.append(f"{where} names a missing file")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{where}: no element has the id {parts.fragment!r}")
    return problems


def lesson_problems(site: Path, root: Path = ROOT) -> List[str]:
    """Every lesson source notebooks/solutions/NN_*.ipynb needs a page, linked from the front page, with
    executed outputs and a Colab button for its learner's form; the API reference must link lessons."""
    sys.path.insert(0, str(root))
    from diffusion_course import exercises

    url = exercises.repository_url(root)
    index = _parse(site / "index.html")
    front_links = {urlsplit(u).path for _, u in index.links if not _is_external(u)}
    problems = []
    sources = sorted((root / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        problems.append("no lesson sources in notebooks/solutions")
    for src in sources:
        page = site / "lessons" / f"{src.stem}.html"
        if not page.is_file():
            problems.append(f"{src.name} has no page (lessons/{page.name})")
            continue
        if f"lessons/{page.name}" not in front_links:
            problems.append(f"the front page does not link lessons/{page.name}")
        html = page.read_text(encoding="utf-8")
        if "cell_output" not in html:
            problems.append(f"lessons/{page.name} shows no executed output")
        colab = exercises.colab_url(url, f"notebooks/{src.name}")
        if colab not in html:
            problems.append(f"lessons/{page.name} lacks its Colab button ({colab})")
        if colab not in (site / "index.html").read_text(encoding="utf-8"):
            problems.append(f"the front page lacks the Colab button of {src.name}")
    api = sorted((site / "api").glob("diffusion_course*.html"))
    if not api:
        problems.append("the site has no API reference (api/diffusion_course*.html)")
    linked = {u for p in api for _, u in _parse(p).links if "lessons/" in u}
    if api and not linked:
        problems.append("no page of the API reference links a lesson")
    return problems


def main(argv: List[str]) -> int:
    site = Path(argv[1]) if len(argv) > 1 else ROOT / "build" / "site"
    problems = broken_links(site) + lesson_problems(site)
    for p in problems:
        print(p)
    pages = len(site_pages(site))
    print(f"check_site: {pages} pages, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
