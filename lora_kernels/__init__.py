"""lora-kernels: NF4 quantization and fused QLoRA kernels, byte-compatible with bitsandbytes."""

from .api import dequantize_nf4, dora_linear, multi_lora_linear, qlora_linear, quantize_nf4
from .modules import QLoRALinear, adapter_state_dict, load_adapter_state_dict, replace_linear
from .integrations import (
    ModelSummary,
    from_bnb_model,
    load_model,
    load_peft_adapter,
    print_trainable_parameters,
    save_model,
    save_peft_adapter,
    summary,
    to_bnb_model,
)
from .ia3 import QIA3Linear, ia3_linear
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .nf4 import NF4Weight
from .pool import AdapterPool
from .vera import QVeRALinear
from .routes import backends, explain, get_backend, get_route, set_backend, set_route

__version__ = "0.1.0"

__all__ = [
    "AdapterPool",
    "NF4Weight",
    "multi_lora_linear",
    "QLoRALinear",
    "QVeRALinear",
    "QIA3Linear",
    "ia3_linear",
    "loraplus_param_groups",
    "create_loraplus_optimizer",
    "adapter_state_dict",
    "explain",
    "get_route",
    "load_adapter_state_dict",
    "qlora_linear",
    "dora_linear",
    "replace_linear",
    "set_route",
    "backends",
    "dequantize_nf4",
    "get_backend",
    "quantize_nf4",
    "set_backend",
    "ModelSummary",
    "from_bnb_model",
    "load_model",
    "load_peft_adapter",
    "print_trainable_parameters",
    "save_model",
    "save_peft_adapter",
    "summary",
    "to_bnb_model",
]
