"""Language models for ``narvl.CTCBeamDecoder``: the interface, ARPA files (native C++ loader,
plain or gzipped) and KenLM binaries (through the optional ``kenlm`` package, ``narvl[kenlm]``).

A model scores a word given the previous ``order - 1`` words, in natural log. The decoder
applies it with ctcdecode's semantics (see ``narvl.CTCBeamDecoder``); words are what the labels
spell between space labels (word-based models) or single labels (character-based models, whose
vocabulary holds only single characters besides ``<s>``, ``</s>`` and ``<unk>``).
"""
from __future__ import annotations

import abc
import gzip
import math
import os

from . import _backend

_LN10 = math.log(10.0)


class LanguageModel(abc.ABC):
    """A word n-gram scorer a user can plug into ``CTCBeamDecoder(language_model=...)``.

    Attributes: ``order`` (int >= 1); ``vocabulary`` (list of words; index 0 is the unknown word,
    as KenLM's ``<unk>``; include ``<s>`` and ``</s>``); ``max_log_prob``, an upper bound of
    ``log_prob`` used to prune (default 0.0, right for normalised models without positive
    back-offs). ``log_prob(context, word)`` returns ln P(word | context), ``context`` being the
    previous ``order - 1`` words, oldest first, padded with ``<s>`` at the start of a sentence.
    The decoder caches the results and calls the model with the GIL held (on one thread).
    """

    order: int
    vocabulary: list
    max_log_prob: float = 0.0

    @abc.abstractmethod
    def log_prob(self, context: tuple, word: str) -> float:
        """ln P(word | context)."""


# KenLM's binary files start with these bytes (kpu/kenlm, lm/binary_format.cc: kMagicBeforeVersion,
# then the format version; kMagicIncomplete marks a file whose build did not finish).
KENLM_MAGIC = b"mmap lm http://kheafield.com/code format version"
KENLM_MAGIC_INCOMPLETE = b"mmap lm http://kheafield.com/code incomplete"


class LanguageModelNotFoundError(FileNotFoundError, ValueError):
    """A language model (or unigrams) path that does not exist: both a ``FileNotFoundError``
    and a ``ValueError``."""


def _check_file(path, what="language model file"):
    """ValueError unless ``path`` is an existing file (not a directory)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a {what}"
                         + (" (an ARPA file, plain or gzipped, or a KenLM binary)"
                            if what == "language model file" else ""))
    if not os.path.exists(path):
        raise LanguageModelNotFoundError(f"{what} not found: {path}")


def _opener(path, what="language model file"):
    """gzip.open for a gzipped file, else open; LanguageModelNotFoundError when it does not exist,
    ValueError when it is a directory."""
    _check_file(path, what)
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open if head == b"\x1f\x8b" else open


def _read_text(path, what="language model file"):
    opener = _opener(path, what)
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None


def is_kenlm_binary(path) -> bool:
    """Whether ``path`` starts with KenLM's binary magic bytes (``mmap lm
    http://kheafield.com/code format version``). ValueError when it is an incomplete KenLM binary
    (``build_binary`` did not finish), a directory or missing."""
    _check_file(os.fspath(path))
    try:
        with open(path, "rb") as f:
            head = f.read(len(KENLM_MAGIC))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    if head.startswith(KENLM_MAGIC_INCOMPLETE):
        raise ValueError(f"{path} is an incomplete KenLM binary (build_binary did not finish): build it again")
    return head == KENLM_MAGIC


def is_arpa(path) -> bool:
    """Whether ``path`` (plain or gzipped) looks like an ARPA text file (it has a ``\\data\\`` line
    within its first 64 KiB). ``load_language_model`` does not need it: whatever is not a KenLM
    binary is parsed as ARPA, and a malformed file raises ``ValueError`` naming the line."""
    opener = _opener(os.fspath(path))
    try:
        with opener(path, "rb") as f:
            start = f.read(65536)
    except (OSError, EOFError):
        return False
    return any(line.strip() == b"\\data\\" for line in start.splitlines())


class ArpaLanguageModel(LanguageModel):
    """An ARPA back-off model (plain or gzipped), parsed natively (no Boost, no KenLM).

    A file that does not parse raises ``ValueError`` naming the line (an empty file, or text
    without a ``\\data\\`` section: line 1); a missing file ``LanguageModelNotFoundError`` (a
    ``FileNotFoundError`` and a ``ValueError``); a directory ``ValueError``."""

    def __init__(self, path):
        native = _backend.native_module("ARPA language models")
        text = _read_text(os.fspath(path))
        try:
            self._model = native.ArpaModel(text)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        self.path = os.fspath(path)
        self.order = self._model.order
        self.vocabulary = list(self._model.vocabulary)
        self.max_log_prob = self._model.max_log_prob

    def log_prob(self, context, word):
        return self._model.log_prob(list(context), word)

    def num_ngrams(self, n):
        return self._model.num_ngrams(n)

    @property
    def native(self):
        """The C++ model the decoder scores with directly."""
        return self._model


class KenLMLanguageModel(LanguageModel):
    """A KenLM model (binary or ARPA) through the ``kenlm`` package (``pip install
    narvl[kenlm]``). KenLM's Python API cannot list a binary model's words, which the decoder
    needs for its lexicon: pass ``unigrams`` (a list of words, or a text file of
    whitespace-separated words); for an ARPA file they are read from it."""

    def __init__(self, path, unigrams=None):
        path = os.fspath(path)
        binary = is_kenlm_binary(path)
        try:
            import kenlm
        except ImportError:
            if binary:
                raise ImportError(f"{path} is a KenLM binary model: loading it needs the optional kenlm "
                                  "package (pip install 'narvl[kenlm]'), or convert it to ARPA") from None
            raise ImportError(f"loading {path} with KenLM needs the optional kenlm package (pip install "
                              "'narvl[kenlm]'); narvl.ArpaLanguageModel loads ARPA files without it") from None
        if unigrams is None:
            if binary:
                raise ValueError(f"{path}: KenLM binary models do not list their words; pass "
                                 "unigrams= (a list of words or a file of them)")
            unigrams = ArpaLanguageModel(path).vocabulary
        elif isinstance(unigrams, (str, os.PathLike)):
            unigrams = _read_text(os.fspath(unigrams), "unigrams file").split()
        words = [w for w in unigrams if w != "<unk>"]
        self._model = kenlm.Model(path)
        self._kenlm = kenlm
        self.path = path
        self.order = int(self._model.order)
        self.vocabulary = ["<unk>"] + list(dict.fromkeys(words + ["<s>", "</s>"]))

    def log_prob(self, context, word):
        kenlm, m = self._kenlm, self._model
        state, out = kenlm.State(), kenlm.State()
        m.NullContextWrite(state)
        for w in context:
            m.BaseScore(state, w, out)
            state, out = out, state
        return m.BaseScore(state, word, out) * _LN10


def load_language_model(path, unigrams=None) -> LanguageModel:
    """A KenLM binary (recognised by its magic bytes; needs the ``kenlm`` package and
    ``unigrams``) loads through KenLM; any other file is parsed natively as ARPA (plain or gzipped),
    so a malformed, empty or non-ARPA file raises ``ValueError`` naming the line. A directory
    raises ``ValueError``; a missing path ``LanguageModelNotFoundError`` (a ``FileNotFoundError``
    and a ``ValueError``)."""
    path = os.fspath(path)
    if is_kenlm_binary(path):
        return KenLMLanguageModel(path, unigrams)
    return ArpaLanguageModel(path)
