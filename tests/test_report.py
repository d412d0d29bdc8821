"""The results chapter: regenerated from results/*.json only, and every number traceable."""
import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from fastmqa import bench, report

ROOT = Path(__file__).resolve().parent.parent
SUITES = [s for s in bench.SUITES if (ROOT / "results" / f"{s}.json").exists()]


def _leaves(obj, kind):
    """Every leaf value of a JSON object that is of `kind` (bools are not numbers here)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v, kind)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v, kind)
    elif isinstance(obj, kind) and not isinstance(obj, bool):
        yield obj


@pytest.mark.parametrize("suite", SUITES)
def test_results_schema(suite):
    bench.validate_results(json.loads((ROOT / "results" / f"{suite}.json").read_text()))


def test_schema_rejects_bad_rows():
    good = {"suite": "x", "device": "d", "torch": "t", "cuda": "c", "date": "now",
            "ceilings": {"copy_gbps": 1.0, "bf16_tflops": 1.0, "fp32_tflops": 1.0},
            "rows": [dict(impl="a", kind="prefill", dtype="float32", B=1, H=1, Sq=1, Skv=1, D=64, causal=False, ms=1.0, tflops=1.0)]}
    bench.validate_results(good)
    bad = json.loads(json.dumps(good))
    bad["rows"][0]["ms"] = -1
    with pytest.raises(ValueError, match="ms=-1"):
        bench.validate_results(bad)
    bad = json.loads(json.dumps(good))
    del bad["ceilings"]["copy_gbps"]
    with pytest.raises(ValueError, match="copy_gbps"):
        bench.validate_results(bad)


def test_chapter_regenerates_identically(tmp_path):
    if not (ROOT / "book" / "results.md").exists():
        pytest.skip("book/results.md not generated yet")
    for p in report.generate(tmp_path):
        rel = p.relative_to(tmp_path)
        assert (ROOT / "book" / rel).read_text() == p.read_text(), f"book/{rel} is not what results/*.json gives"


def test_every_number_in_the_chapter_is_in_the_json():
    page = ROOT / "book" / "results.md"
    if not page.exists():
        pytest.skip("book/results.md not generated yet")
    text = page.read_text()
    allowed, ratios = set(), set()
    for suite in SUITES:
        data = json.loads((ROOT / "results" / f"{suite}.json").read_text())
        vals = list(_leaves(data, (int, float)))
        allowed |= {str(v) for v in vals} | {report.ms(v) for v in vals}
        times = sorted({r["ms"] for r in data["rows"]} | set(data.get("other_gpu", {}).get("ms", {}).values()))
        ratios |= {f"{a / b:.2f}" for a, b in itertools.permutations(times, 2)} | {"1.00"}
    words = set()
    for suite in SUITES:
        words |= set(_leaves(json.loads((ROOT / "results" / f"{suite}.json").read_text()), str))
    checked = 0
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if not line.startswith("|") or set(line) <= set("|-"):
            continue
        if n + 1 < len(lines) and set(lines[n + 1]) <= set("|-") and "-" in lines[n + 1]:
            continue  # a table's header row
        for cell in line.strip("|").split("|")[1:]:
            cell = cell.strip()
            if cell in ("-", "True", "False") or cell.startswith("`") or cell.startswith("S="):
                continue
            if cell in words:  # a label from the JSON (e.g. the pass of a layer row)
                continue
            if cell.endswith("×"):
                assert cell[:-1] in ratios, f"ratio {cell} is not a ratio of two times in results/*.json"
            else:
                assert re.fullmatch(r"[0-9.e+-]+", cell), f"unexpected cell {cell!r}"
                assert cell in allowed, f"number {cell} in book/results.md is not in results/*.json"
            checked += 1
    assert checked > 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_timer_side_by_side_pairs_every_fn_in_every_repetition():
    """side_by_side: one time per fn and repetition, each a positive finite ms; the one-fn call is
    its median; lead=True still times the fn (a spin kernel queued before the start event)."""
    timer = bench.Timer(flush_mb=16, reps=7, warmup=1, budget_s=0.2)
    a = torch.randn(1 << 20, device="cuda")
    calls = {"copy": 0, "add": 0}

    def copy():
        calls["copy"] += 1
        a.clone()

    def add():
        calls["add"] += 1
        a.add_(1)
    t = timer.side_by_side({"copy": copy, "add": add}, reps=5)
    assert set(t) == {"copy", "add"} and all(len(v) == 5 for v in t.values())
    assert all(0 < x < 1e3 for v in t.values() for x in v)
    assert calls == {"copy": 1 + 1 + 5, "add": 1 + 1 + 5}  # warmup, probe, repetitions
    assert 0 < timer(copy, lead=True, reps=3) < 1e3
    pr = bench.paired_ratio(t["copy"], t["add"])
    assert pr["q1"] <= pr["median"] <= pr["q3"]


def test_show_source_takes_line_numbers_or_markers(capsys, monkeypatch):
    """show_source's range: 1-based inclusive numbers, or marker strings (start line included,
    end line not); a marker that is not there is an error, not an empty listing."""
    import builtins

    from fastmqa import nbutil
    lines = ["a", "// start here", "b", "c", "// next section", "d"]
    assert nbutil._line_range(lines, 2, 4) == (1, 4)
    assert nbutil._line_range(lines, "// start here", "// next section") == (1, 4)
    assert nbutil._line_range(lines, None, None) == (0, None)
    with pytest.raises(ValueError, match="no line contains"):
        nbutil._line_range(lines, "// gone", None)
    with pytest.raises(ValueError, match="no line after"):
        nbutil._line_range(lines, "// start here", "// gone")
    real_import = builtins.__import__

    def no_ipython(name, *args, **kwargs):  # the plain-text path
        if name.startswith("IPython"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_ipython)
    nbutil.show_source("decode_common.cuh", "// Split count: enough", "// Arrival counters")
    out = capsys.readouterr().out
    assert out.startswith("// Split count: enough") and "kv_policy_normal" in out and "Arrival counters" not in out
