"""torch.library registrations (fake, autograd, per-device kernels) and functional APIs."""
from .ctc import ctc_loss, qctc_loss  # noqa: F401
