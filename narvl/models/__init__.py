"""NARVL network and its autoregressive baseline (``NARVLConfig`` presets tiny..huge)."""
from .ar import ARBaseline
from .config import PRESETS, TASK_QUERIES, NARVLConfig
from .encoder import Encoder
from .inference import prepare_for_inference, time_generate
from .narvl import NARVL
from .peft import enable_peft, trainable_fraction
from .resnet import ResNetStages

__all__ = ["NARVL", "ARBaseline", "NARVLConfig", "PRESETS", "TASK_QUERIES", "Encoder",
           "ResNetStages", "enable_peft", "trainable_fraction", "prepare_for_inference",
           "time_generate"]
