"""The notation table appears twice, in lesson 00 and in the README: the two must stay the same table."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows(text: str):
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_readme_and_lesson00_share_one_notation_table():
    nb = json.loads((ROOT / "notebooks" / "solutions" / "00_setup.ipynb").read_text())
    cell = next("".join(c["source"]) for c in nb["cells"] if "## Notation" in "".join(c["source"]))
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Notation"):readme.index("## Run modes")]
    rows = table_rows(cell)
    assert len(rows) >= 10 and rows[0].startswith("| symbol |")
    assert table_rows(section) == rows
