"""ClipQwenProcessor: the image tower's preprocessing and the decoder's tokenizer, in the model's layout.

    training:   [prompt]  <|image_pad|> × N  [prompt]  caption  <|endoftext|>   right-padded
    inference:  [prompt]  <|image_pad|> × N  [prompt]                           left-padded

The prompt is a call's `text`, else the processor's saved `prompt`, so a trained model is prompted as
it was trained. The caption is the `suffix` (PaliGemma's name); labels come from it, never from pad
ids, because Qwen3-Base pads with the very EOS the model must learn to stop on.
"""

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AddedToken, BatchFeature, PreTrainedConfig, ProcessorMixin
from transformers.processing_utils import MultiModalData
from transformers.utils import logging


logger = logging.get_logger(__name__)


# Chat calls (the image-text-to-text pipeline, TRL) render the training layout: an image as the
# processor's `image_prompt`, an assistant turn closed by the caption end token and marked as
# generated (for `return_assistant_tokens_mask`). Qwen's own template adds <|im_start|> markup.
CAPTION_CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}{{ image_prompt }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}{{ caption_end_token }}{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}{% endif %}{% endfor %}"
)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image → an 8-bit RGB image that looks like the original.

    Unlike `convert("RGB")`, 16-bit and float images keep their range, transparency becomes white, and
    the EXIF orientation is applied. An image with nothing to convert is returned as it is, not copied.
    """
    if image.mode == "RGB" and "transparency" not in image.info and _upright(image):
        return image
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
    return image if image.mode == "RGB" else image.convert("RGB")  # RGB here is already a new image


def _upright(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) not in range(2, 9)  # EXIF Orientation 2..8: flip or rotate
    except Exception:  # a corrupt EXIF block: the stored orientation is kept, as below
        return True


def bound_aspect_ratio(image: Image.Image, max_ratio: int = 4) -> Image.Image:
    """Centre-crop the long side to at most `max_ratio` × the short side. CLIP's resize and centre crop
    see the same pixels, but a 1×10000 strip is no longer resized to 224×2,240,000 first."""
    width, height = image.size
    if max(width, height) <= max_ratio * min(width, height):
        return image
    keep_w, keep_h = min(width, max_ratio * height), min(height, max_ratio * width)
    left, top = (width - keep_w) // 2, (height - keep_h) // 2
    return image.crop((left, top, left + keep_w, top + keep_h))


# PIL filters that torch's antialiased interpolation reproduces within one level of 255.
TORCH_FILTERS = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


class ClipPixels:
    """CLIP's preprocessing (shortest-edge resize, centre crop, rescale, normalise) as the image processor does it,
    in fewer steps, whichever image-processor backend is installed (PIL or torchvision).

    No second RGB conversion, no PIL/NumPy round trips. The resize is torch's antialiased uint8 kernel, within one
    8-bit level of PIL's (other filters stay PIL's); rescale and normalise are a table, bit-identical to the image
    processor's. `crops` gives 8-bit crops (what parallel decoding workers hand over), `normalise` finishes them on
    their device; calling does both.
    """

    def __init__(
        self, shortest_edge: int, crop_size: tuple[int, int], resample: int, rescale_factor: float, mean, std
    ):
        self.shortest_edge, self.crop_size, self.resample = shortest_edge, crop_size, resample
        levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)  # as transformers' rescale
        mean, std = np.asarray(mean, dtype=np.float32)[:, None], np.asarray(std, dtype=np.float32)[:, None]
        self.table = (levels[None, :] - mean) / std  # (3, 256), as transformers' normalize in float32

    @classmethod
    def for_image_processor(cls, image_processor) -> "ClipPixels | None":
        """The recipe of `image_processor` if it is set up as CLIP's (shortest-edge resize, a centre crop within it,
        rescale, normalise, no pad), else None."""

        def setting(name):
            return getattr(image_processor, name, None)

        size, crop = _set_fields(setting("size")), _set_fields(setting("crop_size"))
        edge, crop_h, crop_w = size.get("shortest_edge"), crop.get("height"), crop.get("width")
        mean, std, resample = setting("image_mean"), setting("image_std"), setting("resample")
        clip_like = (
            setting("do_resize")
            and setting("do_center_crop")
            and setting("do_rescale")
            and setting("do_normalize")
            and not setting("do_pad")
            and setting("do_convert_rgb") is not False
            and set(size) == {"shortest_edge"}
            and isinstance(edge, int)
            and isinstance(crop_h, int)
            and isinstance(crop_w, int)
            and 0 < crop_h <= edge
            and 0 < crop_w <= edge
            and isinstance(resample, int)  # PIL's filters (an IntEnum too), whichever backend holds them
            and np.shape(mean) == (3,)
            and np.shape(std) == (3,)
        )
        if not clip_like:
            return None
        return cls(edge, (crop_h, crop_w), int(resample), float(setting("rescale_factor")), mean, std)

    def crop(self, image: Image.Image) -> torch.Tensor:
        """The 8-bit (3, crop_h, crop_w) centre crop of `image` resized as the processor resizes it."""
        image = bound_aspect_ratio(to_rgb(image))
        width, height = image.size
        # transformers' get_resize_output_image_size(default_to_square=False), then its center_crop offsets
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        new_w, new_h = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
        crop_h, crop_w = self.crop_size
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        mode = TORCH_FILTERS.get(self.resample)
        if mode is None:
            scale_x, scale_y = width / new_w, height / new_h
            box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
            return torch.from_numpy(np.array(image.resize((crop_w, crop_h), self.resample, box=box))).permute(2, 0, 1)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # (1, 3, h, w), channels-last in memory
        resized = torch.nn.functional.interpolate(pixels, size=(new_h, new_w), mode=mode, antialias=True)
        return resized[0, :, top : top + crop_h, left : left + crop_w]

    def crops(self, images: list) -> torch.Tensor:
        """8-bit crops of PIL images, channels first: (n, 3, crop_h, crop_w)."""
        return torch.stack([self.crop(image) for image in images])

    def normalise(self, crops: torch.Tensor) -> torch.Tensor:
        """8-bit crops (n, 3, h, w) → float32 pixel values, by table look-up, on the crops' device."""
        if crops.device.type == "cpu":  # NumPy's take: faster than torch's indexing, same values
            values = crops.numpy()
            out = np.empty(values.shape, dtype=np.float32)
            for channel in range(3):
                np.take(self.table[channel], values[:, channel], out=out[:, channel])
            return torch.from_numpy(out)
        table = torch.from_numpy(self.table).to(crops.device)
        return torch.stack([table[channel][crops[:, channel].long()] for channel in range(3)], dim=1)

    def __call__(self, images: list) -> torch.Tensor:
        return self.normalise(self.crops(images))


