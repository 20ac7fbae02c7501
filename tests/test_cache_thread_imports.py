"""The latent writers' threads never import a lazily loaded module for the first time at once.

safetensors' ``save_file`` reaches ``numpy.ctypeslib`` through numpy's lazy ``__getattr__``. A thread that
asks for it while another thread's first import of it sits between "initialised" and "set on numpy" sees
the submodule in ``sys.modules``, finds no attribute, re-enters ``__getattr__`` and ends in
RecursionError: seen as an intermittent exit 1 of warm. The window is a few bytecodes, so chance alone
rarely hits it; here a trace hook holds the importing thread in that window for as long as it takes, in a
cold interpreter that has imported what warm imports before its writer pools start.
"""

import subprocess
import sys

SCRIPT = """
import sys, threading
import {preload}
import numpy as np

in_window = threading.Event()


def hold_in_window(frame, event, arg):
    if frame.f_code.co_name != "_find_and_load_unlocked" or frame.f_locals.get("name") != "numpy.ctypeslib":
        return None

    def line(frame, event, arg):
        # The module is loaded and about to be set on numpy: let the other thread ask for it now.
        if event == "line" and "module" in frame.f_locals and not in_window.is_set():
            in_window.set()
            done.wait(10)
        return line

    return line


done = threading.Event()
outcome = []


def first_importer():
    sys.settrace(hold_in_window)
    np.ctypeslib


def writer():
    in_window.wait(2)  # never set when numpy.ctypeslib was imported before the threads started
    try:
        np.ctypeslib
        outcome.append("ok")
    except RecursionError:
        outcome.append("RecursionError")
    done.set()


threads = [threading.Thread(target=writer), threading.Thread(target=first_importer)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(outcome[0])
"""


def _race(preload: str) -> str:
    code = SCRIPT.format(preload=preload)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout


def test_the_race_is_real_without_the_early_import() -> None:
    assert _race("torch, safetensors.torch").strip() == "RecursionError"


def test_warm_imports_numpy_ctypeslib_before_its_writer_threads_start() -> None:
    assert _race("job.cache.fill").strip() == "ok"
