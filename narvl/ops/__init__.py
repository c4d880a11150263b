"""torch.library registrations (fake, autograd, per-device kernels) and functional APIs."""
from . import checks  # noqa: F401  (registers narvl::assert_in_range)
from .ctc import ctc_loss, qctc_loss  # noqa: F401
from .decode import ctc_greedy_decode, ctc_prefix_beam_search  # noqa: F401
from .forced_align import ctc_forced_align  # noqa: F401
