"""Decoding on a CPU at the memory bus's pace: the decoder's linear layers with their weights prepacked for oneDNN.

At batch 1 a decoding step reads every decoder weight once, so its time is the weights' bytes over the rate the
matrix kernel reads them. Given a plain row-major weight, `F.linear` on a CPU reads it at about half the bus's rate
(one thread, Qwen3-0.6B's shapes: bf16 10 GB/s, against 28 GB/s for a plain sum); the same product against a weight
reordered once into oneDNN's blocked layout reads it at 17 GB/s, and gives the same bf16 results bit for bit
(docs/benchmarks.md). That reorder is what Inductor's freezing pass does before it calls oneDNN's linear
(`torch.ops.mkldnn`); here it is done once at load, without compiling anything.

Inference on the CPU only: a packed layer has no trainable `weight` and cannot move to a GPU (its state dict still
holds the plain weight, so a packed model saves and loads as before).
"""

import ctypes

import torch
from torch import nn

from clipqwen.precision import cpu_has_native_bf16


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward with the weight in oneDNN's layout for this CPU (a buffer, not a parameter: inference
    only). Its state dict holds the plain `weight`, as nn.Linear's does."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", pack(linear.weight), persistent=False)
        self.bias = linear.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.packed_weight.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "weight" in state_dict:
            self.packed_weight = pack(state_dict.pop(prefix + "weight").to(self.packed_weight.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.compiler.disable  # Inductor cannot lower this op on a weight it did not pack itself: run it eagerly
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered for oneDNN's linear at one row of input (a decoding step); any other row count runs too."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packing_problem(model: nn.Module) -> str | None:
    """Why the decoder's linears of `model` cannot be packed here (None: they can)."""
    decoder = model.get_decoder()
    parameter = next(decoder.parameters())
    if parameter.device.type != "cpu":
        return f"the model is on {parameter.device.type}"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN linear"
    if parameter.dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return "bf16 is emulated on this CPU"  # oneDNN's bf16 kernels are for CPUs that compute it
    if parameter.dtype not in (torch.float32, torch.bfloat16):
        return f"its weights are {parameter.dtype}"
    return None


def pack_decoder_linears(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of the decoder by a PackedLinear where `packing_problem` finds none: what runs once
    per new token. The image tower and projector run once per image and stay as they are; so do int8 layers
    (optimum-quanto's are not `nn.Linear` exactly). The LM head is packed only if it has its own weight: a head tied
    to the input embeddings (Qwen3-0.6B's, SmolLM2's) would need a second copy, +0.3 GB in bf16 for Qwen3, for about
    5 ms a token (docs/benchmarks.md). Returns the model."""
    if packing_problem(model) is not None:
        return model
    for module in list(model.get_decoder().modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight is not model.get_input_embeddings().weight:
        model.set_output_embeddings(PackedLinear(head))
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Hand the plain weights' freed pages back to the system. glibc's malloc keeps freed heap pages in the process
    (the weights of a few MB each are heap chunks), so without this the process holds both copies: Qwen3-0.6B's
    decoder packed in bf16 took 2.50 GB of memory against 1.67 before, and 1.68 after this. No-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        pass


def decoding_path(model: nn.Module) -> str:
    """What a new token's matrix products run on, in a few words, for the front doors to tell the user:
    "bf16", "fp32, decoder weights prepacked for oneDNN", "int8 (weight-only decoder, optimum-quanto)"."""
    modules = [*model.get_decoder().modules(), model.get_output_embeddings()]
    if any(type(module).__module__.startswith("optimum.quanto") for module in modules):
        return "int8 (weight-only decoder, optimum-quanto)"
    dtype = model.get_input_embeddings().weight.dtype
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).removeprefix("torch."))
    packed = any(isinstance(module, PackedLinear) for module in modules)
    return name + ", decoder weights prepacked for oneDNN" * packed
