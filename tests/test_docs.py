"""The project cites its own method docs: every docs/methods.md citation in the code, tests and
docs names one of its sections, every link to it one of its anchors, and nothing cites a file
outside the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"


def sources() -> list[Path]:
    files = [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("docs").rglob("*.md")]
    return [*files, ROOT / "README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings() -> list[str]:
    return [line.lstrip("#").strip() for line in METHODS.read_text().splitlines() if line.startswith("## ")]


def test_every_citation_of_the_method_docs_names_a_section():
    sections = set(headings())
    cited = {}
    for path in sources():
        text = " ".join(path.read_text().split())  # citations may wrap across lines
        for name in re.findall(r'docs/methods\.md, "([^"]+)"', text):
            cited.setdefault(name, path.relative_to(ROOT))
    assert {"The exact key-value path", "Baselines", "Families"} <= set(cited)
    missing = {name: str(path) for name, path in cited.items() if name not in sections}
    assert not missing, f"cited sections not in docs/methods.md: {missing}"


def test_every_link_to_the_method_docs_names_an_anchor():
    anchors = {slug(h) for h in headings()}
    assert "where-the-official-code-differs-from-the-paper" in anchors
    links = {(path.name, anchor) for path in sources() for anchor in re.findall(r"methods\.md#([\w-]+)", path.read_text())}
    assert links and not {link for link in links if link[1] not in anchors}


def test_nothing_cites_a_specification_outside_the_repository():
    outside = "REFERENCE" + ".md"
    assert not [str(path.relative_to(ROOT)) for path in sources() if outside in path.read_text()]


def test_every_planted_bug_of_make_mutants_still_finds_its_code():
    """`make mutants` is the standing check that the tests catch representative bugs; a mutant whose
    pattern the code no longer holds (code moved, or a second copy appeared) would silently stop
    checking anything, so the suite holds every pattern to its stated count and every test file to disk."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("vptune_mutants", ROOT / "scripts" / "mutants.py")
    mutants = sys.modules["vptune_mutants"] = importlib.util.module_from_spec(spec)  # its dataclass looks itself up
    spec.loader.exec_module(mutants)
    for m in mutants.MUTANTS:
        found = (ROOT / "src" / "vptune" / m.file).read_text().count(m.pattern)
        assert found == m.count, f"mutant {m.name!r}: {m.file} holds its pattern {found} times, expected {m.count}"
        files = [t.split("::")[0] for t in m.tests if t.startswith("tests/")]
        assert files and all((ROOT / f).is_file() for f in files), m.name
