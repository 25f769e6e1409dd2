"""OS discovery and validation, rule by rule, against real OS directories (Ganeti _TryOSFromDisk)."""

from __future__ import annotations

import os

import pytest
from conftest import make_os, write_script

from ganeti_vol.core import errors as E
from ganeti_vol.ganeti import discovery


def probe(d):
    return discovery.probe_os(d.name, str(d))


def test_minimal_api20_os_is_valid_with_variants_and_parameters(tmp_path):
    """A complete API 20 OS is valid; variants keep order; parameters are parsed."""
    d = make_os(tmp_path, variants=("b", "a"), parameters=(("p1", "first"), ("p2", "second one")))
    e = probe(d)
    assert e.valid, e.diagnose
    assert e.os.variants == ("b", "a")
    assert e.os.parameters == (("p1", "first"), ("p2", "second one"))
    assert e.os.api_versions == (20,)
    assert e.os.trusted
    assert e.os.full_names() == ["testos+b", "testos+a"]


def test_missing_api_file_names_the_file_and_errno(tmp_path):
    d = make_os(tmp_path, skip=("ganeti_api_version",))
    e = probe(d)
    assert not e.valid
    assert e.diagnose.startswith(
        f"Required file 'ganeti_api_version' not found under path {d}: ENOENT"
    )


def test_api_file_that_is_a_directory_is_not_a_regular_file(tmp_path):
    d = make_os(tmp_path, skip=("ganeti_api_version",))
    (d / "ganeti_api_version").mkdir()
    assert probe(d).diagnose == f"File 'ganeti_api_version' in {d} is not a regular file"


@pytest.mark.parametrize("text", ["20\nabc\n", "20\n\n15\n", "twenty\n"])
def test_non_integer_api_line_invalidates_the_os(tmp_path, text):
    """Any non-integer line, including an empty line in the middle, is rejected."""
    d = make_os(tmp_path)
    (d / "ganeti_api_version").write_text(text)
    e = probe(d)
    assert not e.valid
    assert e.diagnose.startswith("API version(s) can't be converted to integer")


def test_api_file_with_trailing_newline_and_whitespace_parses(tmp_path):
    d = make_os(tmp_path)
    (d / "ganeti_api_version").write_text(" 20 \n15\n")
    assert discovery.read_api_versions(str(d)) == [20, 15]


@pytest.mark.parametrize("text,found", [("5\n", "[5]"), ("", "[]"), ("25\n30\n", "[25, 30]")])
def test_api_version_mismatch(tmp_path, text, found):
    """No intersection with {10, 15, 20} (an empty file included) is a mismatch."""
    d = make_os(tmp_path)
    (d / "ganeti_api_version").write_text(text)
    assert probe(d).diagnose == (
        f"API version mismatch for path '{d}': found {found}, want [10, 15, 20]."
    )


def test_negotiated_version_is_the_highest_common_one(tmp_path):
    d = make_os(tmp_path, api=(25, 15, 10), parameters=None, skip=("verify",))
    (d / "parameters.list").write_text("")
    write_script(d / "verify", "exit 0")
    e = probe(d)
    assert e.valid, e.diagnose
    assert e.os.api_version == 15


def test_gating_uses_the_max_declared_version_not_the_negotiated_one(tmp_path):
    """'25\\n15' requires parameters.list and verify, as Ganeti does."""
    d = make_os(tmp_path, api=(25, 15), skip=("verify",))
    e = probe(d)
    assert e.diagnose.startswith(f"File 'verify' under path '{d}' is missing (ENOENT")


@pytest.mark.parametrize("script", ["export", "import", "rename"])
def test_export_import_rename_are_always_required(tmp_path, script):
    d = make_os(tmp_path, api=(10,), variants=None, parameters=None, skip=(script, "verify"))
    e = probe(d)
    assert e.diagnose.startswith(f"File '{script}' under path '{d}' is missing (ENOENT")


def test_api20_requires_verify_and_parameters_list(tmp_path):
    d = make_os(tmp_path, skip=("parameters.list",))
    assert probe(d).diagnose.startswith(f"File 'parameters.list' under path '{d}' is missing")
    d2 = make_os(tmp_path / "b", skip=("verify",))
    assert probe(d2).diagnose.startswith(f"File 'verify' under path '{d2}' is missing")


