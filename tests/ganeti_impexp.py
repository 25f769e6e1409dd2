"""The shell pipelines Ganeti's import/export daemon runs: run with Ganeti's Python modules.

    python3 tests/ganeti_impexp.py GANETI_DIR pipeline < request.json > answer.json
    python3 tests/ganeti_impexp.py GANETI_DIR cert PEM

``GANETI_DIR`` holds the ``ganeti`` package (Debian's ganeti-3.0 puts it in
``/usr/share/ganeti/3.0``).  Like ``tests/ganeti_reference.py`` it runs as a
separate process with the Python Ganeti runs on (``/usr/bin/python3``), never
inside the test run.  ``tests/test_ganeti_tool.py`` and ``bench/ganeti_tool.py``
use it.

``cert`` writes a key and a self-signed certificate into ``PEM`` with
``utils.GenerateSelfSignedSslCert``, as ``gnt-cluster init`` makes noded's
``server.pem`` (common name ``ganeti.example.com``, which Ganeti's socat
checks).  ``pipeline`` reads a JSON object::

    {"mode": "import"|"export", "compress": "none"|"gzip"|TOOL, "magic": str|null,
     "disk": PATH, "size_mib": N,           # the disk: a file, as a file-storage disk
     "pem": PATH,                           # key, certificate and CA (like noded's server.pem)
     "host": "127.0.0.1", "port": N|null,   # export: where the importer listens
     "bind": "127.0.0.1"|null,
     "fds": [SOCAT_STDERR, DD_STDERR, DD_PID]}

and the answer::

    {"argv": [...],                  # impexpd.CommandBuilder(...).GetCommand()
     "cmd_prefix": str|null, "cmd_suffix": str|null, "exp_size": ...,
     "daemon": PATH,                 # the import-export daemon, for a run of the real thing
     "daemon_args": [...]}           # its options as backend.StartImportExportDaemon builds them

The disk's I/O commands come from ``backend._GetImportExportIoCommand`` with
``IEIO_RAW_DISK`` for a real ``storage.filestorage.FileStorage`` device (what
``gnt-instance move`` and OS-less instances use: ``dd if=DISK ... iflag=direct |``
and ``| dd of=DISK ... oflag=direct conv=notrunc``); the socat, dd, magic and
compression stages come from ``impexpd.CommandBuilder``, with the options the
daemon would have parsed from the arguments ``StartImportExportDaemon`` gives it.
"""

import json
import os
import sys


class _Options:
    """The daemon's parsed options (optparse values), as CommandBuilder reads them."""

    def __init__(self, **values):
        self.__dict__.update(values)


def build(ganeti_dir, req):
    sys.path.insert(0, ganeti_dir)
    from ganeti import backend, constants, impexpd, objects  # noqa
    from ganeti.storage import filestorage  # noqa

    mode = req["mode"]
    disk = objects.Disk(dev_type=constants.DT_FILE, logical_id=("loop", req["disk"]),
                        size=req["size_mib"], mode="rw", iv_name="disk/0", children=[],
                        params={})
    # the cluster's file-storage path policy (/etc/ganeti/file-storage-paths) is not here
    filestorage.CheckFileStoragePathAcceptance = lambda path, **_kw: None
    real = filestorage.FileStorage(("loop", req["disk"]), [], req["size_mib"], {}, {})
    backend._OpenRealBD = lambda _disk: real
    _env, prefix, suffix, exp_size = backend._GetImportExportIoCommand(
        None, mode, constants.IEIO_RAW_DISK, (disk,))

    export = mode == constants.IEM_EXPORT
    opts = _Options(
        key=req["pem"], cert=req["pem"], ca=req["pem"], bind=req.get("bind"),
        ipv4=True, ipv6=False, host=req.get("host") if export else None,
        port=req.get("port") if export else None,
        connect_timeout=constants.RIE_CONNECT_ATTEMPT_TIMEOUT if export else 60,
        connect_retries=constants.RIE_CONNECT_RETRIES if export else 0,
        compress=req["compress"], magic=req.get("magic"),
        exp_size=exp_size, cmd_prefix=prefix, cmd_suffix=suffix,
    )
    socat_fd, dd_fd, dd_pid_fd = req["fds"]
    argv = impexpd.CommandBuilder(mode, opts, socat_fd, dd_fd, dd_pid_fd).GetCommand()

    pem = req["pem"]
    args = [mode, f"--key={pem}", f"--cert={pem}", f"--ca={pem}"]
    if export:
        args += [f"--host={req['host']}", f"--port={req['port']}"]
    args.append("--ipv4")
    if req.get("bind"):
        args.append(f"--bind={req['bind']}")
    args.append(f"--compress={req['compress']}")
    if req.get("magic"):
        args.append(f"--magic={req['magic']}")
    if exp_size is not None:
        args.append(f"--expected-size={exp_size}")
    if prefix:
        args.append(f"--cmd-prefix={prefix}")
    if suffix:
        args.append(f"--cmd-suffix={suffix}")
    if export:
        args.append(f"--connect-retries={opts.connect_retries}")
    args.append(f"--connect-timeout={opts.connect_timeout}")
    return {"argv": argv, "cmd_prefix": prefix, "cmd_suffix": suffix, "exp_size": exp_size,
            "daemon": os.path.join(ganeti_dir, "import-export"), "daemon_args": args}


def cert(ganeti_dir, path):
    sys.path.insert(0, ganeti_dir)
    from ganeti import utils  # noqa

    utils.GenerateSelfSignedSslCert(path, 1)


if __name__ == "__main__":
    if sys.argv[2] == "cert":
        cert(sys.argv[1], sys.argv[3])
    else:
        json.dump(build(sys.argv[1], json.load(sys.stdin)), sys.stdout)
