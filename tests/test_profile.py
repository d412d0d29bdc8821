"""fastmqa.profile without a GPU: parsing ncu's CSV, the table, the occupancy calculator."""
import json

import pytest

from fastmqa import profile

CSV = '''==PROF== Connected to process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3","h","void smem_tiled::mqa_smem_tiled_kernel<128>(const float *, int)","1","7","(64, 1, 1)","(256, 4, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","2,873,984"
"0","4242","python3","h","void smem_tiled::mqa_smem_tiled_kernel<128>(const float *, int)","1","7","(64, 1, 1)","(256, 4, 1)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum","","562,638"
"0","4242","python3","h","void smem_tiled::mqa_smem_tiled_kernel<128>(const float *, int)","1","7","(64, 1, 1)","(256, 4, 1)","0","9.0","Command line profiler metrics","l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum","","470,586,830"
"0","4242","python3","h","void smem_tiled::mqa_smem_tiled_kernel<128>(const float *, int)","1","7","(64, 1, 1)","(256, 4, 1)","0","9.0","Command line profiler metrics","sm__throughput.avg.pct_of_peak_sustained_elapsed","%","50.78"
"1","4242","python3","h","softmax_rows_kernel(float *, float *, long long, int, int, int)","1","7","(256, 1, 1)","(8192, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","95,520"
"1","4242","python3","h","softmax_rows_kernel(float *, float *, long long, int, int, int)","1","7","(256, 1, 1)","(8192, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","n/a"
==PROF== Disconnected from process 4242
'''


def test_parse_csv():
    rows = profile.parse_csv(CSV)
    assert len(rows) == 2
    assert rows[0]["gpu__time_duration.sum"] == 2873984
    assert rows[0]["sm__throughput.avg.pct_of_peak_sustained_elapsed"] == pytest.approx(50.78)
    assert rows[0]["block"] == "(64, 1, 1)" and rows[1]["grid"] == "(8192, 1, 1)"
    assert rows[1]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] is None
    assert profile.parse_csv("no csv here") == []


def test_table_and_load(tmp_path):
    data = {"device": "x", "date": "d", "rows": [{"impl": "02_smem_tiled", **r} for r in profile.parse_csv(CSV)]}
    t = profile.table(data, ["02_smem_tiled"])
    assert t[0]["kernel"] == "mqa_smem_tiled_kernel<128>" and t[0]["time_us"] == pytest.approx(2873.984)
    assert t[0]["conflict_pct"] == pytest.approx(100 * 562638 / 470586830)
    assert t[1]["conflict_pct"] is None
    assert "mqa_smem_tiled_kernel<128>" in profile.format_table(t)
    assert profile.table(None) == [] and profile.table(data, ["nope"]) == []
    assert profile.load(tmp_path / "missing.json") is None
    (tmp_path / "ncu.json").write_text(json.dumps(data))
    assert profile.load(tmp_path / "ncu.json")["device"] == "x"


@pytest.mark.parametrize("regs, threads, smem, occ, limit", [
    (255, 128, 0, 12.5, "registers"),          # 01_naive: ncu's theoretical occupancy 12.5 %
    (168, 64, 49408, 12.5, "shared memory"),   # 02_smem_tiled
    (123, 256, 32768, 25.0, "registers"),      # 03_warp_shuffle
    (29, 256, 0, 100.0, "warps"),              # 04's softmax
])
def test_occupancy_matches_ncu(regs, threads, smem, occ, limit):
    o = profile.occupancy(regs, threads, smem)
    assert o["occupancy_pct"] == occ and o["limit"] == limit


def test_short_name():
    assert profile.short_name("void warp_shuffle::mqa_warp_kernel<128>(const float *)") == "mqa_warp_kernel<128>"
    assert profile.short_name("softmax_rows_kernel(float *)") == "softmax_rows_kernel"


def test_torch_paths_are_profile_targets(monkeypatch):
    """PyTorch's benchmark paths (torch.sdpa_cudnn, ...) pass the name check; unknown registry
    names still fail with the known ones listed. (No ncu here: the run itself stops there.)"""
    from fastmqa import profile as prof
    monkeypatch.setattr(prof, "find_ncu", lambda: None)
    with pytest.raises(SystemExit, match="ncu"):
        prof.main(["--kernels", "08_flash_wgmma,torch.sdpa_cudnn", "--shape", "1,4,64,64"])
    with pytest.raises(KeyError, match="no kernel named"):
        prof.main(["--kernels", "99_nope", "--shape", "1,4,64,64"])


def test_torch_path_dtype_suffix():
    """"torch.PATH@dtype" profiles a PyTorch path in that dtype (e.g. its fp32 3xTF32 kernel); an
    unknown dtype is refused by name before anything touches a GPU."""
    from fastmqa import profile as prof
    with pytest.raises(SystemExit, match="unknown dtype 'float33'"):
        prof.child("torch.sdpa_efficient@float33", 1, 4, 64, 64, False)
    with pytest.raises(SystemExit, match="unknown dtype 'Tensor'"):
        prof.child("torch.sdpa_efficient@Tensor", 1, 4, 64, 64, False)
