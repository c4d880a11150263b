"""Drop-ins for parlance/ctcdecode: ``CTCBeamDecoder``, ``OnlineCTCBeamDecoder`` and
``DecoderState``, with KenLM/ARPA language models (ctcdecode's semantics), hotword boosts
(pyctcdecode's) and streaming.

Without a language model or hotwords, ``CTCBeamDecoder.decode`` runs
``narvl.ctc_prefix_beam_search`` (any device: C++ on CPU, Triton on CUDA). With one, and for
every streaming call, the native CPU decoder ``narvl._C.BeamDecoder`` runs the same search
(csrc/beam_search.h) with the model's factors.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

from . import _backend
from .lm import ArpaLanguageModel, LanguageModel, load_language_model
from .ops.decode import (_beam_search, _check_int, _check_scores, _lengths, _run_checked, gpu_search_fits,
                         input_kind)

DEFAULT_HOTWORD_WEIGHT = 10.0  # pyctcdecode's


def _native_checked(probs, fn):
    """Runs a native decoder call on CPU ``probs``: the C++ row scan reports NaN, which
    ``_run_checked`` turns into a ValueError naming ``probs``."""
    return _run_checked("probs", fn)


def ctcdecode_cutoff_mass(cutoff_prob: float) -> float:
    """The total probability at which a frame's candidate list stops, for ctcdecode's
    ``cutoff_prob`` as its code applies it (``get_pruned_log_probs``): labels are taken, most
    probable first, until log(1 + their total probability) reaches ``cutoff_prob``, i.e. until
    the total reaches e^cutoff_prob - 1. So 0 keeps one label per frame, 0.5 stops at a total
    of 0.649, and any value of log 2 (0.693) or more prunes nothing, 0.9 and 0.99 included
    (ctcdecode's documentation reads it as the total itself; its code, and so this drop-in,
    do not). ``narvl.ctc_prefix_beam_search``'s ``cutoff_prob`` is the total itself."""
    return min(math.expm1(cutoff_prob), 1.0)


