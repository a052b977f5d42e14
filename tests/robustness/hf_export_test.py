"""`convert --to=hf` writes what megalodon-hf's `MegalodonForCausalLM.from_pretrained` loads.

megalodon-hf (PyTorch + transformers) is not installable here, so the oracle is its source,
transcribed below from pszemraj/megalodon-hf @ 082db4ba (`src/megalodon/
configuration_megalodon.py` and `modeling_megalodon.py`):

* `HF_INIT_FIELDS`: every argument of its `MegalodonConfig.__init__` with type and default;
  `HF_SET_ATTRIBUTES`: what that `__init__` sets itself (written by `save_pretrained`);
  `TRANSFORMERS_KEYS`: the `PretrainedConfig` keys `from_pretrained` reads;
* `hf_accepts`: the checks of its `__init__` (and `nn.Embedding`'s `padding_idx` rule);
* `hf_state_dict_shapes`: the parameters its modules create from a config (spec §8.1),
  which `from_pretrained` fills from `model.safetensors` by name: a key the file lacks would
  be left randomly initialized, so the file's keys and shapes must be exactly these.

transformers also refuses safetensors whose metadata `format` is not pt/tf/flax/mlx.
Every exported directory is then read back with `from_hf_config` alone and must give the
same logits as the model it came from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import NoneType

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon import convert, hf_config
from megalodon_flax.megalodon.config import MegalodonConfig
from megalodon_flax.megalodon.model import MegalodonLM
from megalodon_flax.megalodon.state_dict_layout import expected_shapes
from megalodon_flax.training import checkpointing, conversion
from tests import helpers
from tests.factories import tiny_megalodon_config, tiny_train_config

pytestmark = pytest.mark.usefixtures("highest_precision")

FLOAT = (int, float)  # a JSON number; bool is excluded separately
HF_INIT_FIELDS: dict[str, tuple[tuple[type, ...], object]] = {
    "vocab_size": ((int,), 32_000),
    "model_dim": ((int,), 1024),
    "num_layers": ((int,), 12),
    "num_heads": ((int,), 1),
    "z_dim": ((int,), 256),
    "value_dim": ((int,), 2048),
    "ffn_hidden_dim": ((int,), 2560),
    "cema_ndim": ((int,), 16),
    "chunk_size": ((int,), 2048),
    "max_cache_len": ((int, NoneType), None),
    "cache_unbounded": ((bool,), False),
    "norm_num_groups": ((int,), 32),
    "dropout": (FLOAT, 0.0),
    "attention_dropout": (FLOAT, 0.0),
    "hidden_dropout": (FLOAT, 0.0),
    "swiglu": ((bool,), False),
    "rescale_nffn": ((bool,), False),
    "scale_emb": ((bool,), False),
    "share_emb": ((bool,), False),
    "efficient_attn": ((str, NoneType), None),
    "norm_affine": ((bool,), True),
    "norm_eps": (FLOAT, 1e-5),
    "init_mode": ((str,), "he"),
    "max_positions": ((int,), 1_000_000),
    "rope_base": ((*FLOAT, NoneType), None),
    "output_size": ((int,), -1),
    "pad_token_id": ((int,), 0),
    "bos_token_id": ((int,), 1),
    "eos_token_id": ((int,), 2),
    "gradient_checkpointing": ((bool,), False),
}
HF_INIT_MODES = ("gaussian", "xavier", "he", "bert", "none")  # its `InitMode` literal
HF_SET_ATTRIBUTES = {"num_attention_heads": (int,), "is_decoder": (bool,), "use_cache": (bool,)}
TRANSFORMERS_KEYS = {
    "model_type": (str,),
    "architectures": (list,),
    "torch_dtype": (str,),
    "tie_word_embeddings": (bool,),
}
CASES = {
    "tied_swiglu": dict(swiglu=True),
    "untied_wider_head": dict(output_size=80, rope_base=5000.0),
    "no_affine_rescaled": dict(norm_affine=False, rescale_nffn=True, scale_emb=True),
    "upstream_topology_half_split": dict(
        bias_topology="upstream", rope_layout="half_split", swiglu=True, pad_token_id=3
    ),
}


# --------------------------------------------------------------------------- the oracle
def _type_ok(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def hf_resolved(config_json: dict) -> dict:
    """What megalodon-hf's `MegalodonConfig(**config_json)` holds: its defaults, the file,
    and `max_cache_len` resolved the way its `__init__` does."""
    out = {name: default for name, (_, default) in HF_INIT_FIELDS.items()}
    out.update({k: v for k, v in config_json.items() if k in HF_INIT_FIELDS})
    if out["cache_unbounded"]:
        out["max_cache_len"] = None
    elif out["max_cache_len"] is None:
        out["max_cache_len"] = out["chunk_size"]
    return out


def hf_accepts(c: dict) -> list[str]:
    """The refusals of megalodon-hf's `MegalodonConfig.__init__` (and `nn.Embedding`)."""
    problems = []
    for name in ("vocab_size", "model_dim", "num_layers", "num_heads", "z_dim", "value_dim"):
        problems += [name] if c[name] <= 0 else []
    for name in ("ffn_hidden_dim", "cema_ndim", "chunk_size", "max_positions"):
        problems += [name] if c[name] <= 0 else []
    problems += ["rope_base"] if c["rope_base"] is not None and c["rope_base"] <= 0 else []
    problems += ["z_dim % num_heads"] if c["z_dim"] % c["num_heads"] else []
    problems += ["value_dim % num_heads"] if c["value_dim"] % c["num_heads"] else []
    cache = c["max_cache_len"]
    problems += ["max_cache_len"] if cache is not None and cache <= 0 else []
    problems += ["model_dim % norm_num_groups"] if c["model_dim"] % c["norm_num_groups"] else []
    problems += ["norm_eps"] if c["norm_eps"] <= 0 else []
    for name in ("dropout", "attention_dropout", "hidden_dropout"):
        problems += [name] if not 0.0 <= c[name] <= 1.0 else []
    problems += ["init_mode"] if c["init_mode"] not in HF_INIT_MODES else []
    problems += ["efficient_attn"] if c["efficient_attn"] is not None else []
    v = c["vocab_size"]
    problems += ["pad_token_id (padding_idx)"] if not -v <= c["pad_token_id"] < v else []
    return problems


