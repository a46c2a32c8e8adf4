"""Real English text that every machine with Python has: the standard library's docstrings.

A document is one standard-library module's documentation: the docstrings of the module, its
classes and its functions, in source order, read from the module's source file with ``ast``
(nothing is imported or executed, so no repr, memory address, file path or platform detail enters
the text), joined by blank lines. Tokenized with the model's tokenizer, its first 2 (N - 2)
tokens make two halves of N tokens each with [CLS] and [SEP]:

    document = [CLS] t_0 .. t_{N-3} [SEP]            the "first half" (N tokens)
               [CLS] t_{N-2} .. t_{2N-5} [SEP]       the "second half" (N tokens)

Modules are taken in the order of :data:`MODULES`, skipping those whose source is absent or whose
docstrings are shorter than 2 (N - 2) tokens, until ``count`` documents are found; the names and a
digest of the token ids are recorded with every report. The text is a function of the Python
version's standard library: the same on every machine with the same Python (3.11 for the committed
report); another version may change a few docstrings, or a module, and so the digest.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Standard-library modules with long docstrings (each over 1,900 tokens under Python 3.11),
# pure Python on CPython 3.11-3.13, none that needs an optional system library to exist.
MODULES = (
    "argparse",
    "bdb",
    "collections",
    "configparser",
    "difflib",
    "doctest",
    "email.message",
    "enum",
    "ftplib",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "optparse",
    "pdb",
    "pickletools",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "ssl",
    "statistics",
    "subprocess",
    "tarfile",
    "threading",
    "traceback",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
)


def docstring_text(module: str) -> str | None:
    """The docstrings of ``module``'s source (module, then every class and function in source
    order), cleaned by ``inspect.cleandoc`` and joined by blank lines; None when the module has
    no Python source file here."""
    try:
        spec = importlib.util.find_spec(module)
    except ImportError:
        return None
    origin = getattr(spec, "origin", None)
    if origin is None or not origin.endswith(".py") or not Path(origin).is_file():
        return None
    tree = ast.parse(Path(origin).read_text(encoding="utf-8"))
    nodes = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    nodes.sort(key=lambda node: getattr(node, "lineno", 0))  # ast.walk is breadth-first
    docs = (ast.get_docstring(node, clean=True) for node in nodes)
    return "\n\n".join(doc for doc in docs if doc)


@dataclass(frozen=True)
class Corpus:
    """``count`` documents as token ids, each split into two halves of N tokens."""

    modules: tuple[str, ...]  # the module each document comes from
    first: Tensor  # (count, N) int64: [CLS] + the first N - 2 tokens + [SEP]
    second: Tensor  # (count, N) int64: [CLS] + the next N - 2 tokens + [SEP]
    digest: str  # sha256 of the module names and token ids: the text as the model sees it
    python: str  # the Python version whose standard library it was read from

    @property
    def seq_len(self) -> int:
        return self.first.shape[1]

    def __len__(self) -> int:
        return self.first.shape[0]


def load_corpus(tokenizer: Any, count: int, seq_len: int = 512) -> Corpus:
    """The first ``count`` usable documents of :data:`MODULES`, halves of ``seq_len`` tokens.

    tokenizer: a transformers tokenizer with cls_token_id and sep_token_id (the model's own).
    Raises ValueError when fewer than ``count`` modules are long enough here.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count: expected a positive int, got {count!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 4:
        raise ValueError(f"seq_len: expected an int >= 4, got {seq_len!r}")
    body = seq_len - 2
    modules, halves = [], []
    for module in MODULES:
        text = docstring_text(module)
        if text is None:
            continue
        # WordPiece splits on whitespace first, so a prefix of the text gives a prefix of its
        # tokens; 16 characters a token is far more than English text needs.
        ids = tokenizer(text[: 32 * body], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < 2 * body:
            continue
        cls, sep = [tokenizer.cls_token_id], [tokenizer.sep_token_id]
        halves.append([cls + ids[i * body : (i + 1) * body] + sep for i in (0, 1)])
        modules.append(module)
        if len(modules) == count:
            break
    if len(modules) < count:
        raise ValueError(
            f"count: expected at most {len(modules)} documents of 2 x {seq_len} tokens (the "
            f"standard-library modules here with docstrings that long), got {count}"
        )
    ids = torch.tensor(halves, dtype=torch.int64)  # (count, 2, N)
    digest = hashlib.sha256("\n".join(modules).encode())
    digest.update(ids.numpy().astype("<i8").tobytes())
    return Corpus(
        modules=tuple(modules),
        first=ids[:, 0].contiguous(),  # (count, 2, N) -> (count, N)
        second=ids[:, 1].contiguous(),
        digest=digest.hexdigest(),
        python=".".join(map(str, sys.version_info[:3])),
    )
