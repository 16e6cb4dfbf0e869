"""save_model writes dirs that load back to the same model, atomically, with the chat template."""

from __future__ import annotations

import json

import pytest
import torch

from polmctl.config.schema import ModelConfig, PeftConfig
from polmctl.errors import ModelError
from polmctl.models import apply_peft, load_model, load_tokenizer, resolve_model_path, save_model
from polmctl.models.tiny import CHATML_TEMPLATE

pytestmark = pytest.mark.unit
TINY = ModelConfig(name_or_path="builtin:tiny")
IDS = torch.tensor([[5, 60, 7, 80, 9, 100, 33]])


def trained(method: str):
    """The tiny model with ``method`` attached and its trainable weights moved off their init."""
    tok = load_tokenizer(TINY)
    model = apply_peft(load_model(TINY), PeftConfig(method=method, r=4, num_virtual_tokens=4), tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval(), tok


@pytest.mark.parametrize(
    "method,merge",
    [
        ("none", False),
        ("lora", False),
        ("lora", True),
        ("dora", False),
        ("dora", True),
        ("prompt_tuning", False),
        ("prefix_tuning", False),
    ],
)
def test_save_and_reload_gives_the_same_logits(tmp_path, method, merge):
    model, tok = trained(method)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    out = save_model(model, tok, tmp_path / "final", merge_adapters=merge)
    is_adapter = method != "none" and not merge
    assert (out / "adapter_config.json").exists() == is_adapter
    assert (out / ("adapter_model.safetensors" if is_adapter else "model.safetensors")).exists()
    assert not list(tmp_path.glob("final.*-*"))  # no temp or old dirs left
    reloaded = load_model(ModelConfig(name_or_path=str(out)), for_training=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_names_its_base_dir_and_reloads_trainable(tmp_path):
    model, tok = trained("lora")
    out = save_model(model, tok, tmp_path / "final")
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == resolve_model_path("builtin:tiny")
    again = load_model(ModelConfig(name_or_path=str(tmp_path)), for_training=True)  # the run dir loads final/
    names = [n for n, p in again.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert apply_peft(again, PeftConfig(method="lora")) is again  # training continues this adapter


def test_the_chat_template_survives_save_and_reload(tmp_path):
    custom = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny", chat_template=custom))
    out = save_model(load_model(TINY), tok, tmp_path / "final")
    again = load_tokenizer(ModelConfig(name_or_path=str(out)))
    assert again.chat_template == custom and again.pad_token == "<pad>"
    out = save_model(trained("lora")[0], load_tokenizer(TINY), tmp_path / "adapter")
    assert load_tokenizer(ModelConfig(name_or_path=str(out))).chat_template == CHATML_TEMPLATE


def test_saving_replaces_an_existing_dir(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("old")
    out = save_model(load_model(TINY), load_tokenizer(TINY), tmp_path / "final")
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


def test_a_failed_save_leaves_the_existing_dir_and_no_temp_dir(tmp_path):
    tok = load_tokenizer(TINY)
    good = save_model(load_model(TINY), tok, tmp_path / "final")
    before = sorted(p.name for p in good.iterdir())

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(load_model(TINY), Broken(), tmp_path / "final")
    assert sorted(p.name for p in good.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_prompt_learning_adapters_do_not_merge(tmp_path):
    model, tok = trained("prefix_tuning")
    with pytest.raises(ModelError, match="virtual tokens are not a weight update"):
        save_model(model, tok, tmp_path / "final", merge_adapters=True)
    assert not (tmp_path / "final").exists()
