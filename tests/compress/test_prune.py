"""Pruning masks and importance on hand-built tensors and tiny models; SparsityMasks through training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from polmctl.compress.prune import (
    block_influence,
    calibrate,
    check_prunable,
    decoder_layers,
    drop_layers,
    layers_to_drop,
    least_important,
    magnitude_mask,
    nm_mask,
    prunable_linears,
    prune_linears,
    row_mask,
    wanda_mask,
    wanda_scores,
    zero_fraction,
)
from polmctl.compress.sparsity import SparsityMasks, canonical_name
from polmctl.errors import ConfigError, ModelError
from polmctl.methods.prune import PruneMethod
from polmctl.models.tiny import TINY_SIZES

pytestmark = pytest.mark.unit


# -- masks on hand-built weights ----------------------------------------------------------


def test_magnitude_mask_removes_the_smallest_abs_values_of_the_whole_tensor():
    w = torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 4.0, -0.05, 1.0]])
    keep = magnitude_mask(w, 0.5)
    assert keep.tolist() == [[False, True, False, True], [False, True, False, True]]
    w = torch.tensor([[0.01, 0.02, 0.03], [5.0, 6.0, 7.0]])  # one row of small weights goes entirely
    assert magnitude_mask(w, 0.5).tolist() == [[False, False, False], [True, True, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.99])
def test_magnitude_mask_hits_the_requested_sparsity_exactly(sparsity):
    w = torch.randn(37, 29, generator=torch.Generator().manual_seed(0))
    keep = magnitude_mask(w, sparsity)
    assert (~keep).sum().item() == round(sparsity * w.numel())
    if 0 < sparsity:  # every removed |w| is at most every kept one
        assert w.abs()[~keep].max() <= w.abs()[keep].min()


def test_wanda_weighs_magnitudes_by_input_channel_norms_per_output_row():
    w = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 4.0, 2.0, 3.0], [0.01, 0.02, 0.03, 0.04]])  # a row of small weights
    norms = torch.tensor([0.1, 10.0, 0.1, 10.0])  # channels 1 and 3 carry large activations
    assert torch.allclose(wanda_scores(w, norms)[0], torch.tensor([0.4, 10.0, 0.3, 20.0]))
    keep = wanda_mask(w, norms, 0.5)
    # Wanda removes the low-activation channels 0 and 2 in every row ...
    assert keep.tolist() == [[False, True, False, True]] * 3
    # ... where magnitude removes other weights, and the whole small row.
    assert magnitude_mask(w, 0.5).tolist() != keep.tolist()
    assert row_mask(w.abs(), 0.5)[0].tolist() == [True, False, True, False]
    assert magnitude_mask(w, 0.5)[2].tolist() == [False] * 4


def test_wanda_mask_prunes_the_same_fraction_of_every_row():
    gen = torch.Generator().manual_seed(1)
    w, norms = torch.randn(16, 40, generator=gen), torch.rand(40, generator=gen)
    keep = wanda_mask(w, norms, 0.3)
    assert ((~keep).sum(1) == 12).all()
    with pytest.raises(ValueError, match="input dim"):
        wanda_scores(w, torch.ones(39))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_exactly_n_of_every_m_along_the_input_dim(n, m):
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    keep = nm_mask(w.abs(), n, m)
    groups = keep.reshape(8, -1, m)
    assert (groups.sum(-1) == n).all(), "exactly m - n zeros in every group"
    kept = w.abs().reshape(8, -1, m).masked_fill(~groups, float("inf")).min(-1).values
    dropped = w.abs().reshape(8, -1, m).masked_fill(groups, -1.0).max(-1).values
    assert (dropped <= kept).all(), "the n largest of each group stay"


def test_nm_mask_with_wanda_scores_and_bad_shapes():
    w = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    keep = nm_mask(wanda_scores(w, torch.tensor([0.1, 10.0, 0.1, 10.0])), 2, 4)
    assert keep.tolist() == [[False, True, False, True]]
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match="N < M"):
        nm_mask(torch.ones(2, 8), 4, 4)


def test_block_influence_and_least_important():
    x = torch.randn(2, 5, 8)
    assert block_influence(x, x)[0] == pytest.approx(0.0, abs=1e-5)
    assert block_influence(x, -x) == (pytest.approx(20.0), 10)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert block_influence(x, x + 1, mask)[1] == 8
    assert least_important([0.3, 0.05, 0.2, 0.01], 2) == [1, 3]


# -- config and bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"sparsity": 1.0}, "method.sparsity"),
        ({"sparsity": -0.1}, "method.sparsity"),
        ({"nm_n": 4, "nm_m": 4}, "method.nm_n"),
        ({"nm_n": 5, "nm_m": 4}, "method.nm_n"),
        ({"criterion": "random"}, "method.criterion"),
        ({"layer_fraction": 1.0}, "method.layer_fraction"),
        ({"num_layers_to_drop": 0}, "method.num_layers_to_drop"),
    ],
)
def test_bad_method_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        PruneMethod(**kwargs).check("method")
    assert info.value.key == key and len(str(info.value).splitlines()) == 1


def test_layers_to_drop_counts_and_refuses_all_or_none():
    assert layers_to_drop(30, None, 0.25) == 8
    assert layers_to_drop(30, 3, 0.25) == 3
    with pytest.raises(ConfigError) as info:
        layers_to_drop(2, 2, 0.25)
    assert info.value.key == "method.num_layers_to_drop" and "2 of the model's 2" in str(info.value)
    with pytest.raises(ConfigError) as info:
        layers_to_drop(2, None, 0.2)
    assert info.value.key == "method.layer_fraction"


def test_quantized_model_is_refused(tiny_model):
    check_prunable(tiny_model)
    tiny_model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(ModelError, match="quantized"):
        check_prunable(tiny_model)


# -- tiny models --------------------------------------------------------------------------


def _llama(tokenizer, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **{**TINY_SIZES, "num_hidden_layers": layers},
    )
    return LlamaForCausalLM(config).eval()


def _batches(pad_id: int):
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, 8:], mask[0, 8:] = pad_id, 0
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}]


def test_prunable_linears_are_the_decoder_linears_only(tiny_model):
    names = prunable_linears(tiny_model)
    assert len(names) == 7 * 2 and all(n.startswith("model.layers.") for n in names)
    assert set(prunable_linears(tiny_model, ["mlp"])) == {
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    }
    with pytest.raises(ConfigError, match="method.modules"):
        prunable_linears(tiny_model, ["lm_head"])


def test_calibration_leaves_padding_out_of_the_activation_norms(tiny_model, tiny_tokenizer):
    batch = _batches(tiny_tokenizer.pad_token_id)[0]
    linears = prunable_linears(tiny_model, ["q_proj"])
    padded = calibrate(tiny_model, [batch], linears=linears)
    rows = [{k: v[i : i + 1, : 8 if i == 0 else None] for k, v in batch.items()} for i in range(3)]
    one_by_one = calibrate(tiny_model, rows, linears=linears)
    for name in linears:
        torch.testing.assert_close(padded.act_norms[name], one_by_one.act_norms[name], rtol=1e-4, atol=1e-5)
    assert padded.tokens == one_by_one.tokens == 7 + 11 + 11
    assert padded.nll == pytest.approx(one_by_one.nll, rel=1e-5)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "nm"])
def test_prune_linears_reaches_the_sparsity_in_every_tensor(tiny_model, tiny_tokenizer, criterion):
    linears = prunable_linears(tiny_model)
    cal = calibrate(tiny_model, _batches(tiny_tokenizer.pad_token_id), linears=linears)
    achieved = prune_linears(
        linears, criterion=criterion, sparsity=0.5, n=2, m=4, nm_score="wanda", act_norms=cal.act_norms
    )
    assert set(achieved) == {f"{n}.weight" for n in linears}
    assert all(v == pytest.approx(0.5) for v in achieved.values())
    assert zero_fraction(tiny_model.model.embed_tokens.weight) < 0.01  # embeddings untouched


def test_the_identity_block_has_no_influence_and_is_the_one_dropped(tiny_tokenizer):
    model = _llama(tiny_tokenizer, layers=4)
    with torch.no_grad():  # block 2 adds nothing to its residual stream: output == input
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    importance = calibrate(model, _batches(tiny_tokenizer.pad_token_id), layer_importance=True).layer_importance
    assert len(importance) == 4
    assert importance[2] == pytest.approx(0.0, abs=1e-6) and min(importance[:2] + importance[3:]) > 1e-3
    assert least_important(importance, 1) == [2]


def _check_reloads_and_generates(model, tmp_path, layers: int):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert reloaded.config.num_hidden_layers == layers and len(decoder_layers(reloaded)) == layers
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = reloaded.generate(ids, use_cache=True, **kwargs)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, reloaded.generate(ids, use_cache=False, **kwargs)), "KV cache must match no cache"


def test_depth_pruned_llama_reloads_and_generates(tiny_tokenizer, tmp_path):
    model = _llama(tiny_tokenizer, layers=4)
    kept_layer = model.model.layers[3]
    assert drop_layers(model, [0, 2]) == [1, 3]
    assert model.model.layers[1] is kept_layer and len(model.model.layers) == 2
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    assert sorted({k.split(".")[2] for k in model.state_dict() if k.startswith("model.layers.")}) == ["0", "1"]
    _check_reloads_and_generates(model, tmp_path, 2)


def test_depth_pruning_trims_layer_types(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    model = Qwen3ForCausalLM(config).eval()
    types = list(model.config.layer_types)
    assert len(types) == 4 and len(set(types)) == 2
    drop_layers(model, [1])
    assert model.config.layer_types == [types[0], types[2], types[3]]
    _check_reloads_and_generates(model, tmp_path, 3)


def test_drop_layers_refuses_to_empty_the_model(tiny_model):
    with pytest.raises(ValueError):
        drop_layers(tiny_model, [0, 1])


# -- SparsityMasks ------------------------------------------------------------------------


def _pruned(tiny_model):
    target = tiny_model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        target.weight.masked_fill_(~magnitude_mask(target.weight, 0.5), 0)
    return target


def _sgd_steps(model, masks: SparsityMasks | None, steps: int = 3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(4))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if masks is not None:
            masks.apply(model)


def test_canonical_names_strip_the_peft_wrapping():
    assert (
        canonical_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight")
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert canonical_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert canonical_name("lm_head.original_module.weight") == "lm_head.weight"
    assert canonical_name("module.base_model.model.model.norm.weight") == "model.norm.weight"  # DDP(peft)
    assert canonical_name("_orig_mod.model.norm.weight") == "model.norm.weight"  # torch.compile
    assert canonical_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


def test_masks_record_only_the_sparse_tensors(tiny_model):
    target = _pruned(tiny_model)
    masks = SparsityMasks.from_model(tiny_model, min_sparsity=0.1)
    assert masks.names == ["model.layers.0.mlp.up_proj.weight"]
    assert masks.sparsity()["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.5)
    assert torch.equal(masks.masks["model.layers.0.mlp.up_proj.weight"], target.weight != 0)
    assert len(SparsityMasks.from_model(tiny_model, min_sparsity=0.6)) == 0


@pytest.mark.parametrize("keep", [False, True])
def test_sgd_fills_the_zeros_unless_masks_are_applied(tiny_model, keep):
    target = _pruned(tiny_model)
    masks = SparsityMasks.from_model(tiny_model)
    before = target.weight.detach().clone()
    _sgd_steps(tiny_model, masks if keep else None)
    assert not torch.equal(target.weight[before != 0], before[before != 0]), "the kept weights train"
    if keep:
        assert masks.violations(tiny_model) == 0 and zero_fraction(target.weight) == pytest.approx(0.5)
        assert torch.equal(target.weight == 0, before == 0)
    else:
        assert masks.violations(tiny_model) > 0 and zero_fraction(target.weight) < 0.1


def test_masks_reach_lora_wrapped_and_merged_weights(tiny_model):
    from peft import LoraConfig, get_peft_model

    _pruned(tiny_model)
    plain = SparsityMasks.from_model(tiny_model)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "q_proj"]))
    wrapped = SparsityMasks.from_model(peft_model)
    assert wrapped.names == plain.names, "lora_B starts at zero but is never recorded"
    assert plain.apply(peft_model) == 1  # found as ...up_proj.base_layer.weight
    _sgd_steps(peft_model, plain)
    merged = peft_model.merge_and_unload()
    assert plain.violations(merged) > 0, "the merged LoRA update is dense"
    state = plain.apply_to_state_dict(merged.state_dict())
    assert zero_fraction(state["model.layers.0.mlp.up_proj.weight"]) == pytest.approx(0.5)
    plain.apply(merged)
    assert plain.violations(merged) == 0


def test_masks_of_another_model_are_refused(tiny_model):
    masks = SparsityMasks({"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="another model"):
        masks.apply(tiny_model)
