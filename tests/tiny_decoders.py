"""A tiny Llama decoder with its own small tokenizer, for the tests of decoders other than Qwen3.

The tokenizer is a byte-level BPE trained in a few milliseconds with `tokenizers` on caption-like text. Like
Llama's and SmolLM2's, it has no image placeholder token: ClipQwenProcessor must add one, and
`match_processor(model, processor)` must grow the vocabulary to fit it.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from clipqwen.backbones.assemble import match_processor, tower_image_processor
from clipqwen.tiny import tiny_config
from clipqwen.training.freezing import freeze_backbones
from modeling_clipqwen import ClipQwenForConditionalGeneration
from processing_clipqwen import ClipQwenProcessor


TEXTS = [
    "a red circle on the left of a white background.",
    "A dog runs on the beach.",
    "two cats on a mat.",
    "a blue square on the right.",
    "an orange triangle against a black background.",
    "A photo of a bus in the city.",
]
END = "<|endoftext|>"


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE, `<|endoftext|>` (id 0) as its only special token and EOS; no pad token, no image token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TEXTS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END)


def tiny_llama_config(vocab_size: int, tie_word_embeddings: bool = True, **overrides):
    """clipqwen's tiny preset with a Llama text tower (GQA, explicit head_dim) of `vocab_size` rows. The
    placeholder id is unknown until the processor adds its token."""
    text = dict(
        model_type="llama",
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    return tiny_config(text_config=text, image_token_id=None, **overrides)


def tiny_llama_model_and_processor(seed: int = 0, tie_word_embeddings: bool = True, **overrides):
    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)  # before the processor adds its placeholder: the model must grow by one row
    config = tiny_llama_config(vocab_size, tie_word_embeddings, **overrides)
    processor = ClipQwenProcessor(tower_image_processor(), tokenizer, num_image_tokens=config.num_image_tokens)
    torch.manual_seed(seed)
    model = ClipQwenForConditionalGeneration(config).eval()
    return freeze_backbones(match_processor(model, processor)), processor
