"""Tests of the Markdown run report (megalodon_flax.report).

Oracle: synthetic event files written here with known values; the tables are parsed back.
"""

from __future__ import annotations

import math

from megalodon_flax.report import BPB_PLOT, write_report
from megalodon_flax.run_summary import load_run
from tests import helpers


def test_stream_columns_appear_when_logged(tmp_path) -> None:
    workdir = tmp_path / "s1"
    helpers.write_events(
        workdir,
        {4: {"eval_stream_loss": 0.5, "eval_stream_bits_per_byte": 0.75, "eval_loss": 0.625}},
    )
    out = write_report([load_run(workdir)], tmp_path / "r.md")
    tables = helpers.markdown_tables(out.read_text())
    assert tables["Summary"][0]["final stream bpb"] == "0.7500 (step 4)"
    assert tables["Streaming validation by step"] == [
        {"step": "4", "s1 stream loss": "0.5000", "s1 stream bpb": "0.7500"}
    ]
    assert math.isclose(load_run(workdir).final("eval_loss")[1], 0.625)
    assert (tmp_path / "plots" / BPB_PLOT).stat().st_size > 0
