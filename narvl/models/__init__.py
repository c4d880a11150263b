"""NARVL network and its autoregressive baseline, OFA-exact (``NARVLConfig`` presets tiny..huge;
``from_ofa`` loads OFA and NARVL checkpoints); ``EPALM``, eP-ALM on a Hugging Face OPT and ViT
(``narvl.models.epalm``, imported on first access so that transformers is only needed then)."""
from .ar import ARBaseline
from .config import PRESETS, TASK_QUERIES, NARVLConfig
from .encoder import Encoder
from .export import export_onnx
from .inference import prepare_for_inference, time_generate
from .narvl import NARVL
from .ofa_import import from_ofa, safe_load
from .peft import enable_peft, trainable_fraction
from .resnet import ResNetStages

__all__ = ["NARVL", "ARBaseline", "NARVLConfig", "PRESETS", "TASK_QUERIES", "Encoder",
           "ResNetStages", "enable_peft", "trainable_fraction", "prepare_for_inference",
           "time_generate", "from_ofa", "safe_load", "export_onnx", "EPALM"]


def __getattr__(name):
    # EPALM needs transformers: imported on first use, not with narvl.models
    if name == "EPALM":
        from .epalm import EPALM
        return EPALM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
