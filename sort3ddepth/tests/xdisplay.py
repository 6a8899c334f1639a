"""One virtual X display (Xvfb) shared by the GUI tests of a test session.

Tk keeps its X connection until its interpreter is finalised, sometimes only when Python exits; if
the X server is gone by then, Xlib ends the whole process with status 1 (pytest's summary is lost
and CI fails). So the server is started once and outlives this process: a watchdog shell stops it
a second after the test process has ended.
"""

import os
import shutil
import subprocess
import time

DISPLAY = ":95"
_started = {}


def xvfb_display():
    """The shared display name, or None when Xvfb is not installed or did not start."""
    if "display" in _started:
        return _started["display"]
    display = None
    if shutil.which("Xvfb") is not None:
        socket = "/tmp/.X11-unix/X{}".format(DISPLAY.lstrip(":"))
        if not os.path.exists(socket):
            watchdog = (
                f"Xvfb {DISPLAY} -screen 0 1280x1024x24 -nolisten tcp >/dev/null 2>&1 & x=$!; "
                f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; kill $x"
            )
            subprocess.Popen(
                ["sh", "-c", watchdog],
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            t0 = time.time()
            while not os.path.exists(socket) and time.time() - t0 < 10:
                time.sleep(0.1)
        display = DISPLAY if os.path.exists(socket) else None
    _started["display"] = display
    return display
