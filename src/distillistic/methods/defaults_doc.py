"""``docs/methods.md``: every method's hyper-parameters as its paper, its authors' code and distillistic set them.

Generated from the methods' specs (torch-free): each :class:`~distillistic.methods.spec.Param` gives distillistic's
default and its citation, each :class:`~distillistic.methods.spec.Setting` the paper's and the code's values.
Regenerate with ``PYTHONPATH=src python -m distillistic.methods.defaults_doc`` (a test compares the file).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from distillistic.methods import catalogue
from distillistic.methods.spec import MethodSpec, Param, Setting

HEADER = """# Methods: their defaults and where they come from

For each method, every hyper-parameter as its paper gives it, as its authors' code sets it, and as distillistic
defaults it, with the citation (the paper's equation, table or section; the code's repository, commit, file and
line). Where the paper and the code agree, distillistic's default is theirs; where they differ, the last column
says which one is followed. Common settings (the temperature, the weight α of the thesis's
`(1 − α)·CE + α·term`) appear where the method reads them. Generated from the methods' specs
(`PYTHONPATH=src python -m distillistic.methods.defaults_doc`); `tests/test_methods_doc.py` keeps it in step.
"""


def _value(value: Any) -> str:
    if value is None:
        return "unset (derived)"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "(all)"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "—"


def _row(key: str, ours: str, paper: str, code: str, follows: str) -> str:
    return "| " + " | ".join(_cell(c) for c in (f"`{key}`", ours, paper, code, follows)) + " |"


def _param_row(p: Param, setting: Setting | None) -> str:
    if setting is not None:
        return _row(p.name, setting.ours or _value(p.default), setting.paper, setting.code, setting.follows)
    in_code = any(mark in p.cite for mark in (".py", ".yaml", "/", "RepDistiller", "mdistiller"))
    return _row(p.name, _value(p.default), "—" if in_code else p.cite, p.cite if in_code else "—", "")


def method_section(spec: MethodSpec) -> str:
    """One method's heading, formula and defaults table."""
    settings = {s.key: s for s in spec.defaults}
    lines = [f"## `{spec.name}`", "", f"{spec.reference}.", "", f"`{spec.formula}`", ""]
    lines += ["| hyper-parameter | distillistic | paper | authors' code | followed where they differ |",
              "| --- | --- | --- | --- | --- |"]
    lines += [_param_row(p, settings.get(p.name)) for p in spec.params]
    names = {p.name for p in spec.params}
    for s in spec.defaults:
        if s.key not in names:
            lines.append(_row(s.key, s.ours or _value(spec.temperature if s.key == "temperature" else None),
                              s.paper, s.code, s.follows))
    if spec.notes:
        lines += ["", f"Notes: {spec.notes}."]
    return "\n".join(lines)


def render() -> str:
    """The whole of ``docs/methods.md``."""
    return HEADER + "\n" + "\n\n".join(method_section(s) for s in catalogue.specs().values()) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/methods.md")
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")
