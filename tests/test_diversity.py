"""Sample quality and diversity (`kdray.eval.diversity`): the numbers a quality-diversity curve is made of."""

from __future__ import annotations

import pytest

from kdray.eval.diversity import diversity_curve, sample_scores


def test_identical_samples_are_least_diverse_and_quality_averages_over_samples():
    records = [{"answer": "#### 4"}, {"answer": "#### 9"}]
    same = [["so #### 4"] * 4, ["so #### 9"] * 4]
    varied = [["so #### 4", "it is 2 + 2 #### 4", "wrong #### 5", "guess #### 7"],
              ["nine #### 9", "3 * 3 #### 9", "8 #### 8", "ten #### 10"]]  # fmt: skip
    a, b = sample_scores(same, records, task="arithmetic"), sample_scores(varied, records, task="arithmetic")
    assert a["quality"] == 100.0 and b["quality"] == pytest.approx(100.0 * (2 / 4 + 2 / 4) / 2)
    assert a["self_bleu"] == pytest.approx(100.0) and b["self_bleu"] < a["self_bleu"]
    assert a["distinct_2"] == pytest.approx(2 / 8) and b["distinct_2"] > a["distinct_2"]


def test_translation_quality_is_bleu_of_every_sample_and_shapes_are_checked():
    records = [{"response": "ein Hund läuft über die Wiese"}]
    exact = sample_scores([["ein Hund läuft über die Wiese"] * 2], records, task="translation")
    half = sample_scores(
        [["ein Hund läuft über die Wiese", "eine Katze schläft"]], records, task="translation"
    )
    assert exact["quality"] == pytest.approx(100.0) and 0.0 < half["quality"] < 100.0
    with pytest.raises(ValueError, match="one list of samples per record"):
        sample_scores([["a"], ["b"]], records, task="translation")


def test_curve_of_a_real_model_is_seeded_and_hotter_sampling_is_more_diverse(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from kdray.models.tiny import save_tiny_checkpoint

    path = save_tiny_checkpoint(tmp_path / "tiny", hidden_size=32, num_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():  # peaked next-token distributions, as a trained model has: temperature matters
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(path)
    records = [{"prompt": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(6)]
    kwargs = {"task": "arithmetic", "temperatures": (0.1, 5.0), "samples": 4, "max_new_tokens": 24, "seed": 3}
    cold, hot = diversity_curve(path, records, **kwargs)
    assert (cold["temperature"], hot["temperature"]) == (0.1, 5.0)
    assert hot["distinct_2"] > cold["distinct_2"] and hot["self_bleu"] < cold["self_bleu"]
    assert diversity_curve(path, records, **kwargs) == [cold, hot]
    with pytest.raises(ValueError, match="samples >= 2"):
        diversity_curve(path, records, task="arithmetic", samples=1, max_new_tokens=4)
