"""The conformance runner: run an OS definition the way a Ganeti node would, without a cluster.

:func:`run` validates the OS definition, builds a scratch instance with
several disks (two by default) on sparse files in a private work directory
(and, as root, a second one on loop devices), and runs the OS scripts through
the same code paths as the real operations: ``verify`` with good and bad
parameters, ``create``, the export -> import round trip of every disk into
fresh disks (one step per disk and operation), ``rename`` and a reinstall.
After every step it checks what Ganeti cannot see but an operator pays for
later:

- the script's exit status (with the last log lines on failure);
- stdout outside export (it is data only for ``export``);
- file disks not truncated (sizes before and after every step);
- ``EXP_SIZE_FD`` equal to the size of the dump when it is announced;
- an export that is not empty;
- no loop device, partition, mount or process left behind (they are cleaned
  up and the step fails), and no new temporary file (a warning).

Each step ends as pass, warn, fail or skip; a :class:`Report` collects them.
The library never prints: ``ganeti_vol.cli.conformance`` renders the report.
What each check means and how the round trip is judged is in
``doc/os-conformance.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial

from ganeti_vol.authoring.conformance.disks import (
    CannotCompare,
    DigestSink,
    DiskFacts,
    NoLoop,
    disk_paths,
    holds_data,
    loop_devices_usable,
    seed,
    unmount,
)
from ganeti_vol.authoring.conformance.leaks import LeakCheck, devnum, snapshot
from ganeti_vol.authoring.conformance.report import (
    FAIL,
    PASS,
    PASS_STEPS,
    RENAMED_NAME,
    SEED_BLOCKS,
    SKIP,
    TEMP_DIRS,
    UNKNOWN_PARAM,
    WARN,
    Options,
    Report,
    Step,
)
from ganeti_vol.authoring.conformance.roundtrip import compare_volumes
from ganeti_vol.authoring.conformance.scratch import Disks, scratch_instance, scratch_node
from ganeti_vol.authoring.conformance.target import (
    check_bad_params,
    disk_count,
    full_os_name,
    resolve,
)
from ganeti_vol.core import constants as C
from ganeti_vol.core import errors as E
from ganeti_vol.core.model import Instance, OSDefinition, OSEntry
from ganeti_vol.engine.parallel import Engine
from ganeti_vol.ganeti import fields
from ganeti_vol.ops import operations, transfer
from ganeti_vol.ops.results import DiskExport
from ganeti_vol.system import devices, loopdev, loopteardown, process, scriptlog

log = logging.getLogger(__name__)


# --- the runner -----------------------------------------------------------------------------


class _Runner:
    def __init__(self, os_def: OSDefinition, full_name: str, options: Options, work: str,
                 report: Report) -> None:
        self.os_def = os_def
        self.full_name = full_name
        self.options = options
        self.work = work
        self.real_work = os.path.realpath(work)
        self.report = report
        self.node = scratch_node(os_def, work, options)
        #: hashes disks like the export does (same chunk size and hash), so digests compare
        self.engine = Engine.from_config(self.node)
        self.ctx = operations.OpContext(node=self.node, debug_level=options.debug_level)
        self.temp_dirs = tuple(dict.fromkeys(
            d for d in (*TEMP_DIRS, tempfile.gettempdir()) if os.path.isdir(d)
        ))
        #: loop devices this runner attached (their backing files are in the work dir)
        self.attached: set[str] = set()
        #: every scratch disk file
        self.disk_files: list[str] = []
        self.leaks = LeakCheck(os_def.path, self.real_work, self.temp_dirs, self.attached,
                               self.disk_files)
        #: per pass and disk index: the original disk when it was exported
        self.facts_a: dict[str, dict[int, DiskFacts]] = {}
        #: per pass and disk index: the archive path and the export's result for that disk
        #: per disk kind and index: the archive of the disk's export, and what it did
        self.exports: dict[str, dict[int, tuple[str, DiskExport]]] = {}
        #: what the running step's children did (see scriptlog.watch)
        self.watch: scriptlog.Watch | None = None

    # -- the step frame ---------------------------------------------------------------------

    def step(self, name: str, disks: str, body: Callable[[Step], None],
             watched: Sequence[str] = (), disk: int | None = None) -> Step:
        """Run ``body`` as one step: catch its error, then check stdout, sizes and leaks."""
        step = Step(name, disks, disk)
        self.report.steps.append(step)
        stdout_dir = os.path.join(
            self.work, "stdout",
            f"{len(self.report.steps):02d}-{name}-{step.label}".replace(" ", "-"),
        )
        os.makedirs(stdout_dir, exist_ok=True)
        before = snapshot(self.temp_dirs)
        sizes = {p: fields.existing_size(p) for p in watched}
        started = time.monotonic()
        seen: scriptlog.Watch | None = None
        try:
            with scriptlog.watch(stdout_dir) as seen:
                self.watch = seen
                try:
                    body(step)
                except E.GanetiVolError as err:
                    step.fail_from(err)
                    step.aborted = True
                except OSError as err:  # e.g. a disk the scripts removed
                    step.add("error", FAIL, f"{err.strerror}: '{err.filename}'")
                    step.aborted = True
        finally:  # also on Ctrl-C: nothing may stay behind
            step.seconds = time.monotonic() - started
            self.leaks.after(step, seen, before, sizes)
        return step

    def skip(self, name: str, disks: str, reason: str, disk: int | None = None) -> None:
        step = Step(name, disks, disk)
        step.add("skipped", SKIP, reason)
        self.report.steps.append(step)

    # -- disk facts --------------------------------------------------------------------------

    def disk_facts(self, path: str) -> DiskFacts:
        """Size, whole-disk digest and whether it holds any non-zero byte (holes skipped)."""
        size = fields.existing_size(path) or 0
        if size == 0:
            return DiskFacts(0, "", False)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            summary = self.engine.encode(fd, DigestSink(), source_kind="auto", what=f"'{path}'")
        finally:
            os.close(fd)
        return DiskFacts(summary.size, summary.digest, summary.zero_bytes < summary.size)

    def file_facts(self, disks: Disks, which: str, index: int) -> DiskFacts:
        """Facts of the file behind disk ``index`` of a or b (flushing its loop device first)."""
        instance, files = (disks.a, disks.files_a) if which == "a" else (disks.b, disks.files_b)
        if disks.kind == "loop":
            loopteardown.flush(instance.disks[index].path or "")
        return self.disk_facts(files[index])

    # -- the steps ---------------------------------------------------------------------------

    def validate(self, entry: OSEntry) -> Step:
        def body(step: Step) -> None:
            if not entry.valid or entry.os is None:
                step.add("diagnose", FAIL, entry.diagnose)
                return
            o = entry.os
            parts = [f"API {', '.join(map(str, o.api_versions))}"]
            if o.variants:
                parts.append(f"variants {', '.join(o.variants)}")
            if o.parameters:
                parts.append(f"parameters {', '.join(o.parameter_names)}")
            step.add("diagnose", PASS, "valid: " + "; ".join(parts))

        return self.step("validate", "-", body)

    def help(self) -> Step:
        """``--help`` of every script, with an empty environment and no disk in sight."""
        log_dir = os.path.join(self.work, "log")

        def body(step: Step) -> None:
            for name in C.OS_SCRIPTS:
                path = self.os_def.scripts.get(name)
                if path is None:
                    continue
                proc, rc, output = process.run_collect(
                    [path, "--help"], {}, cwd=self.os_def.path, op=f"help-{name}",
                    log_path=os.path.join(log_dir, f"help-{name}.log"), capture=True,
                    capture_limit=65536, timeout=self.options.help_timeout, kill_grace=1.0,
                )
                text = (output or "") + self._stdout_of(proc.pid)
                first = text.strip().splitlines()[0][:60] if text.strip() else ""
                if proc.timed_out:
                    step.add(name, WARN, f"{name} --help did not end within "
                             f"{self.options.help_timeout:g}s (killed)")
                elif rc == 0 and first:
                    step.add(name, PASS, f"{name}: '{first}'")
                else:
                    said = f"'{first}'" if first else "no output"
                    step.add(name, WARN, f"{name} --help: {scriptlog.exit_reason(rc)}, {said}")

        return self.step("help", "-", body)

    def _stdout_of(self, pid: int) -> str:
        """What the child ``pid`` of the running step wrote to stdout (kept apart from the log)."""
        for script in self.watch.scripts if self.watch else ():
            if script.pid == pid and script.stdout_path:
                with open(script.stdout_path, "rb") as f:
                    return f.read(65536).decode("utf-8", "replace")
        return ""

    def verify_good(self) -> Step:
        params = dict(self.options.osparams)

        def body(step: Step) -> None:
            operations.validate_os_params(self.ctx, self.os_def, self.full_name, params)
            shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "no parameters"
            step.add("exit code", PASS, f"verify accepted {shown}")

        return self.step("verify", "-", body)

    def verify_rejects(self, label: str, bad: Mapping[str, str], who: str) -> Step:
        params = {**self.options.osparams, **bad}
        shown = ", ".join(f"{k}={v}" for k, v in bad.items())

        def body(step: Step) -> None:
            try:
                operations.validate_os_params(self.ctx, self.os_def, self.full_name, params)
            except E.OSDefinitionError as err:
                said = str(err).splitlines()[-1].strip()
                step.add("rejected", PASS, f"{who} rejected {shown}: {said}")
            else:
                step.add("rejected", FAIL, f"{who} accepted the bad parameter {shown}")

        return self.step(label, "-", body)

    def run_pass(self, disks: Disks) -> None:
        """create; export, import and compare of each disk (a step per disk); rename; reinstall.

        Every disk is exported before the first import, as Ganeti exports a
        whole instance, so the compare of one disk knows the others' exports.
        """
        kind = disks.kind
        watched = disks.watched
        create = self.step("create", kind, lambda s: self._create(s, disks), watched)
        if create.aborted:  # a failed check alone (an empty disk, a partition left) goes on
            for name in PASS_STEPS[1:]:
                self.skip(name, kind, "create failed")
            return
        indexes = range(len(disks.a.disks))

        def on_disk(name: str, body: Callable[..., None], index: int) -> Step:
            return self.step(name, kind, partial(body, disks=disks, index=index), watched, index)

        exported = {i for i in indexes if on_disk("export", self._export, i).status != FAIL}
        imported: set[int] = set()
        for i in indexes:
            if i not in exported:
                self.skip("import", kind, "export failed", i)
            elif on_disk("import", self._import, i).status != FAIL:
                imported.add(i)
        for i in indexes:
            if i in imported:
                on_disk("compare", self._compare, i)
            else:
                self.skip("compare", kind, "import failed" if i in exported else "export failed",
                          i)
        renamed = self.step("rename", kind, lambda s: self._rename(s, disks), watched)
        inst = disks.a.replace(name=RENAMED_NAME) if renamed.status != FAIL else disks.a
        self.step("reinstall", kind, lambda s: self._create(s, disks, inst, reinstall=True),
                  watched)

    def _create(self, step: Step, disks: Disks, inst: Instance | None = None,
                reinstall: bool = False) -> None:
        inst = inst or disks.a
        # the runner checks sizes and leftovers after every step itself
        res = operations.create(self.ctx, inst, reinstall=reinstall, post_checks=False)
        what = "reinstall (INSTANCE_REINSTALL=1)" if reinstall else "create"
        step.add("exit code", PASS, f"{what} of {inst.name} ended with exit code 0 "
                 f"in {res.script_duration:.2f}s")
        if disks.kind == "loop":
            loopteardown.flush(inst.disks[0].path or "")
        if holds_data(disks.files_a[0]):
            step.add("disk 0", PASS, f"disk 0 holds data after {what}")
        elif self.os_def.empty_after_create or self.options.allow_empty_create:
            why = ("ganeti_vol.conf says" if self.os_def.empty_after_create
                   else "--allow-empty-create says")
            step.add("disk 0", PASS, f"{what} left disk 0 empty, as {why} it may")
        else:
            step.add("disk 0", FAIL, f"{what} left disk 0 empty (all zeros): what it wrote was "
                     "lost, or it installs nothing (then say so: 'empty_after_create = yes' in "
                     "[disks] of its ganeti_vol.conf, or --allow-empty-create)")

    def _export(self, step: Step, disks: Disks, index: int) -> None:
        facts = self.file_facts(disks, "a", index)
        if not facts.holds_data:  # zeros would prove nothing (disk 0: create's step failed)
            seed(disks.a.disks[index].path or "", index)
            step.add("test data", PASS, f"disk {index} was empty: wrote {SEED_BLOCKS} "
                     "blocks of test data into it, as a running instance would")
            facts = self.file_facts(disks, "a", index)
        self.facts_a.setdefault(disks.kind, {})[index] = facts
        out = os.path.join(self.work, f"export-{disks.kind}-disk{index}")
        try:
            res = transfer.export_one_disk(self.ctx, disks.a, index, out)
        except E.ShortTransfer as err:
            self._short_export(step, err, facts)
            return
        self.exports.setdefault(disks.kind, {})[index] = res
        size, hint = res[1].size, res[1].summary.size_hint
        step.add("exit code", PASS, f"disk {index}: {size} bytes exported")
        if hint is None:
            step.add("EXP_SIZE_FD", PASS, f"disk {index}: no size announced (optional)")
        else:
            step.add("EXP_SIZE_FD", PASS, f"disk {index}: announced {hint} bytes = the dump")
        if self.file_facts(disks, "a", index).digest != facts.digest:
            step.add("read only", WARN, f"the export changed the data of disk {index}; it "
                     "should only read it (e.g. mount -o ro)")

    def _short_export(self, step: Step, err: E.ShortTransfer, facts: DiskFacts) -> None:
        actual = getattr(err, "actual", None)
        if actual == 0:
            if facts.holds_data:
                step.add("export size", FAIL, "the export wrote nothing although the disk holds "
                         "data (an 'exit 0' exporter?)")
            else:
                step.add("export size", FAIL, "the export wrote nothing (and the disk holds no "
                         "data either: did create write anything?)")
        elif "EXP_SIZE_FD" in str(err):
            step.add("EXP_SIZE_FD", FAIL, f"announced {getattr(err, 'expected', '?')} bytes on "
                     f"EXP_SIZE_FD, but the export wrote {actual}")
        else:
            step.fail_from(err)

    def _import(self, step: Step, disks: Disks, index: int) -> None:
        res = transfer.import_instance(self.ctx, disks.b, self.exports[disks.kind][index][0],
                                       os_given=True)
        for disk in res.disks:
            step.add("exit code", PASS, f"disk {disk.index}: {disk.size} bytes through "
                     f"the {disk.mode} import")

    def _compare(self, step: Step, disks: Disks, index: int) -> None:
        """Byte equality, else a second export, else the files inside (doc/os-conformance.md)."""
        what = f"disk {index}"
        a = self.facts_a[disks.kind][index]
        if self.file_facts(disks, "b", index).digest == a.digest:
            step.add("round trip", PASS, f"{what}: the imported disk is byte-identical to the "
                     "original")
            return
        exports = self.exports[disks.kind]
        first = exports[index][1].summary.digest
        if first == a.digest:  # the export is a raw image: bytes must match
            step.add("round trip", FAIL, f"{what}: the export is the disk's bytes, but the "
                     "imported disk differs from the original")
            return
        # the other disks, where they differ from this one (an export that ignores EXPORT_INDEX)
        others = {j: f for j, f in self.facts_a[disks.kind].items()
                  if j != index and f.digest != a.digest}
        for j, other in others.items():
            if first == other.digest:
                step.add("round trip", FAIL, f"{what}: the export wrote the bytes of disk {j}, "
                         f"not of disk {index}: does the export script read EXPORT_DEVICE "
                         f"(EXPORT_INDEX={index})?")
                return
        same = [j for j in others if j in exports and exports[j][1].summary.digest == first]
        if same:  # then a second export that matches proves nothing
            why = (f"the export of {what} is the same stream as that of disk {same[0]} although "
                   "the disks differ (does the export script read EXPORT_DEVICE?)")
        else:
            why = "neither the bytes nor a second export match (a filesystem-level export?)"
            out = os.path.join(self.work, f"export-{disks.kind}-disk{index}-again")
            if first == transfer.export_one_disk(self.ctx, disks.b, index, out)[1].summary.digest:
                step.add("round trip", PASS, f"{what}: the disks differ, but a second export of "
                         "the imported disk is identical to the first export")
                return
        try:
            self._compare_files(step, index, disks.files_a[index], disks.files_b[index])
        except CannotCompare as err:  # nothing shows that the data survived the round trip
            step.add("round trip", FAIL, f"{what}: {why}, and the files inside cannot be "
                     f"compared: {err}")

    def _compare_files(self, step: Step, index: int, file_a: str, file_b: str) -> None:
        if not loop_devices_usable():
            raise CannotCompare("that needs root and working loop devices")
        with self._attach(file_a, True) as la, self._attach(file_b, True) as lb:
            compare_volumes(step, index, la, lb, self.work, self.options.allow_change)

    @contextlib.contextmanager
    def _attach(self, path: str, read_only: bool,
                hold: bool = True) -> Iterator[loopdev.LoopAttachment]:
        with loopdev.attached(path, read_only=read_only, partitions=True,
                              state_dir=self.node.state_dir, tag="ostest", hold=hold) as att:
            self.attached.add(att.device)
            try:
                yield att
            finally:
                self.attached.discard(att.device)

    def _rename(self, step: Step, disks: Disks) -> None:
        operations.rename(self.ctx, disks.a, RENAMED_NAME)
        step.add("exit code", PASS, f"renamed {disks.a.name} to {RENAMED_NAME} "
                 "(OLD_INSTANCE_NAME set)")

    # -- scratch instances -------------------------------------------------------------------

    def instance(self, paths: Sequence[str]) -> Instance:
        """The scratch instance on ``paths`` (files or block devices)."""
        return scratch_instance(self.full_name, self.options, paths)

    def file_disks(self, kind: str) -> tuple[Instance, Instance]:
        """Fresh sparse files for the original and the import target of a pass."""
        count = range(self.options.disks)
        a = self.instance([os.path.join(self.work, f"{kind}-a-disk{i}.img") for i in count])
        b = self.instance([os.path.join(self.work, f"{kind}-b-disk{i}.img") for i in count])
        operations.ensure_file_disks(a)
        operations.ensure_file_disks(b)
        self.disk_files += disk_paths(a) + disk_paths(b)
        return a, b

    @contextlib.contextmanager
    def loop_disks(self) -> Iterator[Disks]:
        """Fresh files attached as loop devices (raises NoLoop if that is impossible)."""
        fa, fb = self.file_disks("loop")
        files_a, files_b = disk_paths(fa), disk_paths(fb)
        with contextlib.ExitStack() as stack:
            try:
                # not held: the scripts are the only users, as of a disk on an LVM node
                devs_a = [stack.enter_context(self._attach(p, False, False)).device
                          for p in files_a]
                devs_b = [stack.enter_context(self._attach(p, False, False)).device
                          for p in files_b]
            except E.DeviceError as err:
                raise NoLoop(f"cannot attach loop devices: {err}") from err
            yield Disks("loop", self.instance(devs_a), self.instance(devs_b), files_a, files_b)

    def sweep(self) -> None:
        """Last resort before the work dir goes: anything still attached to our files."""
        try:
            for dev, backing in devices.iter_loop_devices():
                if backing and self.leaks.ours(backing) and dev not in self.attached:
                    for mount in devices.mounts_of({n for n in [devnum(dev)] if n}):
                        unmount(mount.mount_point, lazy=True)
                    problems = loopteardown.teardown(dev)
                    log.error("detached leftover %s (%s)%s", dev, backing,
                              f": {'; '.join(problems)}" if problems else "")
        except E.GanetiVolError as err:  # must not hide why we are here
            log.error("cannot check for leftover loop devices: %s", err)


# --- entry point ----------------------------------------------------------------------------


def run(target: str, options: Options | None = None, *,
        search_path: Sequence[str] = ()) -> Report:
    """Test the OS definition ``target`` (a path, or a NAME[+VARIANT] in ``search_path``).

    Raises OSDefinitionError if it cannot be found and UsageError for a bad
    variant, ``--bad-param`` or ``--disks``; everything else ends up in the report.  The
    scratch directory is removed at the end (also on Ctrl-C) unless
    ``options.keep``.
    """
    options = options or Options()
    disk_count(options.disks)
    started = time.monotonic()
    entry, named_variant = resolve(target, search_path)
    report = Report(target, entry.name, entry.path)
    os_def = entry.os
    full_name = ""
    if os_def is not None:
        full_name = full_os_name(os_def, options.variant or named_variant)
        check_bad_params(os_def, options.bad_params)
        report.full_name, report.api_version = full_name, os_def.api_version
    parent = options.work_dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="ganeti-vol-ostest-", dir=parent)
    runner = None
    try:
        placeholder = os_def or OSDefinition(entry.name, entry.path, (), {})
        runner = _Runner(placeholder, full_name, options, work, report)
        with runner.engine:
            if runner.validate(entry).status == FAIL or os_def is None:
                for name in ("help", "verify", *PASS_STEPS):
                    runner.skip(name, "-", "the OS definition is invalid")
                return report
            _run_all(runner, os_def, options)
    finally:
        if runner is not None:
            runner.sweep()
        report.seconds = time.monotonic() - started
        if options.keep:
            report.work_dir = work
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report


def _run_all(runner: _Runner, os_def: OSDefinition, options: Options) -> None:
    runner.help()
    if os_def.max_api < C.OS_API_V20:
        runner.skip("verify", "-", f"API {os_def.api_version} < 20: Ganeti runs no verify")
    else:
        runner.verify_good()
        runner.verify_rejects("verify unknown", {UNKNOWN_PARAM: "1"}, "ganeti-vol's own check")
        for name, value in options.bad_params.items():
            runner.verify_rejects(f"verify {name}", {name: value}, "verify")
    a, b = runner.file_disks("file")
    runner.run_pass(Disks("file", a, b, disk_paths(a), disk_paths(b)))
    reason = ""
    if not options.loop:
        reason = "--no-loop given"
    elif not loop_devices_usable():
        reason = "not root (or no /dev/loop-control): the loop-device pass needs root"
    else:
        try:
            with runner.loop_disks() as disks:
                runner.run_pass(disks)
        except NoLoop as err:
            reason = str(err)
        except E.BusyError as err:  # our own loop devices would not detach
            step = Step("detach", "loop")
            step.add("loop devices", FAIL, str(err).splitlines()[0])
            runner.report.steps.append(step)
    if reason:
        for name in PASS_STEPS:
            runner.skip(name, "loop", reason)
