"""Fault injection for tests/test_interruptions.py: a real SIGKILL at a chosen moment of a stage.

Python imports ``sitecustomize`` at start-up from the first folder on ``sys.path`` that holds
one; the test puts this folder on ``PYTHONPATH`` of the ``dvc repro`` it starts, and DVC passes
it on to each stage's ``vae ...`` process. Nothing here is imported by the project itself.

``VAE_FAULT_KILL=<stage arguments>@<n>[:group]``, e.g. ``train@2`` or ``sweep-member frey 2 aevb 0@2:group``:
the ``vae`` process whose arguments are ``<stage arguments>`` kills itself with SIGKILL once its
``n``-th atomic write (:func:`vae.io.atomic_path`) has filled its temporary file, before the
rename: the moment when most is half done (earlier outputs in place, this one not). With
``:group`` it kills its whole process group instead, ``dvc repro`` included, as a power cut or
the OOM killer taking the session would.

``VAE_FAULT_TRACE=<file>``: every ``vae`` process appends ``<stage arguments>\\t<path>`` there
for each completed atomic write (to count a stage's writes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _install() -> None:
    kill, trace = os.environ.get("VAE_FAULT_KILL", ""), os.environ.get("VAE_FAULT_TRACE", "")
    if not (kill or trace) or os.path.basename(sys.argv[0] if sys.argv else "") != "vae":
        return
    arguments = " ".join(sys.argv[1:])
    target, _, how = kill.partition("@")
    count, _, scope = how.partition(":")
    armed = bool(kill) and target == arguments
    limit = int(count or 0)

    import vae.io

    original = vae.io.atomic_path
    writes = 0

    @contextlib.contextmanager
    def atomic_path(path):
        nonlocal writes
        with original(path) as tmp:
            yield tmp
            writes += 1
            if trace:
                with open(trace, "a", encoding="utf-8") as handle:
                    handle.write(f"{arguments}\t{path}\n")
            if armed and writes == limit:
                sys.stdout.flush()
                if scope == "group":
                    os.killpg(0, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    vae.io.atomic_path = atomic_path


_install()
