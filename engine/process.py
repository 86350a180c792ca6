"""Process hygiene for the children `pdcluster up` starts."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


LAUNCHER_PID_ENV = "PDCLUSTER_LAUNCHER_PID"  # set by the launcher in its children's environment


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so a launcher killed with
    SIGKILL leaves no orphan node behind. (No-op elsewhere.)

    The parent may have died before we asked (during the imports): then this process was
    handed to init, or to a subreaper (systemd --user, a supervisor), whose pid is not 1,
    so the check is against the launcher's pid, which the launcher passes down."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if os.getppid() != int(launcher) if launcher.isdigit() else os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
