"""Merge methods on hand-built tensors (linear, task arithmetic, TIES sign election, DARE
rescaling, SLERP), the method config checks, and the shard writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from polmctl.errors import ConfigError
from polmctl.merge.methods import merge_tensor, slerp
from polmctl.merge.write import ShardWriter
from polmctl.methods.merge import MergeMethod

pytestmark = pytest.mark.unit

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
D1 = torch.tensor([3.0, -1.0, 2.0, 0.5])  # task vectors (model - base)
D2 = torch.tensor([-1.0, -2.0, 2.0, 0.0])


def test_linear_is_the_weighted_sum_of_the_weights():
    a, b = BASE + D1, BASE + D2
    torch.testing.assert_close(merge_tensor("linear", [a, b], [0.25, 0.75]), 0.25 * a + 0.75 * b)


def test_task_arithmetic_adds_weighted_task_vectors_to_the_base():
    out = merge_tensor("task_arithmetic", [BASE + D1, BASE + D2], [1.0, 0.5], base=BASE)
    torch.testing.assert_close(out, BASE + D1 + 0.5 * D2)


def test_ties_elects_the_sign_and_averages_only_the_agreeing_values():
    out = merge_tensor("ties", [BASE + D1, BASE + D2], [1.0, 1.0], base=BASE, density=1.0)
    # sums 2, -3, 4, 0.5 -> signs +, -, +, +; entry 0: only D1 agrees (3); entry 1: both (-1.5);
    # entry 2: both (2); entry 3: D1 (0.5; D2's 0 has no sign and is not counted)
    torch.testing.assert_close(out, BASE + torch.tensor([3.0, -1.5, 2.0, 0.5]))


def test_ties_frequency_vote_and_trim():
    d = [torch.tensor([-4.0]), torch.tensor([1.0]), torch.tensor([1.0])]
    total = merge_tensor("ties", [BASE[:1] + x for x in d], [1.0] * 3, base=BASE[:1], density=1.0)
    frequency = merge_tensor(
        "ties", [BASE[:1] + x for x in d], [1.0] * 3, base=BASE[:1], density=1.0, majority_sign_method="frequency"
    )
    torch.testing.assert_close(total, BASE[:1] - 4.0)  # the sum (-2) is negative
    torch.testing.assert_close(frequency, BASE[:1] + 1.0)  # two of three are positive
    trimmed = merge_tensor("ties", [BASE + D1], [1.0], base=BASE, density=0.5)  # keeps the 2 largest |d|
    torch.testing.assert_close(trimmed, BASE + torch.tensor([3.0, 0.0, 2.0, 0.0]))


@pytest.mark.parametrize("merge", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales_so_the_expectation_is_the_undropped_merge(merge):
    torch.manual_seed(0)
    base, delta = torch.zeros(64), torch.randn(64)
    one = merge_tensor(merge, [base + delta], [1.0], base=base, density=0.25)
    kept = one != 0
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(one[kept], delta[kept] / 0.25)  # kept entries are rescaled by 1 / density
    draws = torch.stack([merge_tensor(merge, [base + delta], [1.0], base=base, density=0.25) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), delta, atol=0.15, rtol=0.0)


def test_slerp_endpoints_norm_and_parallel_fallback():
    e1, e2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(slerp(e1, e2, 0.0), e1)
    torch.testing.assert_close(slerp(e1, e2, 1.0), e2)
    mid = slerp(e1, e2, 0.5)
    torch.testing.assert_close(mid, (e1 + e2) / 2**0.5)  # on the circle: norm 1, where lerp gives 0.707
    assert mid.norm() == pytest.approx(1.0) and torch.lerp(e1, e2, 0.5).norm() == pytest.approx(0.5**0.5)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    b = b / b.norm() * a.norm()
    for t in (0.2, 0.7):  # equal norms stay equal all along the arc
        assert slerp(a, b, t).norm() == pytest.approx(a.norm().item(), rel=1e-5)
    torch.testing.assert_close(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: linear interpolation
    torch.testing.assert_close(merge_tensor("slerp", [a, b], [], slerp_t=0.0), a)


def test_task_vector_merges_need_the_base_tensor():
    with pytest.raises(ValueError, match="needs the base tensor"):
        merge_tensor("ties", [BASE, BASE], [1.0, 1.0])


def test_weights_default_to_an_average_for_linear_and_to_one_for_task_vectors():
    assert MergeMethod(merge="linear", models=["a", "b", "c", "d"]).model_weights() == [0.25] * 4
    assert MergeMethod(merge="linear", models=["a", "b"], weights=[3, 1]).model_weights() == [0.75, 0.25]
    assert MergeMethod(merge="linear", models=["a", "b"], weights=[3, 1], normalize=False).model_weights() == [3, 1]
    assert MergeMethod(merge="ties", models=["a", "b"]).model_weights() == [1.0, 1.0]
    assert MergeMethod(merge="slerp", models=["a", "b"], slerp_t=0.25).model_weights() == [0.75, 0.25]


@pytest.mark.parametrize(
    "fields,key",
    [
        (dict(merge="avg"), "method.merge"),
        (dict(density=0.0), "method.density"),
        (dict(slerp_t=1.5), "method.slerp_t"),
        (dict(merge="slerp", models=["a", "b", "c"]), "method.models"),
        (dict(merge="slerp", models=["a", "b"], weights=[1, 1]), "method.weights"),
        (dict(models=["a", "b"], weights=[1.0]), "method.weights"),
        (dict(merge="linear", models=["a", "b"], weights=[1, -1]), "method.weights"),
        (dict(majority_sign_method="mean"), "method.majority_sign_method"),
        (dict(dtype="int8"), "method.dtype"),
    ],
)
def test_bad_method_values_name_their_key(fields, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        MergeMethod(**fields).check("method")


def test_shard_writer_splits_by_size_and_writes_an_index(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=100)
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each: two per shard
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 200 and len(index["weight_map"]) == 5
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), framework="pt") as handle:
            assert torch.equal(handle.get_tensor(name), tensors[name])
    assert not list(tmp_path.glob("*.tmp"))

    single = ShardWriter(tmp_path / "one", max_bytes=10**6)
    (tmp_path / "one").mkdir()
    single.add("t", torch.ones(3))
    assert [f.name for f in single.close()] == ["model.safetensors"]
