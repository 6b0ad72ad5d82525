"""labelgw's build. The metadata is in setup.cfg; this file adds only the compiled module.

labelgw/http/linekind.py (what a repeated request adds to the access log and the metrics) is compiled with mypyc, the
mypy project's compiler of typed Python to C extensions, when a C compiler and Python's headers are there: it then
costs ~40 % of what it costs as Python (bench/callgrind.py). Without them, or with LABELGW_PURE_PYTHON=1, the
module is installed as it is and runs as Python: the same code, slower.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

COMPILED = ["labelgw/http/linekind.py"]


def compiled_extensions() -> list:
    if os.environ.get("LABELGW_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("labelgw: mypyc is not installed: labelgw/http/linekind.py stays pure Python", file=sys.stderr)
        return []
    # Not the project's mypy.ini: it loads a plugin (mypy-zope) the build environment does not have, and mypyc
    # needs only this module's own types.
    extensions = mypycify(["--config-file=", *COMPILED], opt_level="3")
    for extension in extensions:
        # No compiler or no Python.h: setuptools says so and installs the module as Python.
        extension.optional = True
    return extensions


setup(ext_modules=compiled_extensions())
