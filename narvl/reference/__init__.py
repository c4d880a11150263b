"""Plain-PyTorch float64 references of every narvl kernel (used by tests and benchmarks)."""
from .ctc import (  # noqa: F401
    ctc_loss_reference,
    ctc_nll_reference,
    qctc_loss_reference,
    qctc_terms_reference,
)
from .decode import (  # noqa: F401
    ArpaReference,
    beam_search_lm_reference,
    beam_search_reference,
    greedy_decode_reference,
    hotword_boost,
    labeling_logprobs_bruteforce,
)
from .attention import query_attention_reference  # noqa: F401
from .forced_align import forced_align_reference  # noqa: F401
