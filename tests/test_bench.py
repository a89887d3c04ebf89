"""`nla-lens bench --quick` runs end to end on tiny models and prints every ratio line.

Timings are not asserted: on a shared CI machine they measure the neighbours as much as the code.
"""

from __future__ import annotations

import re

import torch
from conftest import NEEDS_TL3

from nla_lens.cli import main

pytestmark = NEEDS_TL3  # the bench measures the streaming HookedTransformer loader and decoder


def test_quick_bench_prints_every_ratio(capsys):
    threads = torch.get_num_threads()
    try:  # one thread: on a busy machine, torch's worker threads wait on each other
        assert main(["bench", "--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    ratio = r"\d+\.\d+x"
    for loader in ("AV nla_lens", "AV HF from_pretrained", "AV TL from HF model", "AR nla_lens"):
        for dtype in ("bf16", "fp32"):
            assert re.search(rf"{loader}.*-> {dtype} model\)\s+{ratio}", out), (loader, dtype, out)
    assert len(re.findall(rf"verbalize batch .* -> {ratio}", out)) == 2, out
    assert re.search(rf"injection hook overhead.* {ratio}", out), out
    assert re.search(rf"AR reconstruct .* -> {ratio}", out), out
    # Same weights, same inputs, greedy: nla_lens and HF emit the same tokens.
    assert re.findall(r"identical tokens: (\d+)/(\d+)", out) == [("1", "1"), ("4", "4")], out
    # The Gemma-3-shaped section (issue #13): memory of both layouts, verbalize against HF generate.
    for layout in ("text-only", "multimodal"):
        for dtype in ("bf16", "fp32"):
            assert re.search(rf"AV nla_lens, {layout} \(bf16 file -> {dtype} model\)\s+{ratio} loaded, {ratio} text",
                             out), (layout, dtype, out)
    assert re.findall(rf"Gemma verbalize, batch .* -> {ratio} \(rows with the same tokens as HF: (\d+)/(\d+)\)",
                      out) == [("1", "1"), ("4", "4")], out
