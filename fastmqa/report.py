"""The results chapter, generated from results/*.json only: `python -m fastmqa.report`.

Writes book/results.md and its figures (book/figures/results_*.svg). `--check` regenerates
into a temporary folder and fails if the committed chapter differs, and validates the schema
of every results file. Every number on the page is a value of a results file, or a ratio of
two of them (tests/test_report.py checks this).
"""
from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from . import bench

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"


def ms(v):
    return f"{v:.4g}"


def ratio(a, b):
    return f"{a / b:.2f}×"


def _setup_mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "fastmqa", "figure.dpi": 100, "font.size": 9})
    return plt


def _save(fig, path):
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")


def _header(d):
    return f"*{d['device']}, torch {d['torch']}, CUDA {d['cuda']}, run {d['date']}*"


def section_fp32(d, figs, plt):
    from . import plots
    out = ["## The fp32 progression", "", _header(d), "",
           f"Ceilings measured in the same run: copy {d['ceilings']['copy_gbps']} GB/s, "
           f"fp32 matmul {d['ceilings']['fp32_tflops']} TFLOP/s.", ""]
    table, best = plots.progression_table(d)
    other = d.get("other_gpu", {})
    out += ["| implementation | ms | TFLOP/s | vs previous chapter | vs best PyTorch | "
            f"{other.get('device', 'other GPU')} ms (another GPU) |", "|---|---|---|---|---|---|"]
    prev = None
    for t in table:
        ours = not t["impl"].startswith("torch.")
        l4 = other.get("ms", {}).get(t["impl"]) if ours else None
        out.append(f"| `{t['impl']}` | {ms(t['ms'])} | {t['tflops']} | "
                   f"{ratio(prev, t['ms']) if ours and prev else '-'} | {ratio(best['ms'], t['ms'])} | "
                   f"{ms(l4) if l4 else '-'} |")
        prev = t["ms"] if ours else prev
    if "torch" in other.get("ms", {}):
        out += ["", f"The original project's PyTorch baseline on the {other['device']} took "
                    f"{ms(other['ms']['torch'])} ms ({other.get('source', '')})."]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    plots.progression_chart(d, ax=ax)
    _save(fig, figs / "results_fp32.svg")
    plt.close(fig)
    out += ["", "![fp32 progression](figures/results_fp32.svg)", ""]
    sweep = sorted({r["Sq"] for r in d["rows"]})
    impls = sorted({r["impl"] for r in d["rows"]}, key=lambda s: (s.startswith("torch."), s))
    out += ["### Sweep over S (ms)", "", "| impl | " + " | ".join(f"S={s}" for s in sweep) + " |",
            "|---|" + "---|" * len(sweep)]
    for impl in impls:
        cells = []
        for s in sweep:
            r = [x for x in d["rows"] if x["impl"] == impl and x["Sq"] == s and not x.get("sweep")]
            cells.append(ms(r[0]["ms"]) if r else "-")
        out.append(f"| `{impl}` | " + " | ".join(cells) + " |")
    return out


