"""scripts/family_table.py without models: outcomes of our errors, the rendered table, the README section."""

from __future__ import annotations

from scripts.family_table import (
    END,
    START,
    Outcome,
    Row,
    attempt,
    readme_section,
    render,
    with_section,
    without_measurements,
)
from scripts.tiny_families import BY_NAME, FAMILIES
from sft.errors import ConfigurationError
from sft.packing import PackingError


def test_a_user_error_is_a_refusal_and_anything_else_a_crash():
    def refuse():
        raise ConfigurationError("--flag: not with that model")

    def crash():
        raise AttributeError("'tuple' object has no attribute 'dtype'")

    assert attempt(lambda: "sdpa, rows") == Outcome("yes", "sdpa, rows")
    assert attempt(refuse) == Outcome("refused", "--flag: not with that model")
    assert attempt(crash) == Outcome("crash", "AttributeError: 'tuple' object has no attribute 'dtype'")


def test_measured_figures_leave_a_refusal_but_its_words_stay():
    message = str(PackingError("--packing: it leaks (a sample's logits change by 0.0339; 0.273 with all). Use sdpa"))
    assert without_measurements(message) == "--packing: it leaks. Use sdpa"
    assert without_measurements("top 2 of 4 experts (r=8)\nsecond line") == "top 2 of 4 experts (r=8)"
    assert without_measurements("modules {'out_proj', 'conv1d'} clash") == "modules {'conv1d', 'out_proj'} clash"


def test_each_reason_is_one_numbered_note_shared_by_the_rows_that_give_it():
    outcomes = dict.fromkeys(("full", "lora", "qlora", "merge", "chat"), Outcome("yes"))
    packed = {"packing": Outcome("yes", "sdpa, rows"), "loss": Outcome("yes", "fused")}
    first = Row(FAMILIES[0], "AClass", {**outcomes, **packed})
    refused = Outcome("refused", "no packing here")
    second = Row(FAMILIES[1], "BClass", {**outcomes, "packing": refused, "loss": Outcome("yes", "plain: why not")})
    third = Row(FAMILIES[2], "CClass", {**outcomes, "packing": refused, "loss": Outcome("crash", "Boom: bang")})
    table = render([first, second, third]).splitlines()
    assert len(table) == 2 + 3 + 1 + 3  # header, rows, blank line, three notes
    assert "| yes (sdpa, rows) | fused |" in table[2]
    assert "| refused [1] | plain [2] |" in table[3]
    assert "| refused [1] | **crash** [3] |" in table[4]
    assert table[-3:] == ["1. no packing here", "2. why not", "3. Boom: bang"]


def test_the_section_between_the_markers_is_replaced_and_nothing_else():
    readme = f"# Title\n\nbefore\n{START}\nold table\n{END}\nafter\n"
    updated = with_section(readme, "new table")
    assert readme_section(updated) == "new table"
    assert updated == readme.replace("old table", "new table")
    assert readme_section("# no markers") is None


def test_family_names_and_model_types_are_unique():
    assert len(BY_NAME) == len(FAMILIES)
    assert len({family.model_type for family in FAMILIES}) == len(FAMILIES)


def test_a_table_without_notes_reads_back_from_the_readme_as_written():
    outcomes = dict.fromkeys(("full", "lora", "qlora", "merge", "chat"), Outcome("yes"))
    row = Row(
        FAMILIES[0], "AClass", {**outcomes, "packing": Outcome("yes", "sdpa, rows"), "loss": Outcome("yes", "fused")}
    )
    table = render([row])
    assert not table.endswith("\n")
    assert readme_section(with_section(f"{START}\nold\n{END}\n", table)) == table