def hf_state_dict_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The parameters `MegalodonForCausalLM(config)` creates (its modules, spec §8.1)."""
    d, z, e, f, n, v = (c[k] for k in ("model_dim", "z_dim", "value_dim", "ffn_hidden_dim",
                                        "cema_ndim", "vocab_size"))  # fmt: skip
    out = {"model.embed.weight": (v, d)}
    for i in range(c["num_layers"]):
        p = f"model.layers.{i}."
        if c["norm_affine"]:
            out |= {p + "attn.timenorm.weight": (d,), p + "attn.timenorm.bias": (d,)}
            out |= {p + "attn.rmsnorm.gamma": (d,)}
            out |= {p + "ffn.norm.weight": (d,), p + "ffn.norm.bias": (d,)}
        out |= {p + "attn.cema.alpha": (d, n, 1), p + "attn.cema.delta": (d, n, 1)}
        out |= {p + "attn.cema.theta": (d, 1, 1), p + "attn.cema.omega": (d,)}
        out |= {p + "attn.cema.gamma_real": (d, n), p + "attn.cema.gamma_imag": (d, n)}
        out |= {p + "attn.gamma": (2, z), p + "attn.beta": (2, z)}
        linears = {"attn.wz": (z, d), "attn.wv": (e, d), "attn.wr": (e, d)}
        linears |= {"attn.wh1": (d, d), "attn.wh2": (d, e), "ffn.fc1": (f, d), "ffn.fc2": (d, f)}
        if c["swiglu"]:
            linears["ffn.fc3"] = (f, d)
        for name, shape in linears.items():
            out |= {f"{p}{name}.weight": shape, f"{p}{name}.bias": (shape[0],)}
    if c["norm_affine"]:
        out |= {"model.norm.weight": (d,), "model.norm.bias": (d,)}
    width = v if c["output_size"] in (-1, None) else c["output_size"]
    out["lm_head.weight"] = (width, d)
    return out


# --------------------------------------------------------------------------- helpers
def _params(config: MegalodonConfig, seed: int = 0) -> dict:
    """Initialized parameters plus noise on everything megalodon-hf can hold (not the
    constant FFN rescale, not the TimestepNorm affine that it drops with norm_affine=False)."""
    model = MegalodonLM(config)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        names = {getattr(k, "key", None) for k in path}
        frozen = "alpha" in names and "ffn" in names
        frozen |= (
            not config.norm_affine and bool({"timenorm", "norm"} & names) and "ffn" not in names
        )
        noise = 0.0 if frozen else 0.1 * rng.standard_normal(leaf.shape)
        out.append((np.asarray(leaf, np.float32) + noise).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def _logits(config: MegalodonConfig, params: dict) -> np.ndarray:
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 2 * config.chunk_size + 3))
    logits, _ = MegalodonLM(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    return np.asarray(logits)


def _export(config: MegalodonConfig, params: dict, directory, dtype: str = "float32") -> None:
    state_dict = convert.to_state_dict(params, config, "hf", dtype)
    metadata = {"format": "pt", "megalodon_flax_layout": "hf"}
    convert.save_hf_directory(
        state_dict, hf_config.to_hf_config(config, dtype), str(directory), metadata
    )


def _read_dir(directory) -> tuple[dict, dict, dict[str, np.ndarray]]:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config_json = json.load(f)
    weights = os.path.join(directory, "model.safetensors")
    with safe_open(weights, framework="np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return config_json, metadata, tensors


def _check_against_megalodon_hf(config: MegalodonConfig, directory, dtype: str) -> None:
    config_json, metadata, tensors = _read_dir(directory)
    assert metadata["format"] == "pt"  # transformers: pt, tf, flax or mlx only
    known = {**{k: t for k, (t, _) in HF_INIT_FIELDS.items()}, **HF_SET_ATTRIBUTES}
    known |= TRANSFORMERS_KEYS
    unknown = sorted(set(config_json) - set(known))
    assert not unknown, f"keys megalodon-hf does not know: {unknown}"
    wrong = {k: v for k, v in config_json.items() if not _type_ok(v, known[k])}
    assert not wrong, f"values of the wrong type: {wrong}"
    assert config_json["model_type"] == "megalodon"
    assert config_json["architectures"] == ["MegalodonForCausalLM"]
    assert config_json["torch_dtype"] == dtype
    resolved = hf_resolved(config_json)
    assert hf_accepts(resolved) == []
    assert config_json["num_attention_heads"] == resolved["num_heads"]
    # The values are ours, field by field (megalodon-hf names = MegalodonConfig names).
    for name in set(HF_INIT_FIELDS) & {f for f in config.to_dict()}:
        assert resolved[name] == getattr(config, name), name
    assert resolved["max_cache_len"] == config.chunk_size  # our chunk-local KV cache
    assert resolved["gradient_checkpointing"] == (config.remat_policy != "none")
    width = resolved["vocab_size"] if resolved["output_size"] == -1 else resolved["output_size"]
    assert config_json["tie_word_embeddings"] == (width == resolved["vocab_size"]) == config.tied
    # Exactly the parameters megalodon-hf builds from this config.json, nothing left out.
    assert {k: tuple(v.shape) for k, v in tensors.items()} == hf_state_dict_shapes(resolved)
    assert {str(v.dtype) for v in tensors.values()} <= {"float32", "bfloat16"}
    if config.tied:
        np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["model.embed.weight"])


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_is_what_megalodon_hf_loads_and_reads_back_as_the_same_model(tmp_path, case):
    config = tiny_megalodon_config(**CASES[case])
    params = _params(config)
    directory = tmp_path / "hf"
    _export(config, params, directory)
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    _check_against_megalodon_hf(config, directory, "float32")

    # config.json alone rebuilds the model: same megalodon-hf fields, same logits.
    config_json, _, _ = _read_dir(directory)
    again = hf_config.from_hf_config(config_json)
    for name in set(HF_INIT_FIELDS) & set(config.to_dict()):
        assert getattr(again, name) == getattr(config, name), name
    assert hf_config.model_differences(again, config) == []
    params_again = convert.from_state_dict(convert.load_state_dict(str(directory)), again, "hf")
    np.testing.assert_allclose(
        _logits(again, params_again), _logits(config, params), rtol=0, atol=2e-5
    )


def test_bfloat16_export_says_so_and_keeps_the_cema_gamma_float32(tmp_path):
    config = tiny_megalodon_config(swiglu=True)
    _export(config, _params(config), tmp_path / "hf", "bfloat16")
    _check_against_megalodon_hf(config, tmp_path / "hf", "bfloat16")
    _, _, tensors = _read_dir(tmp_path / "hf")
    assert str(tensors["model.layers.0.attn.wz.weight"].dtype) == "bfloat16"
    # megalodon-hf forces gamma_real/imag back to float32 after any dtype change.
    assert tensors["model.layers.1.attn.cema.gamma_imag"].dtype == np.float32


def test_missing_fields_take_megalodon_hf_defaults_and_foreign_configs_are_refused():
    defaults = hf_config.from_hf_config({"model_type": "megalodon"})
    for name in set(HF_INIT_FIELDS) & set(defaults.to_dict()):
        assert getattr(defaults, name) == HF_INIT_FIELDS[name][1], name
    saved = {  # what save_pretrained adds around the fields: ignored
        "model_type": "megalodon",
        "transformers_version": "4.57.1",
        "return_dict": True,
        "init_mode": "none",  # not an initializer here; loaded weights make it moot
        **{k: v for k, v in tiny_megalodon_config().to_dict().items() if k in HF_INIT_FIELDS},
    }
    assert (
        hf_config.model_differences(hf_config.from_hf_config(saved), tiny_megalodon_config()) == []
    )
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        hf_config.from_hf_config({"model_type": "llama"})
    with pytest.raises(ConfigError, match="efficient_attn"):
        hf_config.from_hf_config({"model_type": "megalodon", "efficient_attn": "fused"})
    with pytest.raises(ConfigError, match=r"x\.json: .*z_dim"):
        hf_config.from_hf_config({"model_type": "megalodon", "z_dim": 10, "num_heads": 3}, "x.json")
    with pytest.raises(ConfigError, match="pad_token_id=64"):
        hf_config.to_hf_config(tiny_megalodon_config(pad_token_id=64))


def test_import_refuses_a_directory_that_describes_another_model(tmp_path):
    config = tiny_train_config().model  # byte-level: 256 ids
    shapes = expected_shapes(config, "hf")
    state_dict = {k: np.full(shape, 0.01, np.float32) for k, shape in shapes.items()}
    convert.save_hf_directory(state_dict, hf_config.to_hf_config(config), str(tmp_path / "hf"))
    other = tiny_train_config(model={"model_dim": 32, "swiglu": not config.swiglu})
    with pytest.raises(convert.ConversionError, match=r"model_dim: 16 vs 32; swiglu: "):
        conversion.import_run(str(tmp_path / "hf"), "hf", other, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_export_into_an_existing_directory(tmp_path, monkeypatch):
    config = tiny_megalodon_config()
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "tokenizer.json").write_text("{}")
    (directory / "config.json").write_text('{"model_type": "old"}')
    state_dict = convert.to_state_dict(_params(config), config, "hf")
    replaced = convert.save_hf_directory(state_dict, hf_config.to_hf_config(config), str(directory))
    assert replaced == ["config.json"]
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((directory / "config.json").read_text())["model_type"] == "megalodon"

    # A failed write (a full disk) leaves the directory as it was and no temporary folder.
    before = {p: p.read_bytes() for p in directory.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.json, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert.save_hf_directory(state_dict, hf_config.to_hf_config(config), str(directory))
    with pytest.raises(OSError, match="No space left"):
        convert.save_hf_directory(state_dict, {}, str(tmp_path / "new"))
    assert {p: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    monkeypatch.undo()

    (directory / "pytorch_model.bin").write_bytes(b"")  # transformers would load this instead
    with pytest.raises(convert.ConversionError, match=r"pytorch_model\.bin"):
        convert.save_hf_directory(state_dict, {}, str(directory))
    (tmp_path / "file").write_text("")
    with pytest.raises(convert.ConversionError, match="is a file"):
        convert.save_hf_directory(state_dict, {}, str(tmp_path / "file"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megalodon_flax.cli.convert", *args],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_convert_cli_exports_and_imports_a_directory(tmp_path):
    """A workdir imported from an HF directory exports (CLI) to a directory that passes the
    megalodon-hf checks, holds the same tensors, and imports back (CLI) to the same weights."""
    config = tiny_train_config(model={"swiglu": True, "output_size": 300})
    source = tmp_path / "source"
    _export(config.model, _params(config.model), source)
    conversion.import_run(str(source), "hf", config, str(tmp_path / "run"))

    out = tmp_path / "exported"
    proc = _cli(f"--workdir={tmp_path / 'run'}", "--to=hf", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to the directory {out}" in proc.stdout
    _check_against_megalodon_hf(config.model, out, "float32")
    _, metadata, tensors = _read_dir(out)
    assert metadata["step"] == "0" and metadata["megalodon_flax_layout"] == "hf"
    _, _, original = _read_dir(source)
    for key, value in original.items():
        np.testing.assert_allclose(tensors[key], value, rtol=0, atol=1e-7, err_msg=key)

    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from megalodon_flax.training.checkpointing import load_run_config\n\n\n"
        "def get_config():\n"
        f"    return load_run_config({str(tmp_path / 'run')!r}).to_config_dict()\n"
    )
    args = [f"--workdir={tmp_path / 'back'}", "--from=hf", f"--in={out}", f"--config={config_file}"]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7),
        checkpointing.restore_run(tmp_path / "back").params,
        checkpointing.restore_run(tmp_path / "run").params,
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_megalodon_hf_from_pretrained_loads_the_export(tmp_path, case):
    """Where megalodon-hf is installed (not here): its own loader reads every tensor of the
    export and computes our logits (its formulas: `hf_compatible`)."""
    torch = pytest.importorskip("torch")
    megalodon_hf = pytest.importorskip("megalodon")
    if not hasattr(megalodon_hf, "MegalodonForCausalLM"):
        pytest.skip("the installed `megalodon` package is not megalodon-hf")
    from megalodon_flax.megalodon.config import hf_compatible

    config = tiny_megalodon_config(**CASES[case])
    params = _params(config)
    _export(config, params, tmp_path / "hf")
    model, info = megalodon_hf.MegalodonForCausalLM.from_pretrained(
        str(tmp_path / "hf"), output_loading_info=True
    )
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == []
    tokens = np.random.default_rng(1).integers(1, config.vocab_size, (2, 19))
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(tokens), use_cache=False).logits.numpy()
    ours, _ = MegalodonLM(hf_compatible(config)).apply(
        {"params": params}, jnp.asarray(tokens, jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=5e-5)
