"""Names and numbers from Ganeti's OS interface contract, and ganeti-vol's own.

Ganeti names are kept exactly (see doc/os-discovery.md and
../shared/reference/ganeti-contract.md); nothing here does I/O.
"""

from __future__ import annotations

import re

# --- OS definitions (Ganeti src/Ganeti/Constants.hs, section "OS") -----------
OS_API_FILE = "ganeti_api_version"
OS_VARIANTS_FILE = "variants.list"
OS_PARAMETERS_FILE = "parameters.list"

OS_SCRIPT_CREATE = "create"
OS_SCRIPT_CREATE_UNTRUSTED = "create_untrusted"
OS_SCRIPT_EXPORT = "export"
OS_SCRIPT_IMPORT = "import"
OS_SCRIPT_RENAME = "rename"
OS_SCRIPT_VERIFY = "verify"
OS_SCRIPTS = (
    OS_SCRIPT_CREATE,
    OS_SCRIPT_CREATE_UNTRUSTED,
    OS_SCRIPT_EXPORT,
    OS_SCRIPT_IMPORT,
    OS_SCRIPT_RENAME,
    OS_SCRIPT_VERIFY,
)

#: ganeti-vol extension: a text file in the OS dir asking for block devices
OS_BLOCKDEV_FILE = "ganeti_vol.conf"

OS_API_V10 = 10
OS_API_V15 = 15
OS_API_V20 = 20
OS_API_VERSIONS = frozenset({OS_API_V10, OS_API_V15, OS_API_V20})

#: lib/constants.py EXT_PLUGIN_MASK: OS names and hook names
EXT_PLUGIN_MASK = re.compile(r"^[a-zA-Z0-9_-]+$")
VARIANT_DELIM = "+"

VERIFY_CHECK_PARAMETERS = "parameters"

# --- environment -------------------------------------------------------------
#: Constants.hs hooksPath: the PATH every script and hook gets
SCRIPT_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
OSP_PREFIX = "OSP_"
#: fd number of EXP_SIZE_FD handed to export scripts (> 9, as Ganeti's daemon uses)
EXP_SIZE_FD_NUMBER = 11

# --- defaults (node config) --------------------------------------------------
DEFAULT_CONFIG_FILE = "/etc/ganeti-vol/ganeti-vol.conf"
CONFIG_ENV_VAR = "GANETI_VOL_CONFIG"
#: Ganeti's OS_SEARCH_PATH (configure's default, as Debian builds it): with no node
#: config, Debian's ganeti-os-noop and ganeti-instance-debootstrap are found
DEFAULT_OS_SEARCH_PATH = (
    "/srv/ganeti/os",
    "/usr/local/lib/ganeti/os",
    "/usr/lib/ganeti/os",
    "/usr/share/ganeti/os",
)
DEFAULT_HOOKS_DIR = "/etc/ganeti/hooks"
DEFAULT_LOG_DIR = "/var/log/ganeti/os"
DEFAULT_EXPORT_DIR = "/srv/ganeti/export"
DEFAULT_STATE_DIR = "/var/lib/ganeti-vol"

#: per-script timeouts in seconds, following Ganeti's RPC limits
DEFAULT_TIMEOUTS = {
    "create": 86400.0,
    "rename": 3600.0,
    "verify": 300.0,
    "export": 0.0,  # 0 = no overall limit; the stall watchdog bounds transfers
    "import": 0.0,
    "hook": 300.0,
}
#: seconds between TERM and KILL when stopping a child's process group
KILL_GRACE = 5.0
#: lines of the log shown when a script fails (Ganeti shows 20)
LOG_TAIL_LINES = 20

# --- hooks -------------------------------------------------------------------
HOOKS_VERSION = 2
HOOKS_PHASE_PRE = "pre"
HOOKS_PHASE_POST = "post"
GANETI_DATA_DIR = "/var/lib/ganeti"
HOOKS_PHASES = (HOOKS_PHASE_PRE, HOOKS_PHASE_POST)
#: the hook paths ganeti-vol runs, with Ganeti's opcode for each (contract §5.4)
HOOK_OP_CODES = {
    "instance-add": "OP_INSTANCE_CREATE",
    "instance-reinstall": "OP_INSTANCE_REINSTALL",
    "instance-rename": "OP_INSTANCE_RENAME",
    "instance-export": "OP_BACKUP_EXPORT",
}

# --- exports -----------------------------------------------------------------
GANETI_EXPORT_VERSION = 0
