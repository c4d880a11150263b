"""narvl: fast kernels and models for NARVL, the non-autoregressive vision-language model.

Public API: ``narvl.ctc_loss`` (drop-in for F.ctc_loss), ``narvl.qctc_loss`` (fused
log-softmax + Q-CTC on decoder logits), ``narvl.ctc_forced_align`` (batched drop-in for
torchaudio's forced_align), ``narvl.nn`` modules, ``narvl.models`` (NARVL and its
autoregressive baseline), ``narvl.data`` (the embedded shapes tasks, loaders, tokenizer,
metrics). The backend is chosen per call by ``NARVL_BACKEND`` (see ``narvl._backend``).
``narvl.reference`` (import it explicitly) holds the plain-PyTorch float64 references that the
tests use as oracles.
"""
from . import _backend
from ._backend import native_available
from .ops.ctc import ctc_loss, ctc_min_frames, qctc_loss
from .ops.attention import query_attention
from .ops.decode import BeamSearchResult, ctc_greedy_decode, ctc_prefix_beam_search
from .ops.forced_align import ctc_forced_align
from .decoder import CTCBeamDecoder, DecoderState, OnlineCTCBeamDecoder
from .lm import ArpaLanguageModel, KenLMLanguageModel, LanguageModel, load_language_model
from . import models, nn  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ctc_loss", "ctc_min_frames", "qctc_loss", "query_attention", "ctc_greedy_decode", "ctc_prefix_beam_search",
           "ctc_forced_align",
           "CTCBeamDecoder", "OnlineCTCBeamDecoder", "DecoderState", "LanguageModel",
           "ArpaLanguageModel", "KenLMLanguageModel", "load_language_model", "BeamSearchResult", "models", "nn", "native_available"]
