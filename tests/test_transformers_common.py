"""transformers' own common model and config tests (`ModelTesterMixin`, `ConfigTester`) on a tiny ClipQwen, in the
shape of transformers' tests/models/llava/test_modeling_llava.py. The mixins come from the transformers sdist of
the installed version (conftest.transformers_common_tests), never from a copy in this repository.

`GenerationTesterMixin` lives in tests/generation/test_utils.py, which the sdist does not ship: its generate tests
cannot run from it (test_modeling.py checks generation — KV cache against a naive loop, batched against one by one,
beam search, static cache — on the real tokenizer instead).
"""

import unittest

import torch

from configuration_clipqwen import ClipQwenConfig
from modeling_clipqwen import ClipQwenForConditionalGeneration, ClipQwenModel

from conftest import transformers_common_tests


test_modeling_common, test_configuration_common = transformers_common_tests()
ModelTesterMixin, floats_tensor, ids_tensor = (
    test_modeling_common.ModelTesterMixin,
    test_modeling_common.floats_tensor,
    test_modeling_common.ids_tensor,
)
ConfigTester = test_configuration_common.ConfigTester
# The training tests skip the base models transformers knows by name (LlavaModel, ...): ClipQwenModel is this one.
test_modeling_common.MODEL_MAPPING_NAMES.setdefault("clipqwen", "ClipQwenModel")


# LLaVA's tester sizes: a Qwen3 decoder (grouped-query attention, explicit head_dim) and a CLIP tower, both tiny
TEXT_CONFIG = {
    "model_type": "qwen3",
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
VISION_CONFIG = {
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 32,
    "projection_dim": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "initializer_range": 0.02,
}


class ClipQwenModelTester:
    def __init__(
        self,
        parent,
        batch_size=3,
        seq_length=7,
        image_token_id=3,
        num_pooled_image_tokens=2,
        text_config=None,
        vision_config=None,
        is_training=True,
        **layout,
    ):
        text_config = dict(TEXT_CONFIG if text_config is None else text_config)
        vision_config = dict(VISION_CONFIG if vision_config is None else vision_config)
        self.parent = parent
        self.batch_size = batch_size
        self.image_token_id = image_token_id
        self.num_pooled_image_tokens = num_pooled_image_tokens
        self.text_config = text_config
        self.vision_config = vision_config
        self.is_training = is_training
        self.pad_token_id = text_config["pad_token_id"]
        self.vocab_size = text_config["vocab_size"]
        self.hidden_size = text_config["hidden_size"]
        self.num_hidden_layers = text_config["num_hidden_layers"]
        self.num_attention_heads = text_config["num_attention_heads"]
        self.layout = layout
        self.num_image_tokens = self.get_config().num_image_tokens
        self.seq_length = seq_length + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self):
        return ClipQwenConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=self.image_token_id,
            num_pooled_image_tokens=self.num_pooled_image_tokens,
            **self.layout,
        )

    def prepare_config_and_inputs(self):
        size = self.vision_config["image_size"]
        pixel_values = floats_tensor([self.batch_size, self.vision_config["num_channels"], size, size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 4) + 4  # no special ids
        input_ids[:, : self.num_image_tokens] = self.image_token_id  # the processor's layout: the image first
        attention_mask = torch.ones_like(input_ids)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class ClipQwenForConditionalGenerationModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ClipQwenModel, ClipQwenForConditionalGeneration)
    _is_composite = True

    def setUp(self):
        self.model_tester = ClipQwenModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=ClipQwenConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "vision_feature_layer", "num_image_tokens"],
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        # transformers adds labels for the image-text-to-text classes it knows by name (LLaVA's); ClipQwen's are
        # the same: the text itself, nothing supervised at the image positions.
        if return_labels:
            labels = inputs_dict["input_ids"].clone()
            labels[labels == self.model_tester.image_token_id] = -100
            inputs_dict["labels"] = labels
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_mismatching_num_image_tokens(self):
        """LLaVA's check: fewer images than placeholder groups is an error that says so, not a silent misalignment."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ClipQwenForConditionalGeneration(config).eval()
        with torch.no_grad():
            model(**inputs)
            with self.assertRaisesRegex(ValueError, "image placeholder tokens"):
                model(**{**inputs, "pixel_values": inputs["pixel_values"][-1:]})

    @unittest.skip(
        "GenerationTesterMixin (transformers' tests/generation/test_utils.py) is not in the transformers sdist, so "
        "this tester cannot inherit it; test_modeling.py covers generate() instead."
    )
    def test_generation_tester_mixin_inheritance(self):
        pass


class ClipQwenResamplerModelTest(ClipQwenForConditionalGenerationModelTest):
    """The same common tests with the resampler projector over CLIP's patch states."""

    def setUp(self):
        super().setUp()
        self.model_tester = ClipQwenModelTester(
            self, projector_type="resampler", vision_feature_type="patch", num_query_tokens=3
        )

    # The mixin's gradient-checkpointing tests unfreeze every parameter and expect each to get a gradient. A
    # feature map read at vision_feature_layer leaves CLIP's later layers, its post-layernorm and its projection
    # unused, by design; the pooled layout runs these tests above, through the same checkpointing machinery.
    _unused_by_design = "a feature map leaves CLIP's later layers, post-layernorm and projection without gradients"

    @unittest.skip(_unused_by_design)
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(_unused_by_design)
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(_unused_by_design)
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass


class ClipQwenGridModelTest(ClipQwenResamplerModelTest):
    """The same common tests with the grid features (CLS + 2×2 cells of CLIP's patch states) and the MLP."""

    def setUp(self):
        super().setUp()
        self.model_tester = ClipQwenModelTester(self, vision_feature_type="grid", num_pooled_image_tokens=2)
