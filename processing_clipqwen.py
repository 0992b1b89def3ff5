"""ClipQwenProcessor: CLIP image preprocessing + the decoder's tokenizer (Qwen3's by default), laid out the way
the model reads them.

Sequence layout (one image per sequence):
    training:   <|image_pad|> × N   [prompt]   caption   <|endoftext|>     right-padded
    inference:  <|image_pad|> × N   [prompt]                                left-padded, for generate()
Labels are built from lengths, never by masking pad ids: in Qwen3-Base pad == EOS == <|endoftext|>, and
masking every pad id would hide the one EOS the model must learn to stop on (the course project's bug).

A tokenizer without the placeholder token (Llama's, SmolLM2's) gets it added as a special token; the model then
needs `model.match_processor(processor)` (one more embedding row, the placeholder id, generation settings).
"""

import logging

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AddedToken, BatchFeature, ProcessorMixin

logger = logging.getLogger(__name__)


# Chat-style calls (the image-text-to-text pipeline with messages) render to exactly the layout the model is
# trained on: the image placeholder, then any text. Without it, the tokenizer's Qwen chat template would wrap
# prompts in <|im_start|> markup the captioner never saw.
def caption_chat_template(image_token: str = "<|image_pad|>") -> str:
    return (
        "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_token +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    )


CAPTION_CHAT_TEMPLATE = caption_chat_template()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → an 8-bit RGB image that looks like the original.

    Pillow's own `convert("RGB")` clips 16-bit and float images (a 16-bit photo comes out white), paints
    transparent pixels black, and ignores the EXIF orientation that phone photos rely on.
    """
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a corrupt EXIF block must not lose the picture; keep the stored orientation
        pass
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and pixels.size and pixels.max() <= 1.0:
            pixels = pixels * 255.0  # float images in [0, 1]
        elif image.mode.startswith("I;16") or (pixels.size and pixels.max() > 255):
            pixels = pixels / 257.0  # 16-bit range 0..65535 → 0..255 (I;16 always, even when the image is dark)
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("1", "L", "RGB") and image.info.get("transparency") is not None:
        image = image.convert("RGBA")  # a PNG/GIF colour key (tRNS): pixels of that value are transparent
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def bound_aspect_ratio(image: Image.Image, max_ratio: int = 4) -> Image.Image:
    """Centre-crop the long side to at most `max_ratio` × the short side. CLIP resizes the short side to 224
    and centre-crops 224×224, so the crop changes nothing the model sees, but a 1×10000 strip would otherwise
    be resized to 224×2,240,000 pixels first (gigabytes)."""
    width, height = image.size
    if max(width, height) <= max_ratio * min(width, height):
        return image
    keep_w, keep_h = min(width, max_ratio * height), min(height, max_ratio * width)
    left, top = (width - keep_w) // 2, (height - keep_h) // 2
    return image.crop((left, top, left + keep_w, top + keep_h))


class ClipQwenProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor (`CLIPImageProcessor`): CLIP preprocessing (224 px, bicubic, OpenAI mean/std).
        tokenizer: the decoder's tokenizer (the Qwen3 tokenizer by default).
        num_image_tokens (`int`, defaults to 1): placeholders per image; must equal the model config's
            `num_image_tokens` (1 for the pooled preset, 50 for CLIP-B/32 patch tokens).
        image_token (`str`, defaults to `"<|image_pad|>"`): the placeholder token. Added to the tokenizer as a
            special token when it is not one of its tokens (then call `model.match_processor(processor)`).
        caption_end_token (`str`, *optional*, defaults to `"<|endoftext|>"`): the token that ends every caption —
            what Qwen3-Base generates as EOS (its tokenizer config says `<|im_end|>`, which the base model never
            ends on). `None`: the tokenizer's EOS token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 1,
        image_token: str = "<|image_pad|>",
        caption_end_token: str | None = "<|endoftext|>",
        chat_template: str | None = CAPTION_CHAT_TEMPLATE,
        **kwargs,
    ):
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens!r} is not valid: use an integer >= 1.")
        if caption_end_token is None and tokenizer is not None:
            caption_end_token = tokenizer.eos_token
        if chat_template == CAPTION_CHAT_TEMPLATE:  # the caption layout, written with this processor's placeholder
            chat_template = caption_chat_template(image_token)
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.caption_end_token = caption_end_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.add_image_token()
        self.image_token_id = self._single_token_id(image_token, "image_token")
        self.caption_end_token_id = self._single_token_id(caption_end_token, "caption_end_token")

    def add_image_token(self) -> bool:
        """Add the placeholder to a tokenizer that lacks it, as a special token: never split, dropped by
        `skip_special_tokens` decoding, and only ever written by this processor (text that spells it stays text).
        Returns whether it was added; the model must then grow its vocabulary (`model.match_processor`)."""
        if self.image_token in self.tokenizer.get_vocab():
            return False
        self.tokenizer.add_tokens([AddedToken(self.image_token, special=True, normalized=False)], special_tokens=True)
        logger.info("Added the image placeholder %r to the tokenizer (id %d); call model.match_processor(processor) "
                    "so that the model's vocabulary and image_token_id match.", self.image_token,
                    self.tokenizer.convert_tokens_to_ids(self.image_token))
        return True

    def _single_token_id(self, token: str, name: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{name}={token!r} is not a single token of this tokenizer (got ids {ids}).")
        return ids[0]

    def _encode_text(self, text: str) -> list[int]:
        # split_special_tokens: a caption or prompt that contains "<|endoftext|>" or "<|image_pad|>" as text
        # stays text — it can neither end a caption early nor create an image position.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        captions: str | list[str] | None = None,
        max_caption_length: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Build model inputs.

        - `images` only (optionally `text`, a prompt per image): inference inputs for `generate()`,
          left-padded, no end token.
        - `images` + `captions`: training inputs with `labels` (caption tokens and one closing end token
          supervised; placeholders, prompt and padding -100), right-padded. Captions longer than
          `max_caption_length` tokens are truncated before the end token, which stays supervised.
        - `captions` without `images`: the same text inputs, for training from cached image features.
        """
        texts = [text] if isinstance(text, str) else text
        caps = [captions] if isinstance(captions, str) else captions
        pixel_values = None
        if images is not None:
            images = [images] if isinstance(images, Image.Image) or getattr(images, "ndim", 0) == 3 else list(images)
            pixel_values = self.preprocess_images(images)
        batch_size = len(images) if images is not None else len(caps if caps is not None else texts or [])
        if batch_size == 0:
            raise ValueError("ClipQwenProcessor needs images, captions or text.")
        for name, values in (("text", texts), ("captions", caps)):
            if values is not None and len(values) != batch_size:
                raise ValueError(f"Got {len(values)} {name} for a batch of {batch_size}: pass one per image.")

        sequences, label_sequences = [], []
        for i in range(batch_size):
            prompt = texts[i] if texts is not None else ""
            # A prompt may already hold the placeholder (chat templates write one): it marks where the image
            # goes; otherwise the image comes first.
            before, _, after = prompt.partition(self.image_token) if self.image_token in prompt else ("", "", prompt)
            ids = self._encode_text(before) + [self.image_token_id] * self.num_image_tokens + self._encode_text(after)
            labels = [-100] * len(ids)
            if caps is not None:
                caption_ids = self._encode_text(caps[i])
                if max_caption_length is not None:
                    caption_ids = caption_ids[: max(max_caption_length - 1, 0)]
                caption_ids = caption_ids + [self.caption_end_token_id]
                ids, labels = ids + caption_ids, labels + caption_ids
            sequences.append(ids)
            label_sequences.append(labels)

        data = self.pad(sequences, label_sequences if caps is not None else None, left=caps is None)
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data, tensor_type=return_tensors)

    def preprocess_images(self, images: list) -> torch.Tensor:
        """PIL images (any mode, any aspect ratio) or arrays → CLIP pixel_values (batch, 3, 224, 224)."""
        images = [bound_aspect_ratio(to_rgb(image)) if isinstance(image, Image.Image) else image for image in images]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def pad(self, sequences: list[list[int]], label_sequences: list[list[int]] | None = None, left: bool = False):
        """Pad token lists to the longest one (not to a fixed length) with an attention mask; labels get -100."""
        longest = max(len(ids) for ids in sequences)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.caption_end_token_id

        def padded(values, fill):
            padding = [fill] * (longest - len(values))
            return padding + values if left else values + padding

        data = {
            "input_ids": [padded(ids, pad_id) for ids in sequences],
            "attention_mask": [padded([1] * len(ids), 0) for ids in sequences],
        }
        if label_sequences is not None:
            data["labels"] = [padded(labels, -100) for labels in label_sequences]
        return data

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Decode generated ids to captions (placeholders and the end token are special and dropped)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [text.strip() for text in texts]

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.batch_decode([sequence], skip_special_tokens=skip_special_tokens, **kwargs)[0]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


ClipQwenProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["ClipQwenProcessor", "bound_aspect_ratio", "to_rgb"]
