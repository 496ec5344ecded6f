"""docs/cli.md matches the code: each command's flags (its ``--help``) are exactly the flags its
table in docs/cli.md lists, and the defaults the docs give for σ and the KL warm-up are the code's."""

import argparse
import re
from pathlib import Path

import pytest

from ppl_vae import evaluate, fit, sample

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def documented_flags(module: str) -> set[str]:
    """The ``--flags`` in the first column of the tables of the section of ``python -m ppl_vae.MODULE``."""
    text = DOCS.read_text()
    start = text.index(f"## `python -m ppl_vae.{module}`")
    end = text.find("\n## ", start + 1)
    flags = set()
    for line in text[start : end if end != -1 else None].splitlines():
        if line.startswith("| `-"):
            first = line.split("|")[1]
            flags |= set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", first))
    return flags


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        o
        for a in parser._actions
        if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
        for o in a.option_strings
        if o.startswith("--")
    }


@pytest.mark.parametrize(
    "module,parser",
    [("fit", fit.build_parser), ("evaluate", evaluate.build_parser), ("sample", sample.build_parser)],
)
def test_every_flag_of_a_command_is_in_its_docs_table_and_no_other(module, parser):
    code, docs = parser_flags(parser()), documented_flags(module)
    assert code - docs == set(), f"in --help but not in docs/cli.md: {sorted(code - docs)}"
    assert docs - code == set(), f"in docs/cli.md but not in --help: {sorted(docs - code)}"


def test_the_documented_defaults_of_sigma_and_the_warm_up_are_the_codes():
    text = DOCS.read_text()
    assert re.search(r"\| `--sigma S` \| 0\.1 \|", text)
    assert re.search(
        r"\| `--kl-warmup E` \| 0 with one latent layer, a tenth of the epochs with two; 0 with `--init-from` \|",
        text,
    )