def _set_fields(size) -> dict:
    """A size setting as a dict of the fields it sets: a plain dict, or transformers' `SizeDict` (unset = None)."""
    fields = size if isinstance(size, dict) else vars(size) if size is not None else {}
    return {key: value for key, value in fields.items() if value is not None}


# image options of a call that leave CLIP's recipe as it is (`ClipPixels` converts to RGB itself)
FAST_PATH_OPTIONS = {"do_convert_rgb", "return_tensors"}
# with captions (`suffix`), what applies to the whole sequence rather than to the prompt
SEQUENCE_OPTIONS = ("padding", "padding_side", "truncation", "max_length", "pad_to_multiple_of", "return_tensors")


class ClipQwenProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor (`CLIPImageProcessor`): CLIP preprocessing (224 px, bicubic, OpenAI mean/std).
        tokenizer: the decoder's tokenizer (Qwen3's by default).
        num_image_tokens (`int`, defaults to 8): placeholders per image, the model config's
            `num_image_tokens`.
        image_token (`str`, defaults to `"<|image_pad|>"`): the placeholder. A tokenizer without it gets it
            as a special token; then grow the model's vocabulary (`model.resize_token_embeddings(len(tokenizer))`)
            and set `model.config.image_token_id` to `processor.image_token_id`.
        caption_end_token (`str`, *optional*, defaults to `"<|endoftext|>"`): ends every caption (Qwen3-Base's
            real EOS; its tokenizer names `<|im_end|>`). `None`: the tokenizer's EOS.
        prompt (`str`, defaults to `""`): used when a call passes no `text`, e.g. `"Image:<|image_pad|>"`
            (a word first keeps the image out of the first position, where a decoder's attention sink sits and
            what it holds is largely ignored).
    """

    # ProcessorMixin's defaults for a call: left padding for batched generate(), and no special
    # tokens from the tokenizer (this processor writes every token of the layout).
    text_kwargs = {"padding": True, "padding_side": "left", "add_special_tokens": False, "return_tensors": "pt"}
    images_kwargs = {"do_convert_rgb": False}  # `to_rgb` has converted the PIL images already

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 8,
        image_token: str = "<|image_pad|>",
        caption_end_token: str | None = "<|endoftext|>",
        chat_template: str | None = CAPTION_CHAT_TEMPLATE,
        prompt: str = "",
        **kwargs,
    ):
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens!r} is not valid: use an integer >= 1.")
        if caption_end_token is None and tokenizer is not None:
            caption_end_token = tokenizer.eos_token
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.prompt = prompt
        self.caption_end_token = caption_end_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.add_image_token()
        self.image_token_id = self._single_token_id(image_token, "image_token")
        self.caption_end_token_id = self._single_token_id(caption_end_token, "caption_end_token")
        if self.tokenizer.pad_token is None:
            # pad with the caption end token, as Qwen3-Base pads with its EOS
            self.tokenizer.pad_token = caption_end_token
        # Trainer aligns the generation EOS with the tokenizer's: the caption end token
        self.tokenizer.eos_token = caption_end_token

    @classmethod
    def _load_tokenizer_from_pretrained(
        cls, sub_processor_type, pretrained_model_name_or_path, subfolder="", **kwargs
    ):
        # AutoTokenizer would read the folder's config.json (this model's, with remote code) and ask
        # to run it; tokenizer_config.json names the tokenizer's class, which is all it needs.
        kwargs.setdefault("config", PreTrainedConfig())
        return super()._load_tokenizer_from_pretrained(
            sub_processor_type, pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )

    def add_image_token(self) -> bool:
        """Add the placeholder to a tokenizer that lacks it, as a special token (never split, dropped when
        decoding). Returns whether it was added: the model must then grow its vocabulary to the tokenizer's."""
        if self.image_token in self.tokenizer.get_vocab():
            return False
        self.tokenizer.add_tokens([AddedToken(self.image_token, special=True, normalized=False)], special_tokens=True)
        logger.info(
            "Added the image placeholder %r to the tokenizer (id %d): call "
            "`model.resize_token_embeddings(len(processor.tokenizer))` and set "
            "`model.config.image_token_id = processor.image_token_id` so that the model reads it.",
            self.image_token,
            self.tokenizer.convert_tokens_to_ids(self.image_token),
        )
        return True

    def _single_token_id(self, token: str, name: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{name}={token!r} is not a single token of this tokenizer (got ids {ids}).")
        return ids[0]

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # the caption template's variables, from the processor's prompt and end token as they are
        kwargs.setdefault("image_prompt", self.image_prompt)
        kwargs.setdefault("caption_end_token", self.caption_end_token)
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    @property
    def image_prompt(self) -> str:
        """The prompt up to and including its placeholder (the placeholder alone if it has none): what a
        chat message's image, or a prompt without a placeholder, is written as / after."""
        before, _, _ = self.prompt.partition(self.image_token)
        return before + self.image_token if self.image_token in self.prompt else self.image_token

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        suffix: str | list[str] | None = None,
        max_caption_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Model inputs, one image per sample.

        - `images` (and optionally `text`, a prompt each): inputs for `generate()`, left-padded. A prompt
          without the placeholder goes after `image_prompt`.
        - `images` + `suffix` (captions): training inputs, right-padded, whose `labels` supervise each
          caption (cut to `max_caption_length` tokens) and one end token.
        - `suffix` without `images`, or `text` alone that is empty or holds the placeholder: the same,
          for cached image features (`vision_embeds`).
        - any other `text` alone: its tokens only (a completion, as TRL's collator sends it).

        Other keywords are ProcessorMixin's (`padding_side`, `truncation`, `max_length`, `return_tensors`,
        ...). `images` may be one-image lists (the chat format), paths or URLs.
        """
        if kwargs.pop("videos", None) is not None or kwargs.pop("audio", None) is not None:  # chat calls pass None
            raise ValueError("ClipQwen captions images: it takes no videos or audio.")
        self._refuse_unknown_keywords(kwargs)
        images = self._one_image_per_sample(images)
        texts = [text] if isinstance(text, str) else text
        suffixes = [suffix] if isinstance(suffix, str) else suffix
        batch_size = len(images) if images is not None else len(suffixes if suffixes is not None else texts or [])
        if batch_size == 0:
            raise ValueError("ClipQwenProcessor needs images, suffix (captions) or text.")
        for name, values in (("prompts (text)", texts), ("captions (suffix)", suffixes)):
            if values is not None and len(values) != batch_size:
                raise ValueError(f"Got {len(values)} {name} for a batch of {batch_size}: pass one per image.")
        with_image = images is not None or suffixes is not None
        texts = [
            self._with_image(text) if with_image or not text or self.image_token in text else text
            for text in texts or [""] * batch_size
        ]
        if suffixes is None:
            return super().__call__(images=images, text=texts, **kwargs)

        # training: padding, truncation and tensors apply to the whole sequence, prompt and caption
        whole = {key: kwargs.pop(key) for key in SEQUENCE_OPTIONS if key in kwargs}
        prompts = super().__call__(images=images, text=texts, padding=False, return_tensors=None, **kwargs)
        return self._with_captions(prompts, suffixes, max_caption_length, **whole)

    def _with_captions(self, prompts: BatchFeature, suffixes: list[str], max_caption_length=None, **whole):
        """The prompts' tokens, then each caption and its end token, with labels for the captions."""
        # split_special_tokens: a caption that spells "<|endoftext|>" or "<|image_pad|>" stays text,
        # so it can neither end early nor create an image position
        captions = self.tokenizer(suffixes, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        keep = None if max_caption_length is None else max(max_caption_length - 1, 0)
        max_length = whole.get("max_length") if whole.get("truncation") else None
        features = []
        for prompt_ids, caption_ids in zip(prompts["input_ids"], captions):
            caption_ids = caption_ids[:keep] + [self.caption_end_token_id]
            # token_type_ids marks the supervised part (1), as PaliGemma's processor does
            token_type_ids = [0] * len(prompt_ids) + [1] * len(caption_ids)
            features.append(
                {"input_ids": (prompt_ids + caption_ids)[:max_length], "token_type_ids": token_type_ids[:max_length]}
            )
        data = self.tokenizer.pad(
            features,
            padding=whole.get("padding", True),
            max_length=whole.get("max_length") if whole.get("padding") == "max_length" else None,
            padding_side=whole.get("padding_side", "right"),
            pad_to_multiple_of=whole.get("pad_to_multiple_of"),
            return_attention_mask=True,
        )
        data["labels"] = [
            [token if supervised else -100 for token, supervised in zip(ids, mask)]
            for ids, mask in zip(data["input_ids"], data.pop("token_type_ids"))
        ]
        if "pixel_values" in prompts:
            data["pixel_values"] = prompts["pixel_values"]
        return BatchFeature(dict(data), tensor_type=whole.get("return_tensors", "pt"))

    def _refuse_unknown_keywords(self, kwargs: dict) -> None:
        # ProcessorMixin ignores a keyword it does not know: a misspelt suffix= would drop labels
        known = set(self.valid_processor_kwargs.__annotations__)
        for options in self.valid_processor_kwargs.__annotations__.values():
            known |= set(getattr(options, "__annotations__", {}))
        known |= set(getattr(self.image_processor.valid_kwargs, "__annotations__", {}))
        if unknown := sorted(set(kwargs) - known):
            raise TypeError(f"ClipQwenProcessor got unexpected keyword argument(s) {', '.join(unknown)}.")

    def validate_inputs(self, images=None, text=None, **kwargs):
        if text is not None and (crowded := [sample for sample in text if sample.count(self.image_token) > 1]):
            raise ValueError(
                f"The prompt {crowded[0]!r} holds {crowded[0].count(self.image_token)} image placeholders; "
                "ClipQwen captions one image per sample: write the placeholder once."
            )
        if images is not None:  # without images, the placeholders stand for cached image features (`vision_embeds`)
            super().validate_inputs(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict | None = None, image_idx: int = 0, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def get_text_with_replacements(self, text, images_replacements=(), *others):
        if not images_replacements:  # cached image features: their placeholders expand as an image's would
            images_replacements = [self.replace_image_token()] * sum(sample.count(self.image_token) for sample in text)
        return super().get_text_with_replacements(text, images_replacements, *others)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    @staticmethod
    def _one_image_per_sample(images) -> list | None:
        if images is None:
            return None
        if isinstance(images, Image.Image) or getattr(images, "ndim", 0) == 3:
            return [images]
        samples = []
        for image in images:
            if isinstance(image, (list, tuple)):  # the chat format: a list of images per sample
                if len(image) != 1:
                    raise ValueError(f"A sample has {len(image)} images; ClipQwen captions one image per sample.")
                image = image[0]
            samples.append(image)
        return samples

    def _with_image(self, prompt: str) -> str:
        """The prompt (the processor's own if empty), its placeholder after `image_prompt` if it has none."""
        prompt = prompt or self.prompt
        return prompt if self.image_token in prompt else self.image_prompt + prompt

    @property
    def clip_pixels(self) -> ClipPixels | None:
        """The image processor's recipe computed directly (`ClipPixels`) where it is CLIP's, else None (the image
        processor's own call). What `__call__` makes pixel values of PIL images with."""
        return ClipPixels.for_image_processor(self.image_processor)

    def _process_images(self, images, **kwargs):
        fast = self.clip_pixels
        # PIL images with no per-call image setting: CLIP's recipe directly, the same with or without torchvision
        if fast is not None and set(kwargs) <= FAST_PATH_OPTIONS and all(isinstance(i, Image.Image) for i in images):
            pixels = BatchFeature({"pixel_values": fast(images)}, tensor_type=kwargs.get("return_tensors"))
            return pixels, [self.replace_image_token() for _ in images]
        return super()._process_images(self._to_clip_input(images), **kwargs)

    @staticmethod
    def _to_clip_input(images: list) -> list:
        return [bound_aspect_ratio(to_rgb(image)) if isinstance(image, Image.Image) else image for image in images]

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


ClipQwenProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["ClipPixels", "ClipQwenProcessor", "bound_aspect_ratio", "to_rgb"]