def test_below_api20_verify_and_parameters_are_ignored(tmp_path):
    """API 15: verify is not looked up (even if broken), parameters.list not read."""
    d = make_os(tmp_path, api=(15,), parameters=(("x", "y"),))
    (d / "verify").chmod(0o644)  # not executable: would fail if checked
    e = probe(d)
    assert e.valid, e.diagnose
    assert "verify" not in e.os.scripts
    assert e.os.parameters == ()


def test_api10_ignores_variants_list(tmp_path):
    d = make_os(tmp_path, api=(10,), variants=("a", "b"), parameters=None, skip=("verify",))
    e = probe(d)
    assert e.valid and e.os.variants == ()
    assert e.os.full_names() == ["testos"]


def test_non_executable_script_is_reported(tmp_path):
    d = make_os(tmp_path)
    (d / "export").chmod(0o644)
    assert probe(d).diagnose == f"File 'export' under path '{d}' is not executable"


def test_exec_check_uses_the_owner_bit_only(tmp_path):
    """Ganeti checks S_IXUSR, not access(2): 0o700 passes, 0o055 fails."""
    d = make_os(tmp_path)
    (d / "export").chmod(0o700)
    assert probe(d).valid
    (d / "export").chmod(0o055)
    assert not probe(d).valid


def test_script_that_is_a_directory_is_not_a_regular_file(tmp_path):
    d = make_os(tmp_path, skip=("rename",))
    (d / "rename").mkdir()
    assert probe(d).diagnose == f"File 'rename' under path '{d}' is not a regular file"


def test_symlinked_scripts_are_followed(tmp_path):
    """Ganeti's QA symlinks every script to /bin/true."""
    d = make_os(tmp_path, skip=("create", "export", "import", "rename", "verify"))
    for s in ("create", "export", "import", "rename", "verify"):
        os.symlink("/bin/true", d / s)
    assert probe(d).valid


def test_dangling_symlink_is_missing(tmp_path):
    d = make_os(tmp_path, skip=("import",))
    os.symlink(tmp_path / "nowhere", d / "import")
    assert probe(d).diagnose.startswith(f"File 'import' under path '{d}' is missing (ENOENT")


def test_create_or_create_untrusted_must_exist(tmp_path):
    d = make_os(tmp_path, skip=("create",))
    assert probe(d).diagnose == (
        f"A create script (trusted or untrusted) under path '{d}' must exist"
    )


def test_create_untrusted_alone_makes_an_untrusted_os(tmp_path):
    d = make_os(tmp_path, skip=("create",), scripts={"create_untrusted": "exit 0"})
    e = probe(d)
    assert e.valid and not e.os.trusted


def test_non_executable_create_untrusted_is_reported(tmp_path):
    d = make_os(tmp_path)
    write_script(d / "create_untrusted", "exit 0", mode=0o644)
    assert probe(d).diagnose == f"File 'create_untrusted' under path '{d}' is not executable"


def test_variants_list_drops_comments_and_blank_lines_and_keeps_order(tmp_path):
    d = make_os(tmp_path)
    (d / "variants.list").write_text("# comment\n\n  zeta  \nalpha\n   # indented comment\nmid\n")
    assert probe(d).os.variants == ("zeta", "alpha", "mid")


def test_variants_list_is_optional(tmp_path):
    d = make_os(tmp_path, variants=None)
    e = probe(d)
    assert e.valid and e.os.variants == ()
    assert e.os.full_names() == ["testos"]


def test_parameters_list_tolerates_blank_comment_and_name_only_lines(tmp_path):
    """Ganeti crashes on these; we skip blank/comment lines and allow name-only."""
    d = make_os(tmp_path)
    (d / "parameters.list").write_text(
        "# comment\n\nfirst   the first one\nname_only\n  second\tsecond  desc \n"
    )
    assert probe(d).os.parameters == (
        ("first", "the first one"),
        ("name_only", ""),
        ("second", "second  desc"),
    )