def section_prefill(d, figs, plt):
    out = ["## Prefill, bf16: TFLOP/s against FlashAttention-2 and cuDNN", "", _header(d), "",
           f"bf16 matmul ceiling measured in the same run: {d['ceilings']['bf16_tflops']} TFLOP/s. "
           "FLOPs are counted as 4·B·H·Sq·Skv·D, halved for causal.", ""]
    ours = sorted({r["impl"] for r in d["rows"] if not r["impl"].startswith("torch.")})
    lines = ["torch.sdpa_flash", "torch.sdpa_cudnn"]
    combos = sorted({(r["D"], r["causal"]) for r in d["rows"]}, reverse=True)
    fig, axes = plt.subplots(1, len(combos), figsize=(3.2 * len(combos), 3.2), sharey=True, squeeze=False)
    for ax, (D, causal) in zip(axes[0], combos):
        for impl in ours + lines + ["torch.sdpa_efficient"]:
            rs = sorted([r for r in d["rows"] if r["impl"] == impl and r["D"] == D and r["causal"] == causal],
                        key=lambda r: r["Sq"])
            if rs:
                ax.plot([r["Sq"] for r in rs], [r["tflops"] for r in rs], marker="o",
                        label=impl.replace("torch.", ""), lw=2 if impl in ours else 1)
        ax.axhline(d["ceilings"]["bf16_tflops"], color="k", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={D} {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("S (B·S = 16384)")
    axes[0][0].set_ylabel("TFLOP/s")
    axes[0][-1].legend(fontsize=7)
    _save(fig, figs / "results_prefill.svg")
    plt.close(fig)
    out += ["![prefill TFLOP/s](figures/results_prefill.svg)", ""]
    for impl in ours:
        out += [f"### `{impl}` per point", "",
                "| D | causal | S | TFLOP/s | FA2 (sdpa_flash) | cuDNN | vs FA2 | vs cuDNN |", "|---|---|---|---|---|---|---|---|"]
        for D, causal in combos:
            for r in sorted([r for r in d["rows"] if r["impl"] == impl and r["D"] == D and r["causal"] == causal],
                            key=lambda r: r["Sq"]):
                def other(name):
                    o = [x for x in d["rows"] if x["impl"] == name and x["D"] == D and x["causal"] == causal and x["Sq"] == r["Sq"]]
                    return o[0] if o else None
                fa, cu = other("torch.sdpa_flash"), other("torch.sdpa_cudnn")
                out.append(f"| {D} | {causal} | {r['Sq']} | {r['tflops']} | {fa['tflops'] if fa else '-'} | "
                           f"{cu['tflops'] if cu else '-'} | {ratio(fa['ms'], r['ms']) if fa else '-'} | "
                           f"{ratio(cu['ms'], r['ms']) if cu else '-'} |")
        out.append("")
    return out


def section_decode(d, figs, plt):
    out = ["## Decode over a KV cache, bf16: bandwidth", "", _header(d), "",
           f"Device copy bandwidth measured in the same run: {d['ceilings']['copy_gbps']} GB/s "
           "(bytes read + written). Decode bandwidth = bytes of K and V read / time. Like every suite, "
           "each repetition follows a 256 MB write that flushes L2 (as Triton's `do_bench`); the write "
           "leaves L2 full of dirty lines, which a memory-bound kernel pays to write back while it reads. "
           "Measured once (DEVNOTES, session 6): B=16 S=16k took 66.2 µs after this flush and 58.6 µs "
           "after a read-only one, SDPA 68.4 and 59.5 µs: ratios barely move, the \"% of copy\" figures "
           "at 64-256 MB read 7-13 % lower than a clean cold cache would give.", ""]
    main = [r for r in d["rows"] if not r.get("sweep")]
    ours = sorted({r["impl"] for r in main if not r["impl"].startswith("torch.")})
    torch_impls = sorted({r["impl"] for r in main if r["impl"].startswith("torch.")})
    points = sorted({(r["B"], r["Skv"]) for r in main})
    out += ["| B | S | " + " | ".join(f"`{i}` GB/s" for i in ours + torch_impls) + " | copy ms | "
            + " | ".join(f"`{i}` ms" for i in ours) + " | best SDPA vs ours |",
            "|---|---|" + "---|" * (len(ours) + len(torch_impls) + 1 + len(ours) + 1)]
    for B, S in points:
        rs = {r["impl"]: r for r in main if r["B"] == B and r["Skv"] == S}
        cells = [str(rs[i]["gbps"]) if i in rs else "-" for i in ours + torch_impls]
        any_r = next(iter(rs.values()))
        best_t = min((rs[i] for i in torch_impls if i in rs), key=lambda r: r["ms"], default=None)
        ours_ms = [ms(rs[i]["ms"]) if i in rs else "-" for i in ours]
        main_impl = next((i for i in ours if "." not in i), ours[-1] if ours else None)  # not a ".paged" row
        speed = ratio(best_t["ms"], rs[main_impl]["ms"]) if best_t and main_impl in rs else "-"
        out.append(f"| {B} | {S} | " + " | ".join(cells) + f" | {ms(any_r['copy_ms'])} | " + " | ".join(ours_ms)
                   + f" | {speed} |")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for impl in ours + torch_impls:
        rs = [r for r in main if r["impl"] == impl]
        ax.scatter([r["kv_bytes"] / 2**20 for r in rs], [r["gbps"] for r in rs], label=impl.replace("torch.", ""), s=14)
    ax.axhline(d["ceilings"]["copy_gbps"], color="k", ls=":", lw=1, label="copy bandwidth")
    ax.set_xscale("log")
    ax.set_xlabel("K + V bytes read (MiB)")
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=7)
    _save(fig, figs / "results_decode.svg")
    plt.close(fig)
    out += ["", "![decode bandwidth](figures/results_decode.svg)", ""]
    return out


def section_layer(d, figs, plt):
    out = ["## The layer", "", _header(d), "",
           "Prefill: one causal layer over B × S tokens. The three layers are timed side by side in the same "
           "repetitions; `vs SDPA layer` is the median over repetitions of the SDPA layer's time over ours "
           "(> 1: ours is faster).", "",
           "| impl | pass | B | S | ms | vs SDPA layer |", "|---|---|---|---|---|---|"]
    for r in (r for r in d["rows"] if r["kind"] == "layer"):
        x = r.get("x_sdpa_gqa_layer")
        out.append(f"| `{r['impl']}` | {r.get('pass', '-')} | {r['B']} | {r['Sq']} | {ms(r['ms'])} | "
                   f"{x[0] if x else '-'} |")
    dec = [r for r in d["rows"] if r["kind"] == "decode"]
    if dec:
        out += ["", "Decode: one step (one token per sequence) of a whole layer against a cache of S tokens, "
                "GPU time with the step's launches queued ahead.", "",
                "| impl | attention | S | B | ms | tokens/s | cache bytes per token | path |",
                "|---|---|---|---|---|---|---|---|"]
        for r in dec:
            out.append(f"| `{r['impl']}` | {r.get('attention', '-')} | {r['Skv']} | {r['B']} | {ms(r['ms'])} | "
                       f"{r.get('tokens_per_s', '-')} | {r.get('bytes_per_token', '-')} | {r.get('path', '-')} |")
    return out


def section_backward(d, figs, plt):
    out = ["## Attention backward, bf16: against FlashAttention-2 and cuDNN", "", _header(d), "",
           "The backward alone (the forward runs once, outside the timed region); TFLOP/s counts 2.5× "
           "the forward's FLOPs. `fastmqa.torch_bwd` is the same algorithm in torch (fp32), timed where "
           "its score blocks fit.", ""]
    ours = sorted({r["impl"] for r in d["rows"] if not r["impl"].startswith(("torch.", "fastmqa."))})
    combos = sorted({(r["D"], r["causal"]) for r in d["rows"]}, reverse=True)
    for impl in ours:
        out += [f"### `{impl}` per point", "",
                "| D | causal | S | ms | TFLOP/s | FA2 ms | cuDNN ms | vs FA2 | vs cuDNN | vs torch backward |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for D, causal in combos:
            for r in sorted([r for r in d["rows"] if r["impl"] == impl and r["D"] == D and r["causal"] == causal],
                            key=lambda r: r["Sq"]):
                def other(name):
                    o = [x for x in d["rows"] if x["impl"] == name and x["D"] == D and x["causal"] == causal
                         and x["Sq"] == r["Sq"]]
                    return o[0] if o else None
                fa, cu, tb = other("torch.sdpa_flash"), other("torch.sdpa_cudnn"), other("fastmqa.torch_bwd")
                out.append(f"| {D} | {causal} | {r['Sq']} | {ms(r['ms'])} | {r['tflops']} | "
                           f"{ms(fa['ms']) if fa else '-'} | {ms(cu['ms']) if cu else '-'} | "
                           f"{ratio(fa['ms'], r['ms']) if fa else '-'} | {ratio(cu['ms'], r['ms']) if cu else '-'} | "
                           f"{ratio(tb['ms'], r['ms']) if tb else '-'} |")
        out.append("")
    return out


SECTIONS = {"fp32": section_fp32, "prefill": section_prefill, "decode": section_decode, "layer": section_layer,
            "backward": section_backward}


def generate(book_dir: Path, results_dir=None) -> list[Path]:
    plt = _setup_mpl()
    figs = book_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    lines = ["# Results", "",
             "This page is generated by `python -m fastmqa.report` from `results/*.json`, which "
             "`python -m fastmqa.bench all` writes on the GPU host. Nothing here is typed by hand.", ""]
    present = []
    for suite, fn in SECTIONS.items():
        d = bench.load_results(suite, results_dir)
        if d is None:
            lines += [f"## {suite}", "", f"`results/{suite}.json` has not been produced yet.", ""]
            continue
        bench.validate_results(d)
        present.append(suite)
        lines += fn(d, figs, plt) + [""]
    page = book_dir / "results.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    return [page] + sorted(figs.glob("results_*.svg"))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastmqa.report", description="Generate book/results.md from results/*.json")
    ap.add_argument("--check", action="store_true", help="fail if the committed chapter is not what the JSON gives")
    args = ap.parse_args(argv)
    if not args.check:
        for p in generate(BOOK):
            print("wrote", p.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        new = generate(Path(tmp))
        bad = 0
        for p in new:
            rel = p.relative_to(tmp)
            old = BOOK / rel
            if not old.exists() or old.read_text() != p.read_text():
                bad += 1
                print(f"{'missing' if not old.exists() else 'out of date'}: book/{rel}")
                if old.exists() and p.suffix == ".md":
                    sys.stdout.writelines(list(difflib.unified_diff(old.read_text().splitlines(True),
                                                                     p.read_text().splitlines(True), n=1))[:40])
        if bad:
            print("regenerate with `python -m fastmqa.report` and commit")
            return 1
    print("results chapter is up to date with results/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
