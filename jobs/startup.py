"""The `featmap extract` process's start: what loading its modules makes is not collected while
it loads.

Loading a job's modules (pydantic's models, onnx, numpy, the spec) makes some 80,000 objects
that live as long as the process, and the collector walks them again and again while they are
made: on 2 cores, a 10,000-row .npy job spent 38-52 ms in collections (117 young, 11 middle,
1 full), a 70,000-row one 48 ms. The console script pauses collections before the command
runs; the job resumes them, with what was loaded frozen out of every later collection
(gc.freeze, as the gc docs advise for long-lived startup state), once it is about to run:
1.5-2 ms (23 young, 1 middle) and 9 ms. The few hundred objects of garbage that loading leaves
(324 measured; 379 for an int8 job, which quantizes before it runs) are frozen with the rest.
Other commands resume at once. A caller of featmap.jobs.cli.main in its own process (a test, a
notebook) never pauses: resume does nothing for it.
"""

from __future__ import annotations

import gc

_paused = False


def pause_collections() -> None:
    """Pause collections until resume_collections (the console script, before the command)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_collections() -> None:
    """Freeze what was loaded out of later collections and resume them, if paused here."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