def test_unreadable_parameters_list_is_reported(tmp_path):
    d = make_os(tmp_path, skip=("parameters.list",))
    (d / "parameters.list").mkdir()
    assert probe(d).diagnose == f"File 'parameters.list' under path '{d}' is not a regular file"


def test_os_name_outside_the_mask_is_never_valid(tmp_path):
    d = make_os(tmp_path, name="debian.old")
    e = probe(d)
    assert not e.valid
    assert e.diagnose.startswith("Directory for OS debian.old not found in search path")
    assert discovery.find_os_dir("debian.old", [str(tmp_path)]) is None


def test_first_search_dir_wins_and_later_entries_are_shadowed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_os(a, "dup", variants=("first",))
    make_os(b, "dup", variants=("second",), skip=("export",))
    entries = discovery.diagnose([str(a), str(b)])
    assert [e.name for e in entries] == ["dup"]
    (e,) = entries
    assert e.valid and e.os.variants == ("first",) and e.path == str(a / "dup")
    assert len(e.shadowed) == 1
    assert e.shadowed[0].path == str(b / "dup") and not e.shadowed[0].valid
    assert discovery.load_os("dup", [str(a), str(b)]).path == str(a / "dup")


def test_diagnose_lists_every_visible_entry_including_files(tmp_path):
    make_os(tmp_path, "good")
    (tmp_path / "afile").write_text("x")
    (tmp_path / ".hidden").mkdir()
    entries = {e.name: e for e in discovery.diagnose([str(tmp_path)])}
    assert set(entries) == {"good", "afile"}
    assert entries["afile"].diagnose.startswith("Directory for OS afile not found")


def test_diagnose_skips_missing_and_unlistable_dirs_and_continues(tmp_path):
    """Ganeti stops at the first unreadable search dir; we skip it and go on."""
    good = tmp_path / "good"
    make_os(good, "x")
    entries = discovery.diagnose([str(tmp_path / "missing"), str(tmp_path / "afile"), str(good)])
    assert [e.name for e in entries] == ["x"]


def test_load_os_strips_the_variant_and_reports_invalid_os(tmp_path):
    make_os(tmp_path, "broken", skip=("rename",))
    make_os(tmp_path, "fine")
    assert discovery.load_os("fine+default", [str(tmp_path)]).name == "fine"
    with pytest.raises(E.OSDefinitionError, match=r"invalid OS 'broken': File 'rename'"):
        discovery.load_os("broken", [str(tmp_path)])
    with pytest.raises(E.OSDefinitionError, match=r"Directory for OS nothere not found"):
        discovery.load_os("nothere", [str(tmp_path)])


@pytest.mark.parametrize(
    "variants,name,message",
    [
        ((), "x+v", "OS 'x' does not support variants ('v' passed)"),
        (("a", "b"), "x", "OS name 'x' must include a variant (one of: a, b)"),
        (("a", "b"), "x+c", "OS 'x' does not support variant 'c' (supported: a, b)"),
    ],
)
def test_check_variant_messages(tmp_path, variants, name, message):
    d = make_os(tmp_path, "x", variants=variants or None)
    os_def = probe(d).os
    with pytest.raises(E.OSDefinitionError) as err:
        discovery.check_variant(os_def, name)
    assert str(err.value) == message


def test_check_variant_accepts_known_variant(tmp_path):
    os_def = probe(make_os(tmp_path, "x", variants=("a", "b"))).os
    discovery.check_variant(os_def, "x+b")


def test_unknown_parameters_are_listed(tmp_path):
    os_def = probe(make_os(tmp_path, "x", parameters=(("known", "k"),))).os
    with pytest.raises(E.OSDefinitionError) as err:
        discovery.check_parameters(os_def, ["known", "zz", "aa"])
    assert str(err.value) == "The following parameters are not supported by the OS x: aa, zz"


def test_block_device_extension_file_is_read(tmp_path):
    d = make_os(tmp_path)
    (d / "ganeti_vol.conf").write_text("[disks]\naccess = block\n")
    assert probe(d).os.wants_block_devices
    (d / "ganeti_vol.conf").write_text("[disks]\naccess = floppy\n")
    e = probe(d)
    assert not e.valid and "disks/access" in e.diagnose
