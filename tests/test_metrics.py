import pytest

from clipqwen.caption_metrics import compute_caption_metrics, tokenize_caption


def test_identical_captions_score_perfectly():
    captions = ["a man rides a red bicycle down the street", "two dogs play with a ball in the park"]
    m = compute_caption_metrics(captions, [[c] for c in captions])
    assert m["rougeL"] == pytest.approx(1.0)
    assert m["bleu4"] == pytest.approx(1.0, abs=1e-6)  # pycocoevalcap adds 1e-15/1e-9 smoothing
    assert m["gen_len"] == pytest.approx(9.0)


def test_bleu_1_to_4_hand_computed():
    # pred: a cat sits on a mat (6 tokens); ref: a cat sat on a mat (6 tokens, so no brevity penalty)
    # matching n-grams: unigrams 5/6, bigrams 3/5 (a cat, on a, a mat), trigrams 1/4 (on a mat), 4-grams 0/3
    m = compute_caption_metrics(["a cat sits on a mat"], [["A cat sat on a mat."]])
    assert m["bleu1"] == pytest.approx(5 / 6)
    assert m["bleu2"] == pytest.approx((5 / 6 * 3 / 5) ** (1 / 2))
    assert m["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert m["bleu4"] == pytest.approx(0.0, abs=1e-3)  # no matching 4-gram: only pycocoevalcap's smoothing is left


def test_distinct_captions_is_the_share_of_different_tokenised_predictions():
    references = [["a dog runs"], ["a cat sleeps"], ["a man walks"], ["a bird sings"]]
    assert compute_caption_metrics(["a dog", "a cat", "a man", "a bird"], references)["distinct_captions"] == 1.0
    # the same sentence for every photo, up to case and punctuation: one distinct caption of four
    same = ["A dog runs.", "a dog runs", "a dog, runs!", "A DOG RUNS"]
    assert compute_caption_metrics(same, references)["distinct_captions"] == 0.25
    assert compute_caption_metrics(same[:2] + ["a cat", "a cat"], references)["distinct_captions"] == 0.5


def test_rouge_l_hand_computed():
    # pred: a black cat sits on the mat (7 tokens); ref: the cat sits on a mat (6 tokens)
    # LCS = "cat sits on mat" = 4 ("the" and "a" appear in opposite orders, so only one side's can join).
    # P = 4/7, R = 4/6, F = 2PR / (P + R) = (32/42) / (52/42) = 8/13
    m = compute_caption_metrics(["a black cat sits on the mat"], [["The cat sits on a mat."]])
    assert m["rougeL"] == pytest.approx(8 / 13)


def test_case_and_punctuation_are_ignored():
    m = compute_caption_metrics(["A dog, running!"], [["a dog running"]])
    assert m["rougeL"] == pytest.approx(1.0)


def test_rouge_l_takes_the_best_reference_not_the_mean():
    pred = "a black cat sits on the mat"
    refs = ["a bowl of fruit", "The cat sits on a mat.", "a black cat sits on the mat"]
    assert compute_caption_metrics([pred], [refs])["rougeL"] == pytest.approx(1.0)
    assert compute_caption_metrics([pred], [refs[:2]])["rougeL"] == pytest.approx(8 / 13)
    assert compute_caption_metrics([pred], [refs[:2][::-1]])["rougeL"] == pytest.approx(8 / 13)


def test_cider_rewards_matching_predictions_over_shuffled_ones():
    references = [
        ["a man riding a wave on a surfboard", "a surfer rides a large ocean wave"],
        ["a plate of food with broccoli and rice", "rice and broccoli on a white plate"],
        ["a giraffe standing next to a tree", "a tall giraffe eating leaves from a tree"],
        ["a red double decker bus on a street", "a bus driving down a city street"],
    ]
    matching = [refs[0] for refs in references]
    shuffled = matching[1:] + matching[:1]
    good = compute_caption_metrics(matching, references)
    bad = compute_caption_metrics(shuffled, references)
    assert good["cider"] > 1.0
    assert bad["cider"] < 0.1 < good["cider"] - bad["cider"]
    assert good["bleu4"] > bad["bleu4"] and good["rougeL"] > bad["rougeL"]


@pytest.mark.parametrize(
    "caption",
    [
        "Кошка сидит на деревянном столе",  # Cyrillic: rouge_score's default tokenizer would drop every letter
        "一只猫坐在木桌上",  # Chinese: no spaces at all
        "🐱 on a 🪑 ☀️",  # emoji
        "قطة تجلس على طاولة خشبية",  # Arabic
        "एक बिल्ली मेज़ पर बैठी है",  # Devanagari: combining vowel signs must not split words
    ],
)
def test_non_latin_captions_equal_to_reference_score_one(caption):
    assert tokenize_caption(caption)
    m = compute_caption_metrics([caption], [[caption]])
    assert m["rougeL"] == pytest.approx(1.0)


def test_cjk_is_split_into_characters():
    assert tokenize_caption("猫在桌子上") == ["猫", "在", "桌", "子", "上"]
    # One character of five differs: LCS = 4, P = R = 4/5.
    m = compute_caption_metrics(["狗在桌子上"], [["猫在桌子上"]])
    assert m["rougeL"] == pytest.approx(0.8)


def test_empty_and_whitespace_predictions_score_zero():
    m = compute_caption_metrics(["", "   "], [["a cat on a mat"], ["a dog in the park"]])
    zero = pytest.approx(0.0, abs=1e-9)
    bleu = {f"bleu{n}": zero for n in (1, 2, 3, 4)}
    assert m == {"rougeL": 0.0, **bleu, "cider": 0.0, "gen_len": 0.0, "distinct_captions": 0.5}  # one caption, ""


def test_no_predictions_is_an_error():
    with pytest.raises(ValueError, match="at least one prediction"):
        compute_caption_metrics([], [])


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"2 predictions but 3 reference"):
        compute_caption_metrics(["a", "b"], [["a"], ["b"], ["c"]])


@pytest.mark.parametrize("bad_refs", [[], ["", "  "], "a cat"])
def test_missing_references_name_the_image(bad_refs):
    with pytest.raises(ValueError, match=r"references\[1\]"):
        compute_caption_metrics(["a cat", "a dog"], [["a cat"], bad_refs])


def test_the_evaluate_module_loads_offline_and_gives_the_trainers_scores():
    """What users load with evaluate.load(<path>) is what the trainer and the model card use."""
    import evaluate

    from clipqwen.caption_metrics import CAPTION_METRIC_PATH, load_caption_metric

    predictions = ["a dog runs on the grass", "a red car", "two people talk"]
    references = [
        ["a dog is running on grass", "a brown dog runs"],
        ["a red car parked"],
        ["two men talking", "people talk"],
    ]
    # HF_HUB_OFFLINE=1
    scores = evaluate.load(CAPTION_METRIC_PATH).compute(predictions=predictions, references=references)
    assert scores == compute_caption_metrics(predictions, references)
    assert load_caption_metric().compute(predictions=predictions, references=references) == scores