class CTCBeamDecoder:
    """Drop-in for ctcdecode's ``CTCBeamDecoder``.

    ``decode(probs, seq_lens=None)`` -> (beam_results int32 (B, beam, T), beam_scores float32
    (B, beam), timesteps int32 (B, beam, T), out_lens int32 (B, beam)); read a result as
    ``beam_results[b, k, :out_lens[b, k]]``. ``probs`` (B, T, V) are probabilities unless
    ``log_probs_input``; the result comes back on the CPU, as ctcdecode's does.
    ``num_processes`` sets the CPU threads.

    Pruning and input as ctcdecode's code: ``cutoff_prob`` stops a frame's candidates where
    log(1 + their total probability) reaches it (``ctcdecode_cutoff_mass``: 1.0, 0.99 and 0.9
    prune nothing), and probabilities are read as log(p + FLT_MIN), so a zero probability is a
    very unlikely label rather than an impossible one.

    Scores: without a language model, the negative log-probability of the labeling summed over
    the alignments the beam kept (lower is better). With one, ctcdecode's "approximate CTC"
    score: the search's score with the language-model, word-insertion and hotword terms taken
    out again (the ranking used them).

    Language model (``model_path``: a KenLM binary, recognised by its magic bytes, through the
    ``kenlm`` package with ``unigrams``; any other file is an ARPA file, plain or gzipped, loaded
    natively, and one that does not parse raises ``ValueError`` naming the line; or
    ``language_model=`` any ``narvl.LanguageModel``), as ctcdecode:

    - word-based models (words longer than one character) score each word when the space label
      (``" "``) ends it: ``alpha * ln P(word | previous words) + beta``; hypotheses are
      restricted to the model's words (a lexicon over the labels); the last, unfinished word is
      scored at the end (an incomplete word counts as out of vocabulary, ln P = -1000);
    - character-based models score every label;
    - once the beam is full, an extension whose score is below the worst prefix's blank
      extension by more than ``max(0, beta)`` is not taken (ctcdecode's pruning).

    Hotwords (``hotwords``, a list of words or phrases; ``hotword_weight``), as pyctcdecode: a
    hypothesis gains ``hotword_weight`` (natural log) per completed word that is one of the
    hotwords' words, and ``hotword_weight * len(partial) / len(shortest hotword it begins)`` for
    a word in progress.
    """

    def __init__(self, labels, model_path=None, alpha=0, beta=0, cutoff_top_n=40, cutoff_prob=1.0,
                 beam_width=100, num_processes=4, blank_id=0, log_probs_input=False, *,
                 language_model=None, unigrams=None, hotwords=None,
                 hotword_weight=DEFAULT_HOTWORD_WEIGHT):
        self._labels = list(labels)
        if not self._labels:
            raise ValueError("labels must not be empty")
        if not all(isinstance(lab, str) for lab in self._labels):
            raise TypeError("labels must be strings")
        _check_int(blank_id, "blank_id", 0, len(self._labels))
        _check_int(beam_width, "beam_width", 1)
        _check_int(cutoff_top_n, "cutoff_top_n", 1)
        _check_int(num_processes, "num_processes", 1)
        if isinstance(cutoff_prob, (bool, str, bytes)) or not isinstance(cutoff_prob, numbers.Real):
            raise TypeError(f"cutoff_prob must be a real number, got {type(cutoff_prob).__name__}")
        if not float(cutoff_prob) >= 0.0:  # NaN fails too
            raise ValueError(f"cutoff_prob must be >= 0, got {cutoff_prob!r}")
        for name, v in (("alpha", alpha), ("beta", beta), ("hotword_weight", hotword_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        self._beam_width, self._blank = beam_width, blank_id
        self._cutoff_top_n, self._cutoff_prob = cutoff_top_n, float(cutoff_prob)
        self._cutoff_mass = ctcdecode_cutoff_mass(self._cutoff_prob)
        self._num_processes, self._log_probs_input = num_processes, bool(log_probs_input)
        self._alpha, self._beta = float(alpha), float(beta)
        if model_path is not None and language_model is not None:
            raise ValueError("give model_path or language_model, not both")
        if model_path is not None:
            if not isinstance(model_path, (str, bytes, os.PathLike)):
                raise TypeError(f"model_path must be a path, got {type(model_path).__name__}")
            if isinstance(model_path, bytes):
                model_path = model_path.decode()
            language_model = load_language_model(model_path, unigrams)
        if language_model is not None and not isinstance(language_model, LanguageModel):
            raise TypeError("language_model must be a narvl.LanguageModel")
        self._lm = language_model
        if hotwords is None:
            hotwords = []
        elif isinstance(hotwords, str):
            raise TypeError("hotwords must be a list of strings, not one string")
        words = [w for phrase in hotwords for w in str(phrase).split()]
        self._hotwords, self._hotword_weight = words, float(hotword_weight)
        self._native = None
        if self._lm is not None or self._hotwords:
            self._native_decoder()  # builds the lexicon now; errors surface here

    def _native_decoder(self):
        if self._native is None:
            native = _backend.native_module("Language models, hotwords and streaming decoding")
            lm = self._lm.native if isinstance(self._lm, ArpaLanguageModel) else self._lm
            try:
                self._native = native.BeamDecoder(
                    self._labels, self._blank, self._beam_width, self._cutoff_top_n,
                    self._cutoff_mass, input_kind(None, self._log_probs_input), lm, self._alpha,
                    self._beta, self._hotwords, self._hotword_weight)
            except ValueError as exc:
                raise ValueError(f"CTCBeamDecoder: {exc}") from None
        return self._native

    def _check_probs(self, probs):
        if not isinstance(probs, torch.Tensor):
            raise TypeError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
        if probs.dim() != 3:
            raise ValueError(f"probs must be 3-D (batch, time, vocabulary), got {tuple(probs.shape)}")
        if probs.shape[2] != len(self._labels):
            raise ValueError(f"probs has a vocabulary of {probs.shape[2]} but labels has "
                             f"{len(self._labels)} entries")
        return _check_scores(probs, "probs")

    @staticmethod
    def _ctcdecode_format(tokens, lengths, scores, steps):
        # 0 - s, not -s: an empty hypothesis scores 0.0, not -0.0
        return (tokens.clamp_min(0).to(torch.int32).cpu(), (0.0 - scores).float().cpu(),
                steps.clamp_min(0).to(torch.int32).cpu(), lengths.to(torch.int32).cpu())

    def decode(self, probs, seq_lens=None):
        B, T, _ = self._check_probs(probs)
        if self._native is None and probs.device.type == "cuda" and not gpu_search_fits(probs.device, self._beam_width):
            probs = probs.cpu()  # widths above the GPU kernel's (128) run on the CPU search
            seq_lens = seq_lens.cpu() if isinstance(seq_lens, torch.Tensor) else seq_lens
        if self._native is None:
            res = _beam_search(probs, seq_lens, self._beam_width, self._blank, self._cutoff_top_n,
                               self._cutoff_mass, self._beam_width, input_kind(None, self._log_probs_input),
                               self._num_processes, names=("probs", "seq_lens"))
            return self._ctcdecode_format(res.tokens, res.lengths, res.scores, res.timesteps)
        probs = probs.detach().cpu()
        lengths = _lengths(seq_lens, "seq_lens", B, T, probs.device)
        out = _native_checked(probs, lambda: self._native.decode(probs, lengths, self._beam_width,
                                                                 self._num_processes))
        tokens, lens, scores, steps = out
        return self._ctcdecode_format(tokens, lens, scores, steps)

    def character_based(self):
        return bool(self._native.character_based()) if self._lm is not None else None

    def max_order(self):
        return int(self._native.max_order()) if self._lm is not None else None

    def dict_size(self):
        return int(self._native.dict_size()) if self._lm is not None else None

    def reset_params(self, alpha, beta):
        """New ``alpha`` / ``beta`` for later searches (prefixes already scored keep theirs)."""
        for name, v in (("alpha", alpha), ("beta", beta)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        self._alpha, self._beta = float(alpha), float(beta)
        if self._native is not None:
            self._native.reset_params(self._alpha, self._beta)


class OnlineCTCBeamDecoder(CTCBeamDecoder):
    """Drop-in for ctcdecode's ``OnlineCTCBeamDecoder``: the search runs chunk by chunk, each
    stream keeping its own ``DecoderState``; any chunking gives exactly the one-shot result.

    ``decode(probs, states, is_eos_s, seq_lens=None)`` takes a chunk (B, T, V) (``seq_lens[b]``
    valid frames of it), one state and one end-of-stream flag per stream, and returns the four
    tensors of ``CTCBeamDecoder.decode``, over all frames seen so far. For a stream whose
    ``is_eos`` is true they are its final result; for the others, the best hypotheses so far
    (ctcdecode returns nothing for those). Streams are independent: each can be at its own
    position. Runs on the CPU (``narvl._C``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._native_decoder()

    def decode(self, probs, states, is_eos_s, seq_lens=None):
        B, T, _ = self._check_probs(probs)
        states, is_eos_s = list(states), list(is_eos_s)
        if len(states) != B or len(is_eos_s) != B:
            raise ValueError(f"states and is_eos_s need one entry per stream ({B}), got "
                             f"{len(states)} and {len(is_eos_s)}")
        native_states = []
        for i, s in enumerate(states):
            if not isinstance(s, DecoderState):
                raise TypeError(f"states[{i}] must be a narvl.DecoderState, got {type(s).__name__}")
            if s.decoder is not self:
                raise ValueError(f"states[{i}] belongs to another decoder")
            native_states.append(s.state)
        probs = probs.detach().cpu()
        lengths = _lengths(seq_lens, "seq_lens", B, T, probs.device)
        out = _native_checked(
            probs, lambda: self._native.decode_chunk(probs, lengths, native_states,
                                                     [bool(e) for e in is_eos_s], self._beam_width,
                                                     self._num_processes))
        return self._ctcdecode_format(*out)

    def reset_state(self, state):
        """A fresh state for the stream ``state`` served (ctcdecode's reset_state)."""
        if not isinstance(state, DecoderState) or state.decoder is not self:
            raise ValueError("state must be a DecoderState of this decoder")
        state.state = self._native.new_state()


class DecoderState:
    """The search state of one stream of an ``OnlineCTCBeamDecoder`` (ctcdecode's contract).
    ``frames``: frames consumed so far."""

    def __init__(self, decoder):
        if not isinstance(decoder, OnlineCTCBeamDecoder):
            raise TypeError("DecoderState needs an OnlineCTCBeamDecoder")
        self.decoder = decoder
        self.state = decoder._native_decoder().new_state()

    @property
    def frames(self):
        return int(self.state.frames)
