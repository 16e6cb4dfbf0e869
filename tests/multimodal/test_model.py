"""polmctl.multimodal on the tiny LM: building the LLaVA model, placeholders, stages, saving, errors."""

from __future__ import annotations

import pytest
import torch

from polmctl.compose import compose_config
from polmctl.config.schema import DataConfig, ModelConfig, PeftConfig
from polmctl.data import format_prompt
from polmctl.data.builtin.shapes import shapes
from polmctl.errors import ConfigError, DataError
from polmctl.methods.vlm import VlmMethod, VlmObjective
from polmctl.models import save_model
from polmctl.multimodal.data import load_image, with_image_token
from polmctl.multimodal.evaluate import answer_accuracy, predicted_answer
from polmctl.multimodal.model import add_lm_adapters, build_vlm, is_vlm_dir, load_vlm, set_stage
from polmctl.runners.vlm import run_vlm
from polmctl.validate import validate

pytestmark = pytest.mark.recipes  # it trains (or starts processes): not in the fast tier

TINY = ModelConfig(name_or_path="builtin:tiny")


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return build_vlm(TINY, VlmMethod())


def encoded(processor, model, rows):
    objective = VlmObjective(processor, model.config.image_seq_length)
    return objective, objective.encode(rows, processor.tokenizer, DataConfig(source="builtin:shapes"))[0]


def test_build_wraps_the_lm_and_adds_an_image_token(vlm):
    model, processor = vlm
    tok = processor.tokenizer
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id == len(tok) - 1
    assert model.config.image_seq_length == 16  # (32 / 8)^2 SigLIP patches, no CLS token
    assert model.config.vision_feature_select_strategy == "full"
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the tiny LM ties them, still tied


def test_placeholder_expansion_matches_llava_processor(vlm):
    model, processor = vlm
    rows = shapes("train", n=2)
    objective, examples = encoded(processor, model, rows)
    prompt = format_prompt(rows[0]["prompt"], processor.tokenizer)
    by_processor = processor(images=[load_image(rows[0]["image"])], text=[prompt], add_special_tokens=False)
    n_prompt = list(by_processor["input_ids"][0])
    assert examples[0]["input_ids"][: len(n_prompt)] == n_prompt
    assert n_prompt.count(model.config.image_token_id) == 16
    assert all(label == -100 for label in examples[0]["labels"][: len(n_prompt)])
    batch = objective.collate(examples)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.isfinite(objective(model, batch).loss_sum)


def test_the_picture_changes_the_answer_distribution(vlm):
    model, processor = vlm
    objective, examples = encoded(processor, model, shapes("train", n=2))
    batch = objective.collate(examples)
    with torch.no_grad():
        a = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        batch["pixel_values"] = batch["pixel_values"].flip(0)
        b = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_stages_set_what_trains():
    model, _ = build_vlm(TINY, VlmMethod())
    set_stage(model, 1, train_vision=False)
    trained = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"multi_modal_projector"}
    model = add_lm_adapters(model, PeftConfig(method="lora", r=4))
    set_stage(model, 2, train_vision=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in names)
    assert all("multi_modal_projector" in n or ("lora_" in n and "language_model" in n) for n in names)
    assert any("lora_" in n for n in names)
    set_stage(model, 2, train_vision=True)
    assert any("vision_tower" in n for n, p in model.named_parameters() if p.requires_grad)


def test_saved_model_reloads_with_the_same_outputs(vlm, tmp_path):
    model, processor = vlm
    model = add_lm_adapters(model, PeftConfig(method="lora", r=4))
    for name, p in model.named_parameters():  # a non-zero LoRA update, so merging matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    rows = shapes("test", n=4)
    objective, examples = encoded(processor, model, rows)
    batch = {k: v for k, v in objective.collate(examples).items() if k != "labels"}
    final = save_model(model, processor, tmp_path / "final", merge_adapters=True)
    assert is_vlm_dir(final)
    reloaded, reprocessor = load_vlm(ModelConfig(name_or_path=str(tmp_path)))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)
    a = answer_accuracy(model, processor, rows, batch_size=4, max_new_tokens=3)
    b = answer_accuracy(reloaded, reprocessor, rows, batch_size=4, max_new_tokens=3)
    assert [s["completion"] for s in a["samples"]] == [s["completion"] for s in b["samples"]]
    assert a["metrics"]["chance"] == pytest.approx(sum(1 / len(r["choices"]) for r in rows) / 4)


def test_a_pretrained_vision_model_dir_is_used(tmp_path):
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    pretrained = SiglipModel(
        SiglipConfig(text_config=sizes, vision_config={**sizes, "image_size": 48, "patch_size": 12})
    )
    pretrained.save_pretrained(tmp_path)  # a two-tower checkpoint, as on the hub
    SiglipImageProcessorPil(size={"height": 48, "width": 48}).save_pretrained(tmp_path)
    model, processor = build_vlm(TINY, VlmMethod(vision_model=str(tmp_path)))
    assert model.config.image_seq_length == 16 and model.config.vision_config.hidden_size == 32
    torch.testing.assert_close(
        model.model.vision_tower.state_dict()["post_layernorm.weight"], pretrained.vision_model.post_layernorm.weight
    )
    image = load_image(shapes("train", n=1)[0]["image"])
    assert processor(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"].shape[-1] == 48


def test_answers_are_read_from_the_completion():
    assert predicted_answer("The circle is red.", ["red", "blue"]) == "red"
    assert predicted_answer(" Square", None) == "square"
    assert predicted_answer("", ["red"]) == ""


def test_bad_rows_and_configs_fail_early(vlm):
    model, processor = vlm
    with pytest.raises(DataError, match="no 'image' column"):
        encoded(processor, model, [{"prompt": "hi", "completion": "x"}])
    with pytest.raises(DataError, match="image file /nope.png does not exist"):
        encoded(processor, model, [{"prompt": "hi", "completion": "x", "image": "/nope.png"}])
    with pytest.raises(DataError, match="2 <image> placeholders"):
        with_image_token("<image><image> what?", "<image>")
    for override, key in (
        ("peft=none", "peft.method"),
        ("eval.tasks=[arithmetic]", "eval.tasks"),
        ("resume=auto", "resume"),
        ("method.patch_size=5", "method.patch_size"),
    ):
        with pytest.raises(ConfigError, match=key):
            run_vlm(validate(compose_config(["recipe=vlm_adapter", "model=tiny", override, "output_dir=/tmp/x"])))
    with pytest.raises(ConfigError, match="the vlm runner reads method=vlm, got 'sft'; use recipe=vlm_adapter"):
        run_vlm(validate(compose_config(["recipe=lora", "model=tiny", "eval.tasks=[]", "output_dir=/tmp/x"])))


def test_feature_layer_zero_reads_the_patch_embeddings():
    model, processor = build_vlm(TINY, VlmMethod(vision_feature_layer=0))
    assert model.config.vision_feature_layer == -3  # 2 layers + the embeddings; 0 itself trips transformers
    pixels = processor.image_processor(images=[load_image(shapes("train", n=1)[0]["image"])], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        expected = model.model.multi_modal_projector(model.model.vision_tower.embeddings(pixels))[0]
    torch.testing.assert_close(features, expected)
    with pytest.raises(ConfigError, match="method.vision_feature_layer"):
        validate(compose_config(["recipe=vlm_adapter", "model=tiny", "method.vision_feature_layer=5"]))
