"""The model card states the decoding of the generation_config saved beside it, and no other."""

from huggingface_hub import ModelCard
from transformers import GenerationConfig

from clipqwen.publishing.model_card import CardFacts, build_model_card
from clipqwen.tiny import tiny_config


def card(**facts) -> str:
    """The card of a Flickr30K run with one test score, greedy decoding, and `facts` instead where given."""
    defaults = dict(
        repo_id="you/clipqwen-flickr30k",
        vision_id="openai/clip-vit-base-patch32",
        text_id="Qwen/Qwen3-0.6B-Base",
        dataset_name="nlphuji/flickr30k",
        model_config=tiny_config(),
        metrics={"test_rougeL": 0.5},
        hyperparameters={"learning rate": 1e-3},
        generation_config=GenerationConfig(),
        trainable=1,
        total=2,
    )
    return str(build_model_card(CardFacts(**(defaults | facts))))


def test_the_card_names_the_saved_decoding_in_its_text_and_its_usage_snippet():
    text = card(generation_config=GenerationConfig(num_beams=3, max_new_tokens=7, min_new_tokens=1, bos_token_id=0))
    decoding = "num_beams=3, max_new_tokens=7, min_new_tokens=1"
    assert f"Captions generated with {decoding} (this repository's `generation_config.json`" in text
    assert f"# decodes as generation_config.json says ({decoding}); keyword arguments override it" in text
    assert "ids = model.generate(**inputs)\n" in text
    assert "bos_token_id" not in text  # token ids are not decoding settings


def test_a_generation_config_without_settings_gives_no_made_up_numbers():
    text = card(generation_config=GenerationConfig())
    assert "Captions generated with greedy decoding" in text
    assert "max_new_tokens" not in text and "num_beams" not in text


def test_the_results_table_has_the_literatures_columns_and_says_what_reliance_means():
    metrics = {"eval_num_images": 10, "eval_bleu1": 0.61, "eval_bleu4": 0.17, "eval_image_reliance": 0.42}
    metrics |= {"eval_distinct_captions": 0.9}
    text = card(metrics=metrics)
    header = "| split | images | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | CIDEr-D | ROUGE-L | loss | image reliance |"
    assert header in text
    assert "| validation | 10 | 0.6100 | – | – | 0.1700 | – | – | – | 0.4200 | 0.9000 |" in text
    assert "*image reliance* is the loss with each caption's image swapped" in text


def test_the_card_lists_both_base_model_ids_and_the_dataset():
    text = card(metrics={"test_rougeL": 0.5123, "test_cider": 0.75})
    reloaded = ModelCard(text)
    assert reloaded.data.base_model == ["openai/clip-vit-base-patch32", "Qwen/Qwen3-0.6B-Base"]
    assert reloaded.data.datasets == ["nlphuji/flickr30k"] and "0.5123" in text


def test_the_card_says_which_image_features_the_projector_reads():
    assert "(the pooled image embedding, 8 image token(s))" in card()
    grid = card(model_config=tiny_config(vision_feature_type="grid", num_pooled_image_tokens=2))
    assert "(the whole image's feature and a 2×2 grid of the feature map's cell means (layer -2), 10 image" in grid
