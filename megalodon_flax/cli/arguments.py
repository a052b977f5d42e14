"""The flags of the `convert`, `compare` and `evaluate` commands and their checks.

Every check runs when the flags are parsed, before anything is loaded; a bad argument ends
the program with one line naming the flag. Each command module defines its flags with the
function here (`define_flags`), on absl's global `FLAGS` or on a `FlagValues` of a test.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from megalodon_flax import report
from megalodon_flax.cli import common
from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon import convert
from megalodon_flax.megalodon.state_dict_layout import FORMATS
from megalodon_flax.training import checkpointing
from megalodon_flax.training.config import TrainConfig

FLAGS = flags.FLAGS

_IMPORT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


def _one_direction(values: dict) -> str | None:
    if (values["to"] is None) == (values["from"] is None):
        return "give exactly one of --to (export) or --from (import)"
    return None


def _export_problem(values: dict) -> str | None:
    fmt, out = values["to"], values["out"]
    if fmt is None:
        given = [f"--{k}" for k in ("out", "dtype") if values[k] is not None]
        return f"{' and '.join(given)} only apply to an export (--to)" if given else None
    if out is None:
        return "--to needs --out"
    if fmt == "hf":
        if out.endswith(_IMPORT_SUFFIXES):
            return (
                f"--to=hf writes a directory (model.safetensors + config.json) that "
                f"megalodon-hf's from_pretrained loads; give a directory, not {out}"
            )
        return common.output_path_problem(out, directory=True)
    if not out.endswith(".safetensors"):
        return f"--to={fmt} writes a .safetensors file; --out={out} has another extension"
    return common.output_path_problem(out)


def _import_problem(values: dict) -> str | None:
    fmt, in_path, config = values["from"], values["in"], values["config"]
    if fmt is None:
        given = [f"--{k}" for k in ("in", "config") if values[k] is not None]
        return f"{' and '.join(given)} only apply to an import (--from)" if given else None
    if in_path is None or config is None:
        return "--from needs --in and --config"
    if os.path.isdir(in_path):
        try:
            in_path = convert.weights_file(in_path)
        except FileNotFoundError as err:
            return str(err)
    elif not in_path.endswith(_IMPORT_SUFFIXES):
        return f"--in={in_path} is not a {'/'.join(_IMPORT_SUFFIXES)} file or a model directory"
    problem = common.readable_file_problem(in_path)
    if problem:
        return problem
    try:
        TrainConfig.from_mapping(config)
    except ConfigError as err:
        return f"--config: {err}"
    except OSError as err:  # config_flags defers a failed load to the first access
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return f"--config cannot be loaded: {lines[-1] if lines else err}"
    return None


def _workdir_problem(values: dict) -> str | None:
    workdir = values["workdir"]
    if workdir is None:
        return None
    if values["to"] is not None:
        return common.existing_dir_problem(workdir)
    if values["from"] is None:
        return None
    try:
        checkpointing.validate_workdir(workdir)
    except ValueError as err:
        return str(err)
    checkpoints = os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR)
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        return f"{workdir} already holds checkpoints; choose a new --workdir"
    return None


def define_convert_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines this program's flags and their checks on `fv` (tests pass their own)."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Training workdir (read with --to, created with --from).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "to", None, FORMATS, "Export the workdir's newest weights to this layout.", flag_values=fv
    )
    flags.DEFINE_string(
        "out",
        None,
        "--to=hf: output directory (model.safetensors + config.json); --to=upstream: output "
        ".safetensors file. Its folder must exist.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "dtype",
        None,
        ["float32", "bfloat16"],
        "Export dtype (with --to; default float32).",
        flag_values=fv,
    )
    flags.DEFINE_enum("from", None, FORMATS, "Import a state dict of this layout.", flag_values=fv)
    flags.DEFINE_string(
        "in",
        None,
        ".safetensors/.pt/.bin/.pth file or Hugging Face model directory to import (with --from).",
        flag_values=fv,
    )
    config_flags.DEFINE_config_file(
        "config", None, "Config file of the run to create (with --from).", flag_values=fv
    )
    flags.mark_flags_as_required(["workdir"], flag_values=fv)
    common.check_flags(["to", "from"], _one_direction, fv)
    common.check_flags(["to", "out", "dtype"], _export_problem, fv)
    common.check_flags(["from", "in", "config"], _import_problem, fv)
    common.check_flags(["workdir", "to", "from"], _workdir_problem, fv)


def _workdirs_problem(workdirs: list[str] | None) -> str | None:
    if workdirs is None:
        return None
    if not workdirs or any(not w.strip() for w in workdirs):
        return "give one or more non-empty workdirs, comma-separated"
    problems = [p for p in map(common.existing_dir_problem, workdirs) if p]
    return "; ".join(problems) or None


def _names_problem(values: dict) -> str | None:
    names, workdirs = values["names"], values["workdirs"]
    if names is None or workdirs is None:
        return None
    if len(names) != len(workdirs):
        return f"{len(names)} --names for {len(workdirs)} --workdirs; give one name per workdir"
    if any(not n.strip() for n in names):
        return "--names: a name is empty"
    if len(set(names)) != len(names):
        return "--names must differ (they label the runs in tables and plots)"
    return None


def define_compare_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines this program's flags and their checks on `fv` (tests pass their own)."""
    flags.DEFINE_list(
        "workdirs", None, "Training workdirs (their event files), comma-separated.", flag_values=fv
    )
    flags.DEFINE_string("out", None, "Markdown file to write.", flag_values=fv)
    flags.DEFINE_string(
        "plots_dir", None, "Folder of the PNG plots (default: plots/ beside --out).", flag_values=fv
    )
    flags.DEFINE_string("title", report.DEFAULT_TITLE, "Heading of the report.", flag_values=fv)
    flags.DEFINE_string(
        "intro", None, "Markdown file whose text goes under the heading.", flag_values=fv
    )
    flags.DEFINE_list(
        "names", None, "Run labels, comma-separated (default: workdir names).", flag_values=fv
    )
    flags.DEFINE_list(
        "appendix",
        [],
        "Markdown files appended to the report in order (e.g. a context curve), comma-separated.",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdirs", "out"], flag_values=fv)
    common.check_flag("workdirs", _workdirs_problem, fv)
    common.check_flag("out", lambda p: common.output_path_problem(p, make_folders=True), fv)
    common.check_flag(
        "plots_dir",
        lambda p: common.output_path_problem(p, directory=True, make_folders=True),
        fv,
    )
    common.check_flag("intro", common.readable_file_problem, fv)
    common.check_flag("appendix", _appendix_problem, fv)
    common.check_flags(["names", "workdirs"], _names_problem, fv)


def _appendix_problem(paths: list[str]) -> str | None:
    for path in paths:
        problem = common.readable_file_problem(path)
        if problem:
            return problem
    return None


def _streams_problem(values: dict) -> str | None:
    max_bytes, num_streams = values["max_bytes"], values["num_streams"]
    if values["mode"] == "window":
        return None
    if max_bytes and num_streams and max_bytes // num_streams < 2:
        return f"--max_bytes={max_bytes} gives fewer than 2 bytes to each of {num_streams} streams"
    return None


def define_evaluate_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines this program's flags and their checks on `fv` (tests pass their own)."""
    flags.DEFINE_string(
        "workdir", None, "Training workdir (config.json + checkpoints/).", flag_values=fv
    )
    flags.DEFINE_enum(
        "split", "test", ["train", "validation", "test"], "Split to score.", flag_values=fv
    )
    flags.DEFINE_enum(
        "mode",
        "stream",
        ["stream", "window", "context"],
        "stream: state carried over the whole split; window: independent windows of "
        "seq_len + 1 bytes; context: bits per byte by position in the stream (Megalodon "
        "streams, a bounded-context model in sliding windows), with --also for more runs.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "also",
        [],
        "Context mode: more workdirs on the same curve, comma-separated.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "protocol",
        "both",
        ["exact", "upstream", "both"],
        "Context mode, a model that carries its state: exact carried statistics, the released "
        "code's protocol (statistics recomputed over the last 6 of every 8 chunks), or both.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "stride",
        0,
        "Context mode, a bounded-context model: bytes a window of seq_len advances (0 = half).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_string(
        "out_dir",
        None,
        "Context mode: folder for context_curve.json, .md and .png (default: print only).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "call_length",
        0,
        "Stream mode: tokens per call (0 = 4 chunks).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_streams",
        1,
        "Stream mode: contiguous streams scored as a batch.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_bytes",
        0,
        "Score only the first bytes of the split (0 = all, else at least 2).",
        lower_bound=0,
        flag_values=fv,
    )
    flags.mark_flags_as_required(["workdir"], flag_values=fv)
    common.check_flag("workdir", common.existing_dir_problem, fv)
    common.check_flag(
        "max_bytes",
        lambda n: "must be 0 (all) or at least 2 (one byte to predict)" if n == 1 else None,
        fv,
    )
    common.check_flags(["mode", "max_bytes", "num_streams"], _streams_problem, fv)
    common.check_flag("also", lambda dirs: _workdirs_problem(dirs) if dirs else None, fv)
    common.check_flag(
        "out_dir",
        lambda p: common.output_path_problem(p, directory=True, make_folders=True),
        fv,
    )
