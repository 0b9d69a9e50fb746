"""The models layer: HF configs, safetensors, weight names, synthetic weights, tokenizers.

>>> from nexusrt.models import load_model
>>> model = load_model("nexusrt:stdlib-tiny")  # shipped; or synthetic:tiny, or a checkpoint directory
>>> model.config.hidden_size, model.weights.load("layers.0.q").shape
"""

from .architectures import ARCHITECTURES
from .config import ModelConfig, load_config
from .loader import GenerationDefaults, LoadedModel, load_model
from .presets import PRESETS
from .weights import TensorSpec, WeightSource, tensor_specs

__all__ = ["ARCHITECTURES", "ModelConfig", "load_config", "GenerationDefaults", "LoadedModel",
           "load_model", "PRESETS", "TensorSpec", "WeightSource", "tensor_specs"]
