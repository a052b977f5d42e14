"""Imported weights are checked: non-finite values and wrong dtypes are named, and a file
that is not a readable state dict (not safetensors, truncated, not a zip, pickled code, not
a mapping of tensors) is refused with one message naming it. Exports refuse non-finite
weights, and a failed save leaves no file behind.

Oracles: the tensors and bytes each test corrupts itself, and the files it writes.
"""

from __future__ import annotations

import json
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from megalodon_flax.megalodon import convert
from megalodon_flax.megalodon.convert import ConversionError
from megalodon_flax.megalodon.state_dict_layout import expected_shapes
from megalodon_flax.training import conversion
from tests.factories import tiny_megalodon_config, tiny_train_config

CONFIG = tiny_megalodon_config(swiglu=True)


def _state_dict(config=CONFIG, fmt: str = "hf", seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict of `fmt` for `config` that loads cleanly: random weights, zero buffers,
    the tied head equal to the embedding, the rope frequencies the config implies."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in expected_shapes(config, fmt).items():
        out[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if key.endswith(("prior_count", "prior_mean", "prior_logv")):
            out[key] = np.zeros(shape, np.int64 if key.endswith("count") else np.float32)
    if fmt == "hf" and config.tied:
        out["lm_head.weight"] = out["model.embed.weight"]
    if fmt == "upstream":
        from megalodon_flax.layers.rotary import rope_frequencies

        out["rope.freqs"] = np.asarray(rope_frequencies(config.head_dim, 10000.0), np.float32)
    return out


def test_clean_state_dicts_load():
    convert.from_state_dict(_state_dict(), CONFIG, "hf")
    upstream = tiny_megalodon_config(bias_topology="upstream", tie_policy="explicit")
    convert.from_state_dict(_state_dict(upstream, "upstream"), upstream, "upstream")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_a_non_finite_tensor_is_named(bad, dtype):
    sd = _state_dict()
    key = "model.layers.1.attn.cema.delta"
    value = sd[key].astype(dtype)
    value.reshape(-1)[[3, 7]] = bad
    sd[key] = value
    sd["model.layers.0.ffn.fc2.bias"][0] = np.nan
    with pytest.raises(ConversionError) as info:
        convert.from_state_dict(sd, CONFIG, "hf")
    message = str(info.value)
    kind = "NaN" if np.isnan(bad) else "inf"
    assert f"non-finite values: {key} holds 2 {kind} of {value.size} values" in message
    assert "non-finite values: model.layers.0.ffn.fc2.bias holds 1 NaN" in message
    assert "2 problem(s)" in message


def test_wrong_dtypes_are_named():
    sd = _state_dict()
    sd["model.layers.0.attn.wz.weight"] = sd["model.layers.0.attn.wz.weight"].astype(np.float16)
    sd["model.layers.0.attn.wv.bias"] = sd["model.layers.0.attn.wv.bias"].astype(np.int32)
    sd["model.norm.bias"] = sd["model.norm.bias"].astype(np.complex64)
    with pytest.raises(ConversionError) as info:
        convert.from_state_dict(sd, CONFIG, "hf")
    for key, dtype in (
        ("model.layers.0.attn.wz.weight", "float16"),
        ("model.layers.0.attn.wv.bias", "int32"),
        ("model.norm.bias", "complex64"),
    ):
        assert f"dtype mismatch: {key} is {dtype}, expected float32 or bfloat16" in str(info.value)
    upstream = tiny_megalodon_config(bias_topology="upstream", tie_policy="explicit")
    sd = _state_dict(upstream, "upstream")
    sd["layers.0.mega.timenorm.prior_count"] = np.zeros((), np.float32)
    with pytest.raises(ConversionError, match=r"prior_count is float32, expected an integer"):
        convert.from_state_dict(sd, upstream, "upstream")


def test_export_refuses_non_finite_parameters():
    params = convert.from_state_dict(_state_dict(), CONFIG, "hf")
    params["model"]["layers_1"]["ffn"]["fc3"]["kernel"][0, 0] = np.inf
    with pytest.raises(ConversionError, match=r"model/layers_1/ffn/fc3/kernel holds 1 inf"):
        convert.to_state_dict(params, CONFIG, "hf")


def _truncated(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _bad_safetensors(tmp_path, case: str) -> str:
    path = str(tmp_path / "model.safetensors")
    if case == "random_bytes":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(4096))
    elif case == "empty":
        open(path, "wb").close()
    elif case == "truncated":
        save_file(_state_dict(), path)
        _truncated(path)
    elif case == "text":
        with open(path, "w") as f:
            f.write('{"model.embed.weight": [1, 2, 3]}')
    return path


@pytest.mark.parametrize("case", ["random_bytes", "empty", "truncated", "text"])
def test_an_unreadable_safetensors_file_is_named(tmp_path, case):
    path = _bad_safetensors(tmp_path, case)
    with pytest.raises(ConversionError) as info:
        convert.load_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a readable safetensors file (")
    assert "\n" not in message
    # The directory holding it is named the same way.
    with pytest.raises(ConversionError, match="is not a readable safetensors file"):
        convert.load_state_dict(str(tmp_path))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "case", ["not_a_zip", "truncated", "pickled_code", "a_list", "not_tensors"]
)
def test_an_unreadable_torch_file_is_named(tmp_path, case):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "model.bin")
    if case == "not_a_zip":
        with open(path, "wb") as f:
            f.write(b"definitely not a torch file")
    elif case == "truncated":
        torch.save({k: torch.from_numpy(v) for k, v in _state_dict().items()}, path)
        _truncated(path)
    elif case == "pickled_code":
        with open(path, "wb") as f:
            pickle.dump({"x": _Payload()}, f)
    elif case == "a_list":
        torch.save([torch.zeros(2)], path)
    else:
        torch.save({"model.embed.weight": torch.zeros(2), "step": 3}, path)
    with pytest.raises(ConversionError) as info:
        convert.load_state_dict(path)
    message = str(info.value)
    assert message.startswith(path) and "\n" not in message
    expected = {
        "a_list": "holds a list, not a state dict",
        "not_tensors": "'step' is a int, not a tensor",
    }.get(case, "is not a readable PyTorch state dict (")
    assert expected in message


def test_directories_and_shards_load(tmp_path):
    sd = _state_dict()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index})
    )
    loaded = convert.load_state_dict(str(tmp_path))
    assert sorted(loaded) == keys
    for key in keys:
        np.testing.assert_array_equal(loaded[key], sd[key])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is a directory without any of"):
        convert.load_state_dict(str(tmp_path / "empty"))


def test_import_of_a_nan_file_names_the_tensor_and_writes_nothing(tmp_path):
    config = tiny_train_config()
    sd = _state_dict(config.model)
    sd["model.layers.0.attn.cema.omega"][5] = np.nan
    path = str(tmp_path / "nan.safetensors")
    save_file(sd, path)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.attn\.cema\.omega holds 1 NaN"):
        conversion.import_run(path, "hf", config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.numpy

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert.save_state_dict(_state_dict(), str(tmp_path / "model.safetensors"))
    assert os.listdir(tmp_path) == []
