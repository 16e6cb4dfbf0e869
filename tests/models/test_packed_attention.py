"""Packed SFT batches attend row by row (models/packed_attention.py): the padded batch's loss and
LoRA gradients, while every other batch keeps transformers' own SDPA."""

from __future__ import annotations

import pytest
import torch

from polmctl.compose import compose_config
from polmctl.config.schema import PeftConfig
from polmctl.data import encode_dataset, load_rows, pack_collate, pad_collate
from polmctl.errors import ConfigError
from polmctl.methods.sft import SFTMethod, SFTObjective
from polmctl.models import apply_peft
from polmctl.models.packed_attention import NAME, share_common_prefix, use_packed_attention
from polmctl.validate import validate

pytestmark = pytest.mark.unit


def examples(tokenizer) -> list[dict]:
    rows = load_rows("builtin:arithmetic", options={"n": 6})
    return encode_dataset(rows, tokenizer, source="a")[0]


def loss_and_grad(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    terms = SFTObjective(SFTMethod())(model, batch)
    loss = terms.loss_sum / terms.weight
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def lora_model(tiny_model):
    """LoRA on the tiny model with non-zero B, so the adapters change the forward and get gradients."""
    torch.manual_seed(0)
    model = apply_peft(tiny_model, PeftConfig(method="lora", r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_a_packed_batch_attends_row_by_row_with_the_padded_batch_loss_and_gradient(tiny_model, tiny_tokenizer):
    model = lora_model(tiny_model)
    ex = examples(tiny_tokenizer)
    assert len({len(e["input_ids"]) for e in ex}) > 1  # rows of different lengths: the padded batch pads
    padded_loss, padded_grad = loss_and_grad(model, pad_collate(ex, tiny_tokenizer.pad_token_id))
    assert model.get_base_model().config._attn_implementation == "sdpa"
    packed_loss, packed_grad = loss_and_grad(model, pack_collate(ex))
    assert model.get_base_model().config._attn_implementation == NAME  # switched by the packed batch
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert ((packed_grad - padded_grad).norm() / padded_grad.norm()).item() < 1e-4
    again, _ = loss_and_grad(model, pad_collate(ex, tiny_tokenizer.pad_token_id))  # padded batches: plain SDPA
    torch.testing.assert_close(again, padded_loss, rtol=1e-6, atol=1e-7)


def test_without_restarting_positions_the_rows_of_a_pack_see_each_other(tiny_model, tiny_tokenizer):
    use_packed_attention(tiny_model)
    packed = pack_collate(examples(tiny_tokenizer))
    running = torch.arange(packed["input_ids"].size(1))[None]
    with torch.no_grad():
        rows = tiny_model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        leaky = tiny_model(input_ids=packed["input_ids"], position_ids=running, use_cache=False).logits
    first = int((packed["position_ids"][0, 1:] == 0).nonzero()[0]) + 1  # the first row is the same either way
    torch.testing.assert_close(rows[:, :first], leaky[:, :first], rtol=1e-5, atol=1e-5)
    assert (rows[:, first:] - leaky[:, first:]).abs().max() > 1e-3


def test_rows_that_open_alike_keep_their_unlabelled_common_prefix_once():
    rows = [([1, 2, 3, 4, 10, 11], 2), ([1, 2, 3, 5, 12], 2), ([1, 2, 3, 4, 13, 14, 15], 3)]  # (ids, labelled tail)
    pack = pack_collate([{"input_ids": ids, "labels": [-100] * (len(ids) - n) + ids[-n:]} for ids, n in rows])
    inputs = {k: pack[k] for k in ("input_ids", "position_ids")}
    shared, labels = share_common_prefix(inputs, pack["labels"])
    # [1, 2, 3] opens every row, but row 2 is labelled from its 4th token on: the token after a shared
    # prefix must be unlabelled (in rows 2 and 3 the previous row's last token would predict it), so 2 are shared.
    assert shared["input_ids"].tolist() == [[1, 2, 3, 4, 10, 11, 3, 5, 12, 3, 4, 13, 14, 15]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 2, 3, 4, 2, 3, 4, 5, 6]]
    trained = lambda l: l[l != -100].tolist()  # noqa: E731
    assert trained(labels) == trained(pack["labels"]) == [10, 11, 5, 12, 13, 14, 15]
    assert (
        share_common_prefix(
            inputs
            | {
                "input_ids": pack["input_ids"]
                + torch.tensor(  # nothing in common
                    [[0] * 6 + [7] * 5 + [0] * 7]
                )
            },
            pack["labels"],
        )
        is None
    )


def test_a_shared_prefix_gives_the_padded_batch_loss_and_gradient_for_fewer_tokens(tiny_model, tiny_tokenizer):
    model = lora_model(tiny_model)
    system = tiny_tokenizer("You are a careful calculator.\n")["input_ids"]  # a system prompt every row opens with
    ex = [
        {"input_ids": system + e["input_ids"], "labels": [-100] * len(system) + e["labels"]}
        for e in examples(tiny_tokenizer)
    ]
    padded_loss, padded_grad = loss_and_grad(model, pad_collate(ex, tiny_tokenizer.pad_token_id))
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    packed_loss, packed_grad = loss_and_grad(model, pack_collate(ex))
    hook.remove()
    assert len(seen) == 1 and seen[0] <= sum(len(e["input_ids"]) for e in ex) - (len(ex) - 1) * len(system)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    assert ((packed_grad - padded_grad).norm() / padded_grad.norm()).item() < 1e-4


def test_a_run_that_continues_no_row_is_refused(tiny_model):
    use_packed_attention(tiny_model)
    with pytest.raises(ValueError, match="restart at 0 for each row"):
        tiny_model(
            input_ids=torch.tensor([[5, 6, 7, 8, 9]]), position_ids=torch.tensor([[0, 1, 4, 5, 6]]), use_cache=False
        )


def test_generation_and_padded_batches_are_unchanged_after_the_switch(tiny_model, tiny_tokenizer):
    batch = pad_collate(examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    prompt = batch["input_ids"][:2, :12]
    with torch.no_grad():
        before = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        greedy = tiny_model.generate(
            input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id
        )
        assert use_packed_attention(tiny_model)
        after = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(before, after)
        assert torch.equal(
            greedy,
            tiny_model.generate(
                input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id
            ),
        )


def test_models_on_other_attention_are_left_alone(tiny_model):
    tiny_model.set_attn_implementation("eager")  # (flash-attention runs packed rows alone by itself)
    assert not use_packed_attention(tiny_model)
    assert tiny_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("adapter", ["prompt_tuning", "prefix_tuning"])
def test_packing_is_refused_with_virtual_token_adapters(adapter):
    with pytest.raises(ConfigError, match="data.packing.*set data.packing=false"):
        validate(compose_config([f"recipe={adapter}", "data.packing=true"]))
    validate(compose_config([f"recipe={adapter}"]))  # the recipes themselves pad


def _qkv(keys: int, grad: bool):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, keys, 16, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
    return q, k, v


def test_a_bf16_cpu_attention_with_gradients_runs_in_float32_when_keys_are_few():
    from types import SimpleNamespace

    from polmctl.models import packed_attention as pa

    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=True)
    q, k, v = _qkv(24, grad=True)
    assert pa._in_float32(q, 24) and not pa._in_float32(q, pa.CPU_FLOAT32_MAX_KEYS + 1)
    with torch.no_grad():
        assert not pa._in_float32(q, 24)  # inference keeps the bf16 kernel
    out, _ = pa._sdpa(module, q, k, v, None, is_causal=True)
    assert out.dtype == torch.bfloat16
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    expected, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, is_causal=True)
    torch.testing.assert_close(out, expected.to(torch.bfloat16))  # float32 math, cast once at the end
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()


def test_a_bf16_model_on_cpu_is_switched_to_the_packed_attention_at_load():
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model

    assert load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16")).config._attn_implementation == NAME
    assert load_model(ModelConfig(name_or_path="builtin:tiny", dtype="float32")).config._attn_implementation == "sdpa"


def test_a_bf16_packed_batch_keeps_the_padded_batch_loss(tiny_tokenizer):
    from polmctl.config.schema import ModelConfig
    from polmctl.models import load_model

    model = lora_model(load_model(ModelConfig(name_or_path="builtin:tiny", dtype="bfloat16")))
    rows = examples(tiny_tokenizer)
    packed, _ = loss_and_grad(model, pack_collate(rows))
    padded, _ = loss_and_grad(model, pad_collate(rows, tiny_tokenizer.pad_token_id))
    torch.testing.assert_close(packed, padded, rtol=2e-2, atol=2e-2)  # bf16 weights: rounding differs by layout


def test_a_pack_is_split_once_per_tensor_not_sliced_per_row():
    """A slice's backward zeroes and fills a gradient of the whole pack's size, per row and layer;
    a split's backward concatenates the rows' gradients once."""
    from types import SimpleNamespace

    from polmctl.models.packed_attention import packed_sdpa

    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=True)
    lengths = [5, 7, 6, 4]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    q, k, v = (torch.randn(1, 2, sum(lengths), 8, requires_grad=True) for _ in range(3))
    out, _ = packed_sdpa(module, q, k, v, None, position_ids=positions)
    names, seen, todo = [], set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [parent for parent, _ in node.next_functions]
    assert names.count("SplitWithSizesBackward0") == 3 and "SliceBackward0" not in names
