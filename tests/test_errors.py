"""The error model: templates format, exit codes are documented and distinct."""

import re
from pathlib import Path

from ganeti_vol.core import errors as E

DOC = Path(__file__).resolve().parent.parent / "doc" / "exit-codes.md"


def test_every_error_class_formats_its_template_with_its_fields():
    err = E.ScriptFailed(op="create", script="/os/x/create", reason="exited with exit code 3",
                         tail_block="")
    assert str(err) == "OS create script '/os/x/create' failed (exited with exit code 3)"
    assert err.script == "/os/x/create"
    assert err.exit_code == 8


def test_free_text_message_overrides_template():
    assert str(E.UsageError("bad --disk 'x'")) == "bad --disk 'x'"


def test_every_exit_code_is_documented_in_exit_codes_md():
    text = DOC.read_text()
    documented = {int(m) for m in re.findall(r"^\|\s*(\d+)\s*\|", text, re.M)}
    codes = {cls.exit_code for cls in E.all_error_classes()}
    assert codes <= documented, f"undocumented exit codes: {sorted(codes - documented)}"
    for cls in E.all_error_classes():
        assert f"`{cls.__name__}`" in text, f"{cls.__name__} missing from {DOC.name}"


def test_interrupted_maps_to_128_plus_signal():
    assert E.Interrupted(2).exit_code == 130
    assert E.Interrupted(15).exit_code == 143


def test_indent_block_is_empty_for_no_lines():
    assert E.indent_block("log:", []) == ""
    assert E.indent_block("log:", ["a", "b"]) == "\nlog:\n    a\n    b"
