"""The README's generated parts stay true to the code."""

from pathlib import Path

import eqxlm

README = Path(__file__).resolve().parents[1] / "README.md"


def test_families_table_matches_the_registry():
    text = README.read_text()
    block = text.split("<!-- families-table -->\n")[1].split("\n<!-- /families-table -->")[0]
    assert block == eqxlm.models.families_table(), "regenerate with eqxlm.models.families_table()"
