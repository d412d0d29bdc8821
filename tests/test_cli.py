"""The command lines and the results files.

`python -m fastmqa.bench` and `python -m fastmqa.gpucheck` on a machine without a GPU print a
banner saying so and exit 2, never a traceback; bad suites, kernels and options are argparse
usage errors (exit 2) that name what was wrong, on any machine. Results files are written
atomically (an interrupted write leaves the old file and no temp file) and malformed results
are refused with a message naming the field.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmqa import bench, gpucheck

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not NO_CUDA, reason="checks the CPU-machine behaviour")


def run_module(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# -- no GPU: a banner and exit 2 -----------------------------------------------------------
@cpu_only
@pytest.mark.parametrize("argv", [["fastmqa.bench", "fp32"], ["fastmqa.bench", "all", "--quick"],
                                  ["fastmqa.gpucheck"], ["fastmqa.gpucheck", "--quick", "--fuzz", "5"]],
                         ids=" ".join)
def test_no_gpu_banner_exit_2(argv):
    p = run_module(*argv)
    assert p.returncode == 2, p.stderr
    assert "no CUDA GPU here (torch.cuda.is_available() is False)" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


@cpu_only
def test_no_gpu_in_process(capsys):
    assert bench.main(["decode"]) == 2
    assert gpucheck.main(["--kernels", "01_naive"]) == 2
    err = capsys.readouterr().err
    assert err.count("no CUDA GPU here") == 2


# -- usage errors (any machine) ----------------------------------------------------------
USAGE = [
    (bench.main, ["nosuch"], "unknown suite 'nosuch'; choose from fp32, prefill, decode, layer, backward or 'all'"),
    (bench.main, ["fp32", "fp64"], "unknown suite 'fp64'"),
    (bench.main, [], "the following arguments are required: SUITE"),
    (bench.main, ["fp32", "--bogus"], "unrecognized arguments: --bogus"),
    (gpucheck.main, ["--kernels", "01_naive,nosuch"], "no kernel named 'nosuch'; known: 01_naive"),
    (gpucheck.main, ["--fuzz", "-3"], "--fuzz must be >= 0 (examples per kernel), got -3"),
    (gpucheck.main, ["--fuzz", "many"], "argument --fuzz: invalid int value: 'many'"),
    (gpucheck.main, ["--sanitizer-tools", "memcheck,bogus"], "unknown --sanitizer-tools bogus"),
    (gpucheck.main, ["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("main,argv,text", USAGE, ids=[" ".join(a) or "(none)" for _, a, _ in USAGE])
def test_usage_errors_name_the_argument(main, argv, text, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and text in err, err


def test_usage_error_from_the_command_line():
    p = run_module("fastmqa.bench", "nosuch")
    assert p.returncode == 2 and "unknown suite 'nosuch'" in p.stderr and "Traceback" not in p.stderr


# -- results files ------------------------------------------------------------------------
def good_results(suite="fp32"):
    return {"suite": suite, "device": "NVIDIA H100", "torch": "2.x", "cuda": "12.x", "date": "2026-01-01T00:00:00Z",
            "ceilings": {"copy_gbps": 3000.0, "bf16_tflops": 700.0, "fp32_tflops": 50.0},
            "rows": [dict(impl="01_naive", kind="prefill", dtype="float32", B=4, H=32, Sq=512, Skv=512, D=128,
                          causal=False, ms=12.5, tflops=1.4),
                     dict(impl="10_decode", kind="decode", dtype="bfloat16", B=1, H=32, Sq=1, Skv=4096, D=128,
                          causal=False, ms=0.02, gbps=1500.0)]}


def test_write_and_load_round_trip(tmp_path):
    p = bench.write_results("fp32", good_results(), tmp_path)
    assert p == tmp_path / "fp32.json" and bench.load_results("fp32", tmp_path) == good_results()
    assert bench.load_results("decode", tmp_path) is None            # missing: None, not an error
    assert [f.name for f in tmp_path.iterdir()] == ["fp32.json"]


class Interrupted(BaseException):
    """What Ctrl-C (KeyboardInterrupt) or a killed job looks like to the writer."""


@pytest.mark.parametrize("exc", [Interrupted, TypeError], ids=["interrupt", "unserialisable"])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, exc):
    old = bench.write_results("fp32", good_results(), tmp_path)
    before = old.read_bytes()
    real_dump = json.dump

    def dump_half(obj, f, **kw):       # write part of the file, then fail
        text = json.dumps(obj, **kw)
        f.write(text[: len(text) // 2])
        f.flush()
        raise exc("interrupted midway")
    monkeypatch.setattr(bench.json, "dump", dump_half)
    new = good_results()
    new["rows"][0]["ms"] = 99.0
    with pytest.raises(exc, match="interrupted midway"):
        bench.write_results("fp32", new, tmp_path)
    assert old.read_bytes() == before                              # the old file is intact
    assert [f.name for f in tmp_path.iterdir()] == ["fp32.json"]   # and no temp file is left
    monkeypatch.setattr(bench.json, "dump", real_dump)
    assert bench.load_results("fp32", tmp_path)["rows"][0]["ms"] == 12.5


def test_invalid_results_are_never_written(tmp_path):
    bad = good_results()
    del bad["device"]
    with pytest.raises(ValueError, match="results file lacks top-level key 'device'"):
        bench.write_results("fp32", bad, tmp_path)
    assert not list(tmp_path.iterdir())


def test_corrupt_results_file_names_the_file(tmp_path):
    (tmp_path / "fp32.json").write_text('{"suite": "fp32", "rows": [')
    with pytest.raises(ValueError, match=r"fp32\.json is not valid JSON"):
        bench.load_results("fp32", tmp_path)


def _mutate(fn):
    d = good_results()
    fn(d)
    return d


MALFORMED = [
    ("not a dict", lambda d: None, ["a list"], "results must be a dict, got list"),
    ("no rows", lambda d: d.pop("rows"), None, "results file lacks top-level key 'rows'"),
    ("no ceilings", lambda d: d.pop("ceilings"), None, "results file lacks top-level key 'ceilings'"),
    ("ceilings a list", lambda d: d.update(ceilings=[1, 2, 3]), None, "ceilings must be a dict, got list"),
    ("ceiling missing", lambda d: d["ceilings"].pop("bf16_tflops"), None,
     "ceilings.bf16_tflops must be a positive number, got None"),
    ("ceiling zero", lambda d: d["ceilings"].update(copy_gbps=0), None, "ceilings.copy_gbps must be a positive number, got 0"),
    ("ceiling nan", lambda d: d["ceilings"].update(copy_gbps=float("nan")), None, "got nan"),
    ("ceiling inf", lambda d: d["ceilings"].update(fp32_tflops=float("inf")), None, "got inf"),
    ("ceiling str", lambda d: d["ceilings"].update(fp32_tflops="50"), None, "got '50'"),
    ("rows a dict", lambda d: d.update(rows={"a": 1}), None, "rows must be a list of dicts, got dict"),
    ("row a string", lambda d: d.update(rows=["01_naive"]), None, "rows must be a list of dicts, got list"),
    ("row lacks ms", lambda d: d["rows"][0].pop("ms"), None, "row 0 (01_naive) lacks 'ms'"),
    ("row lacks Skv", lambda d: d["rows"][1].pop("Skv"), None, "row 1 (10_decode) lacks 'Skv'"),
    ("ms negative", lambda d: d["rows"][0].update(ms=-1.0), None, "row 0 (01_naive) has ms=-1.0, expected a positive number"),
    ("ms nan", lambda d: d["rows"][0].update(ms=float("nan")), None, "has ms=nan"),
    ("ms bool", lambda d: d["rows"][0].update(ms=True), None, "has ms=True"),
    ("ms str", lambda d: d["rows"][0].update(ms="12.5"), None, "has ms='12.5'"),
    ("prefill lacks tflops", lambda d: d["rows"][0].pop("tflops"), None, "prefill row 0 (01_naive) lacks 'tflops'"),
    ("decode lacks gbps", lambda d: d["rows"][1].pop("gbps"), None, "decode row 1 (10_decode) lacks 'gbps'"),
]


@pytest.mark.parametrize("what,mutate,replace,text", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_validate_results_rejects_malformed(what, mutate, replace, text):
    data = replace if replace is not None else _mutate(mutate)
    with pytest.raises(ValueError) as e:
        bench.validate_results(data)
    assert text in str(e.value), str(e.value)


def test_validate_results_accepts_good_and_empty_rows():
    bench.validate_results(good_results())
    bench.validate_results({**good_results(), "rows": []})


def test_committed_results_are_valid():
    for p in sorted((ROOT / "results").glob("*.json")):
        data = json.loads(p.read_text())
        if "rows" in data and "ceilings" in data:      # benchmark suites (gpucheck.json has its own shape)
            bench.validate_results(data)


def test_run_notebooks_takes_relative_paths(tmp_path, monkeypatch):
    """gpucheck.run_notebooks executes in place and reports each notebook relative to the repo,
    given an absolute or a relative path (a relative one crashed after executing, on the GPU host)."""
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 6 * 7\nprint(x)")])
    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "tiny.ipynb"
    nbformat.write(nb, str(path))
    monkeypatch.setattr(gpucheck, "ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    for p in ("notebooks/tiny.ipynb", str(path)):
        [res] = gpucheck.run_notebooks([p], timeout=120)
        assert res["ok"], res["error"]
        assert res["notebook"] == "notebooks/tiny.ipynb"
    out = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert out and "42" in out[0]["text"]
