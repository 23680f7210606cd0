"""README and configs/ stay true: every example config loads, README's option table is the schema's."""
from pathlib import Path

import pytest

from library.config import options_markdown
from library.config_files import load_config

from conftest import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    cfg = load_config(path, check_paths=False)  # paths point at the user's files
    assert cfg.train.output_dir


def test_readme_option_table_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert options_markdown() in readme, "regenerate with: python -m library.config"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bash quickstart.sh" in readme and "python -m pytest" in readme
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_readme_sd_scripts_table_is_generated_from_the_vocabulary():
    from library.sd_vocab import vocab_markdown

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert vocab_markdown().strip() in readme, "regenerate with: python -m library.sd_vocab"
