"""``docs/methods.md``: the defaults table is the specs' (paper, authors' code, distillistic, with citations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillistic.methods import catalogue, defaults_doc

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
REGENERATE = "regenerate it: PYTHONPATH=src python -m distillistic.methods.defaults_doc"


def test_docs_methods_md_is_generated_from_the_specs() -> None:
    assert DOC.read_text(encoding="utf-8") == defaults_doc.render(), f"docs/methods.md is stale; {REGENERATE}"


def test_every_hyper_parameter_cites_its_source() -> None:
    for name, spec in catalogue.specs().items():
        for p in spec.params:
            if p.type is str and p.default is None:  # a path or run to read a value from, not a hyper-parameter
                continue
            assert p.cite.strip(), f"{name}: parameter {p.name} has no citation"


def test_every_setting_names_a_key_the_method_reads() -> None:
    for name, spec in catalogue.specs().items():
        keys = set(spec.keys_read()) | {"temperature"}  # a learned temperature is documented, not read
        for s in spec.defaults:
            assert s.key in keys, f"{name}: setting {s.key} is not a key the method reads"
            assert s.paper.strip(), f"{name}: setting {s.key} lacks a paper entry"
            assert s.code.strip(), f"{name}: setting {s.key} lacks an authors' code entry"


def test_the_table_shows_the_authors_settings_fixed_here() -> None:
    text = DOC.read_text(encoding="utf-8")
    for needle in ("CE 0.1, KD 9, T 2", "0.9 (0.1·CE + 0.9·KD)", "by pair: 2, 6 or 8", "epoch from 1",
                   "my_loss_function.py:47"):
        assert needle in text, needle
