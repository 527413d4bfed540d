"""Text to calibrate or tune on that no eval task uses: the prose of the standard library's docstrings.

The eval tasks cut their haystacks and held text from ``kvsqueeze.eval.text`` (the Python Language
Reference in ``pydoc_data``, RULER's noise, word lists); a method fitted or tuned on those would be
tuned on the test. The docstrings of CPython's own modules are English prose about other things,
shipped with every Python, so calibration needs no download. They change a little between Python
versions; results record the version (``SOURCE``).
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
from pathlib import Path

from kvsqueeze.eval.text import plain_paragraphs

SOURCE = (
    f"docstrings of the Python {sys.version_info.major}.{sys.version_info.minor} standard library "
    "(kvsqueeze.calibration_text.docstring_paragraphs)"
)


@functools.cache
def docstring_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs (one line each, >= 200 characters, a sentence) of the standard library's
    docstrings, in file order. Its tests, ``pydoc_data`` (the eval tasks' prose) and installed
    packages are left out (``plain_paragraphs`` picks the prose)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "pydoc_data"}
    paragraphs = []
    for path in sorted(root.rglob("*.py")):
        if skipped & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                paragraphs.extend(plain_paragraphs(ast.get_docstring(node) or ""))
    return tuple(paragraphs)
