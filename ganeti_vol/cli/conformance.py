"""``ganeti-vol os test``: the conformance runner's command line and report table."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ganeti_vol.cli import common
from ganeti_vol.core import errors as E
from ganeti_vol.core.lazy import lazy
from ganeti_vol.ganeti import fields

conformance = lazy("ganeti_vol.authoring.conformance")
ganeti_params = lazy("ganeti_vol.ganeti.params")

if TYPE_CHECKING:
    from ganeti_vol.authoring.conformance import Options, Report

DESCRIPTION = (
    "Run an OS definition as a Ganeti node would, without a cluster: validate it, build a "
    "scratch instance with two disks (--disks) on sparse files (and, as root, on loop "
    "devices), run verify with good and bad parameters, create, export -> import of each "
    "disk into fresh disks, rename and reinstall.  After every step it checks exit codes, "
    "stdout outside export, disk sizes, EXP_SIZE_FD, empty exports, and leaked loop devices, "
    "partitions, mounts, processes and temporary files.  Prints a report table; exit status "
    "1 if a step failed (doc/os-conformance.md)."
)


def register_os(os_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = os_sub.add_parser(
        "test", help="run an OS definition as Ganeti would, without a cluster, and report",
        description=DESCRIPTION,
    )
    p.add_argument(
        "target", metavar="PATH_OR_NAME",
        help="an OS directory (anything with a '/', e.g. ./myos) or NAME[+VARIANT] in the "
             "search path",
    )
    p.add_argument(
        "--disk-size", default="512M", metavar="SIZE",
        help="size of the scratch disk 0 (sparse; MiB or with K/M/G/T; default 512M, "
             "debootstrap's minimum); the other disks have 64M, at most SIZE",
    )
    p.add_argument(  # the numbers are conformance.MAX_DISKS and DEFAULT_DISKS (not loaded here)
        "--disks", metavar="N",
        help="how many disks the scratch instance has, 1 to 4 (default 2; 1 for an OS that "
             "supports only one disk)",
    )
    p.add_argument("--variant", default="", help="variant to test (default: the first one)")
    p.add_argument(
        "-O", "--os-parameters", action="append", default=[], metavar="KEY=VALUE",
        help="good OS parameter, must pass verify (repeatable, or comma-separated)",
    )
    p.add_argument(
        "--bad-param", action="append", default=[], metavar="KEY=VALUE",
        help="a declared parameter with a value verify must reject (repeatable)",
    )
    p.add_argument("-H", "--hypervisor-parameters", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="kvm parameter of the scratch instance, over Ganeti's defaults "
                        "(repeatable, or comma-separated)")
    p.add_argument("-B", "--backend-parameters", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="backend parameter of the scratch instance (repeatable)")
    p.add_argument("--allow-empty-create", action="store_true",
                   help="the OS installs nothing (noop, PXE boot): disk 0 may stay all zeros "
                        "after create (else that fails the create step)")
    p.add_argument("--allow-change", action="append", default=[], metavar="PATH",
                   help="a file the import changes on purpose (/etc/fstab): the file-level "
                        "compare warns instead of failing (repeatable)")
    p.add_argument("--no-loop", action="store_true",
                   help="skip the pass on loop devices (run as root it is on by default)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (disks, logs, exports) and print its path")
    p.add_argument("--work-dir", metavar="DIR",
                   help="create the scratch directory in DIR (default: the system temp dir)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long each script may run (default 600)")
    common.add_debug_level(p)
    common.add_json(p)
    common.add_search_path(p)
    p.set_defaults(func=cmd_test)


def _options(args: argparse.Namespace) -> Options:
    try:
        size = fields.parse_size(args.disk_size, default_unit="M")
    except ValueError as err:
        raise E.UsageError(f"invalid --disk-size '{args.disk_size}': {err}") from None
    if size < 1 << 20:
        raise E.UsageError(f"invalid --disk-size '{args.disk_size}': at least 1M")
    if not args.timeout > 0:
        raise E.UsageError(f"invalid --timeout {args.timeout:g}: must be more than 0")
    params = {}
    for kind, flags, what in (("hv", args.hypervisor_parameters, "-H"),
                              ("be", args.backend_parameters, "-B")):
        params[kind], problems = ganeti_params.check(
            kind, fields.parse_key_values(flags, f"{what} parameter"), "kvm")
        if problems:
            raise E.UsageError(f"invalid {what}: {'; '.join(problems)}")
    options: Options = conformance.Options(
        disk_size=size,
        disks=conformance.DEFAULT_DISKS if args.disks is None
        else conformance.disk_count(args.disks),
        variant=args.variant,
        osparams=fields.parse_key_values(args.os_parameters, "OS parameter"),
        bad_params=fields.parse_key_values(args.bad_param, "--bad-param"),
        loop=not args.no_loop,
        keep=args.keep,
        allow_empty_create=args.allow_empty_create,
        allow_change=frozenset("/" + p.strip("/") for p in args.allow_change),
        work_dir=args.work_dir,
        timeout=args.timeout,
        debug_level=args.debug_level,
        hvparams=params["hv"],
        beparams=params["be"],
    )
    return options


def cmd_test(args: argparse.Namespace) -> int:
    options = _options(args)
    search = () if "/" in args.target else common.make_context(args).os_search_path
    report = conformance.run(args.target, options, search_path=search)
    if args.json:
        common.emit_json(report.to_json())
    else:
        render(report)
    return 0 if report.passed else E.EXIT_WARNING


def render(report: Report) -> None:
    """The report table, the log tails of failed steps, and a one-line verdict."""
    api = f", API {report.api_version}" if report.api_version is not None else ""
    common.emit(f"os test {report.full_name or report.os_name} ({report.os_path}{api})")
    rows = [
        (s.name, s.label, s.status.upper() if s.status == conformance.FAIL else s.status,
         f"{s.seconds:.2f}s", s.detail)
        for s in report.steps
    ]
    common.emit_table(rows, headers=("STEP", "DISKS", "RESULT", "TIME", "DETAIL"))
    for step in report.steps:
        if step.status == conformance.FAIL and step.log_tail:
            common.emit()
            common.emit(f"{step.name} ({step.label}): last lines of the log:")
            for line in step.log_tail:
                common.emit(f"    {line}")
    counts = report.counts()
    verdict = "passed" if report.passed else "FAILED"
    common.emit()
    common.emit(
        f"{verdict}: {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail, "
        f"{counts['skip']} skip in {report.seconds:.1f}s"
        + (f"; kept {report.work_dir}" if report.work_dir else "")
    )
