"""fastmqa.ops: the mqa_attention op, its FlashAttention-2 backward and its dispatch."""
import math

import pytest
import torch

from fastmqa import check, kernels, ops
from fastmqa.fuzz import check_lse
from fastmqa.ops import forward, gradient_errors, mqa_attention
from fastmqa.reference import attention_ref

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qkv(B=2, H=4, Sq=8, Skv=8, D=16, dtype=torch.float32, device="cpu", kv4d=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    kv_shape = (B, 1, Skv, D) if kv4d else (B, Skv, D)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    return mk(B, H, Sq, D), mk(*kv_shape), mk(*kv_shape)


# -- forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Skv", [(8, 8), (5, 13), (13, 5), (1, 9)])
def test_forward_matches_fp64(dtype, causal, Sq, Skv):
    q, k, v = qkv(Sq=Sq, Skv=Skv, dtype=dtype)
    check.assert_close(mqa_attention(q, k, v, causal=causal), q, k, v, causal=causal, what="mqa_attention")


def test_kv_layouts_and_alias_agree():
    q, k, v = qkv(kv4d=True)
    a = mqa_attention(q, k, v)
    b = mqa_attention(q, k.squeeze(1), v.squeeze(1))
    assert torch.equal(a, b)
    assert torch.equal(forward(q, k, v), a)


def test_scale_and_lse():
    q, k, v = qkv(dtype=torch.float64)
    out, lse = mqa_attention(q, k, v, scale=0.3, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v, scale=0.3, return_lse=True)
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
    assert lse.dtype == torch.float64
    assert mqa_attention(*qkv(), return_lse=True)[1].dtype == torch.float32


def test_original_api_shape():
    """The original project's fastmqa_cuda.forward(Q, K, V) shape: Q (4, 32, 512, 128), K/V (4, 1, 512, 128)."""
    Q, K, V = qkv(B=1, H=32, Sq=64, Skv=64, D=128)
    out = forward(Q, K, V)
    assert out.shape == Q.shape and out.dtype == torch.float32
    check.assert_close(out, Q, K, V)


# -- backward --------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Skv", [(5, 7), (7, 5), (6, 6), (1, 4)])
def test_gradcheck_fp64(causal, Sq, Skv):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Sq=Sq, Skv=Skv, D=4, dtype=torch.float64))
    # fast mode (random projections of the Jacobian) for all but one shape, to keep CI quick
    fast = (Sq, Skv, causal) != (7, 5, True)
    assert torch.autograd.gradcheck(lambda *a: mqa_attention(*a, causal=causal), (q, k, v), fast_mode=fast)


def test_gradcheck_through_lse():
    """The log-sum-exp output is differentiable too (dS gains P * dlse)."""
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Sq=6, Skv=4, D=4, dtype=torch.float64))

    def f(*a):
        out, lse = mqa_attention(*a, causal=True, return_lse=True)
        return out.sum(-1) + torch.nan_to_num(lse, neginf=0.0)  # rows 0, 1 see no key: lse = -inf
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_grads_within_rule(dtype, causal):
    """|grad - fp64 grad| <= MULTIPLE x PyTorch's own same-dtype autograd error + floor."""
    q, k, v = qkv(B=2, H=8, Sq=48, Skv=64, D=32, dtype=dtype, seed=3)
    for name, (ours, theirs) in gradient_errors(q, k, v, causal=causal).items():
        tol = check.MULTIPLE * theirs + check.ATOL[dtype]
        assert ours <= tol, f"{name}: err {ours:.3e} > tol {tol:.3e} ({dtype}, causal={causal})"


def test_backward_tiling_is_invisible(monkeypatch):
    """Small blocks (many, with the causal key range cut per block) give the one-block grads."""
    q, k, v = qkv(B=2, H=3, Sq=70, Skv=50, D=8, dtype=torch.float64, seed=1)
    dout = torch.randn(q.shape, dtype=torch.float64)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        mqa_attention(*leaves, causal=True).backward(dout)
        return [t.grad for t in leaves]
    whole = grads()
    monkeypatch.setattr(ops, "BWD_BLOCK_BYTES", 2 * 3 * 50 * 8 * 4 * 7)  # 7 rows per block
    assert ops._block_rows(2, 3, 70, 50, 8) == 7
    for a, b in zip(grads(), whole):
        assert torch.allclose(a, b, atol=1e-12)


def test_grads_in_input_shapes():
    q, k, v = qkv(kv4d=True)
    k3 = k.squeeze(1).clone().requires_grad_()
    k4, v4 = k.clone().requires_grad_(), v.clone().requires_grad_()
    mqa_attention(q, k4, v4).sum().backward()
    mqa_attention(q, k3, v.squeeze(1)).sum().backward()
    assert k4.grad.shape == k4.shape and v4.grad.shape == v4.shape and k3.grad.shape == k3.shape
    assert torch.allclose(k4.grad.squeeze(1), k3.grad)


def test_zero_upstream_grad_gives_zero_grads():
    q, k, v = (t.requires_grad_() for t in qkv())
    mqa_attention(q, k, v, causal=True).backward(torch.zeros(q.shape))
    for t in (q, k, v):
        assert torch.count_nonzero(t.grad) == 0


# -- documented edge behaviour -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_are_zero_with_zero_grads(dtype):
    """causal with Sq > Skv: query i < Sq - Skv sees no key -> output 0, lse -inf, grads 0, no NaN."""
    q, k, v = (t.requires_grad_() for t in qkv(Sq=9, Skv=4, dtype=dtype))
    out, lse = mqa_attention(q, k, v, causal=True, return_lse=True)
    masked = 9 - 4
    assert torch.count_nonzero(out[:, :, :masked]) == 0
    assert torch.isneginf(lse[:, :, :masked]).all() and torch.isfinite(lse[:, :, masked:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.count_nonzero(q.grad[:, :, :masked]) == 0


def test_no_keys_at_all():
    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    k = torch.randn(2, 0, 8, requires_grad=True)
    out, lse = mqa_attention(q, k, k, return_lse=True)
    assert torch.count_nonzero(out) == 0 and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.count_nonzero(q.grad) == 0


def test_non_finite_inputs_propagate():
    """A NaN or inf in q is not hidden: its row's output is NaN (documented)."""
    q, k, v = qkv()
    q[0, 0, 0, 0] = float("nan")
    out = mqa_attention(q, k, v)
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("scale", [1e-6, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_magnitudes(scale, dtype):
    """Inputs x1e-6 (softmax ~ uniform) and x1e6 (softmax ~ one-hot): finite, within the rule."""
    q, k, v = qkv(dtype=dtype, scale=scale, seed=5)
    out = mqa_attention(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    check.assert_close(out, q, k, v, causal=True, what=f"mqa_attention x{scale:g}")


# -- validation ---------------------------------------------------------------------
def test_errors_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must be \(B, 1, Skv, D\) or \(B, Skv, D\).*\(2, 4, 8, 16\)"):
        mqa_attention(q, q, q)
    with pytest.raises(ValueError, match="k has batch 1"):
        mqa_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="k has head dim 8"):
        mqa_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(TypeError, match="q has dtype int64"):
        mqa_attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="causal must be a bool"):
        mqa_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="scale must be a finite positive float"):
        mqa_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="q must be 4-D"):
        mqa_attention(q[0], k, v)
    with pytest.raises(KeyError, match="no kernel named 'nope'"):
        mqa_attention(q, k, v, impl="nope")


def test_opcheck_custom_ops():
    """torch.library.opcheck: schema, fake (meta) kernels and autograd registration agree."""
    q, k, v = qkv(B=1, H=2, Sq=5, Skv=7, D=8, kv4d=False)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    torch.library.opcheck(torch.ops.fastmqa.mqa_fwd.default, (q, k, v, True, 0.25, ""))
    out, lse = mqa_attention(q, k, v, causal=True, scale=0.25, return_lse=True)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, True, 0.25)
    torch.library.opcheck(torch.ops.fastmqa.mqa_bwd.default, args)


def test_autocast_does_not_reach_inside():
    """fp32 inputs under bf16 autocast are computed in fp32 (the op's internals are not recast)."""
    q, k, v = (t.requires_grad_() for t in qkv())
    out = mqa_attention(q, k, v, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2 = mqa_attention(q, k, v, causal=True)
    assert out2.dtype == torch.float32 and torch.equal(out, out2)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g2 = torch.autograd.grad(mqa_attention(q, k, v, causal=True).sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(g, g2))


def test_compile_fullgraph_op():
    q, k, v = qkv()
    f = torch.compile(lambda q, k, v: mqa_attention(q, k, v, causal=True) * 2, fullgraph=True, backend="aot_eager")
    assert torch.allclose(f(q, k, v), mqa_attention(q, k, v, causal=True) * 2)


# -- dispatch ---------------------------------------------------------------------------
def _fake(name, kind="prefill", dtypes=(torch.bfloat16,), returns_lse=True, causal=True):
    return kernels.Kernel(name, name, kind, f"{name}.cu", "x", dtypes=dtypes, returns_lse=returns_lse, causal=causal)


def test_select_kernel_by_capability(monkeypatch):
    fakes = [_fake("05_fp32", dtypes=(torch.float32,)), _fake("06_mma", dtypes=(torch.bfloat16, torch.float16)),
             _fake("07_no_lse", returns_lse=False), _fake("08_noncausal", causal=False),
             _fake("20_decode", kind="decode")]
    monkeypatch.setattr(kernels, "REGISTRY", fakes)
    pick = lambda *a: (ops.select_kernel(*a) or kernels.Kernel("reference", "", "prefill", "", "")).name
    assert pick(torch.bfloat16, 128, True) == "06_mma"
    assert pick(torch.bfloat16, 128, False) == "08_noncausal"    # the latest that supports it
    assert pick(torch.float32, 64, True) == "05_fp32"
    assert pick(torch.float64, 64, False) == "reference"
    assert pick(torch.bfloat16, 96, False) == "reference"        # head dim not supported
    assert ops.select_kernel(torch.bfloat16, 128, True, "cpu") is None


def test_select_kernel_skips_kernels_for_another_gpu(monkeypatch):
    """08_flash_wgmma is sm_90a code: on any other GPU the dispatcher falls back to 06_flash_mma,
    and the entry says why it does not run there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    wg = kernels.get("08_flash_wgmma")
    assert "compute capability 8.0; the kernel needs 9.0" in wg.supports(torch.bfloat16, 128, False)
    assert ops.select_kernel(torch.bfloat16, 128, True).name == "06_flash_mma"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert wg.supports(torch.bfloat16, 128, False) is None
    assert ops.select_kernel(torch.bfloat16, 128, True).name == "08_flash_wgmma"
    assert ops.select_kernel(torch.float32, 128, True).name == "09_flash_3xtf32"


def test_select_backward_follows_the_gpu(monkeypatch):
    """The backward kernel is the latest one that runs on the GPU: 12_flash_bwd_wgmma (08's, wgmma)
    on compute capability 9.0, 07_flash_bwd (06's, mma.sync) elsewhere; both read the same lse."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, want in (((8, 0), "07_flash_bwd.cu"), ((8, 9), "07_flash_bwd.cu"), ((9, 0), "12_flash_bwd_wgmma.cu")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        for D in (64, 128):
            for causal in (False, True):
                kern = ops.select_backward(torch.bfloat16, D, causal, "cuda")
                assert kern is not None and kern.backward == want, (cap, D, causal)
    assert ops.select_backward(torch.bfloat16, 96, True, "cuda") is None


def test_cpu_uses_reference():
    q, k, v = qkv()
    assert torch.equal(mqa_attention(q, k, v), mqa_attention(q, k, v, impl="reference"))


# -- GPU -----------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Skv,D", [(128, 128, 128), (77, 200, 64), (200, 77, 128), (1, 300, 128)])
def test_gpu_forward_and_grads(dtype, causal, Sq, Skv, D):
    q, k, v = qkv(B=2, H=8, Sq=Sq, Skv=Skv, D=D, dtype=dtype, device="cuda", seed=Sq + Skv)
    kern = ops.select_kernel(dtype, D, causal)
    what = f"mqa_attention via {kern.name if kern else 'reference'}"
    check.assert_close(mqa_attention(q, k, v, causal=causal), q, k, v, causal=causal, what=what)
    if dtype != torch.float32:  # fp32 grads: torch's own fp32 autograd error is ~1e-7, ours too
        for name, (ours, theirs) in gradient_errors(q, k, v, causal=causal).items():
            tol = check.MULTIPLE * theirs + check.ATOL[dtype]
            assert ours <= tol, f"{what} {name}: {ours:.3e} > {tol:.3e}"


@gpu
@needs_cuda
def test_gpu_picks_an_lse_kernel_for_bf16():
    kern = ops.select_kernel(torch.bfloat16, 128, True)
    if kern is None:
        pytest.skip("no registry kernel returns the lse for bf16 yet")
    assert kern.returns_lse and kern.kind == "prefill"


@gpu
@needs_cuda
def test_gpu_compile_fullgraph():
    q, k, v = qkv(B=2, H=8, Sq=64, Skv=64, D=128, dtype=torch.bfloat16, device="cuda")
    f = torch.compile(lambda *a: mqa_attention(*a, causal=True), fullgraph=True)
    assert torch.equal(f(q, k, v), mqa_attention(q, k, v, causal=True))


def _bshd(B, H, S, D, dtype, device, seed):
    """q as a layer makes it: a (B, S, H, D) projection viewed as (B, H, S, D) (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[gpu, needs_cuda])])
def test_output_and_dq_come_in_the_bshd_layout(device):
    """out and dq are (B, H, Sq, D) tensors whose memory is (B, Sq, H, D), whatever q's layout (a
    layout fixed by the shape, as the fake implementations promise torch.compile): a layer's q,
    a view of its (B, S, H, D) projection, then needs no copy on either side of the op."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for q in (_bshd(2, 4, 33, 64, dtype, device, 0), _bshd(2, 4, 33, 64, dtype, device, 0).contiguous()):
        q = q.detach().requires_grad_()
        _, k, v = qkv(B=2, H=4, Sq=33, Skv=40, D=64, dtype=dtype, device=device)
        k, v = k.requires_grad_(), v.requires_grad_()
        out = mqa_attention(q, k, v, causal=True)
        bshd = (33 * 4 * 64, 64, 4 * 64, 1)
        assert out.stride() == bshd
        out.backward(torch.ones_like(out))
        assert q.grad is not None and torch.isfinite(q.grad).all()
        check.assert_close(out, q.detach(), k.detach(), v.detach(), causal=True, what="mqa_attention")


_BWD_KERNELS = [k.name for k in kernels.REGISTRY if k.backward]


@gpu
@needs_cuda
@pytest.mark.parametrize("name", _BWD_KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backward_kernel_matches_the_torch_backward(dtype, causal, name):
    """Every backward kernel (07_flash_bwd.cu, 12_flash_bwd_wgmma.cu) and the torch backward (the
    same algorithm, in fp32) agree within the tolerance rule against fp64, on strided
    (layer-layout) and contiguous q, and with dlse."""
    kern = kernels.get(name)
    if kern.supports(dtype, 128, causal) is not None:
        pytest.skip(f"{name}: {kern.supports(dtype, 128, causal)}")
    for q in (_bshd(2, 8, 130, 128, dtype, "cuda", 1), _bshd(2, 8, 130, 128, dtype, "cuda", 1).contiguous()):
        _, k, v = qkv(B=2, H=8, Sq=130, Skv=97, D=128, dtype=dtype, device="cuda", seed=2)
        out, lse = kern(q, k, v, causal=causal, return_lse=True)
        g = torch.Generator(device="cuda").manual_seed(3)
        dout = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
        dlse = torch.randn(lse.shape, device="cuda", generator=g)
        scale = 1 / 128 ** 0.5
        ours = kern.run_backward(dout, q, k, v, out, lse, dlse, causal=causal)
        prev, ops.BACKWARD = ops.BACKWARD, "torch"
        try:
            theirs = ops.mqa_bwd_impl(dout, q, k.view(2, 97, 128), v.view(2, 97, 128), out, lse, dlse, causal, scale)
        finally:
            ops.BACKWARD = prev
        # fp64 gradients of (out, lse) with upstream (dout, dlse); the torch backward computes in fp32
        # and rounds once, while the kernel rounds P and dS to 16 bits for the tensor cores, so the
        # kernel is held to PyTorch's own same-dtype autograd error (pt) instead
        ref_fn = lambda *a: attention_ref(*a, causal=causal, return_lse=True)
        refs = check.grads(ref_fn, q, k, v, dout, torch.float64, "cpu", dlse=dlse)
        pts = check.grads(ref_fn, q, k, v, dout, dtype, "cuda", dlse=dlse)
        for name, a, b, pt, ref in zip(("dq", "dk", "dv"), ours, theirs, pts, refs):
            ref = ref.reshape(a.shape)
            err_b = float((b.double().cpu() - ref).abs().max())
            assert torch.isfinite(a).all()
            c = check.rule(a, pt, ref, dtype, what=name)
            assert c.ok, f"{name} kernel: {c} (torch backward err {err_b:.3e})"


# -- choosing the backward ------------------------------------------------------------
def test_select_backward_modes(monkeypatch):
    assert ops.select_backward(torch.bfloat16, 128, True, "cpu") is None     # CPU: the torch backward
    monkeypatch.setattr(ops, "BACKWARD", "torch")
    assert ops.select_backward(torch.bfloat16, 128, True, "cuda") is None
    monkeypatch.setattr(ops, "BACKWARD", "fast")
    with pytest.raises(ValueError, match="BACKWARD must be 'auto' or 'torch'"):
        ops.select_backward(torch.bfloat16, 128, True, "cuda")
    monkeypatch.setattr(ops, "BACKWARD", "auto")
    kern = ops.select_backward(torch.bfloat16, 128, True, "cuda")
    # the latest kernel with a backward that runs here: 08's (wgmma) on Hopper or with no GPU to ask
    hopper = not torch.cuda.is_available() or torch.cuda.get_device_capability() == (9, 0)
    assert kern is not None and kern.returns_lse
    assert kern.backward == ("12_flash_bwd_wgmma.cu" if hopper else "07_flash_bwd.cu")
    assert ops.select_backward(torch.float32, 128, True, "cuda") is None     # no fp32 backward kernel
    assert ops.select_backward(torch.bfloat16, 96, True, "cuda") is None     # head dim not supported


def test_backward_kernel_that_fails_to_build_falls_back_to_torch(monkeypatch):
    """As the forward: a backward kernel that cannot build warns once and the torch backward runs."""
    from fastmqa.build import BuildError

    class Broken:
        name, backward = "99_broken", "99_broken_bwd.cu"

        def run_backward(self, *a, **k):
            raise BuildError("nvcc exploded")

    monkeypatch.setattr(ops, "_failed", set())
    monkeypatch.setattr(ops, "select_backward",
                        lambda *a: None if "99_broken:bwd" in ops._failed else Broken())
    q, k, v = qkv(dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with pytest.warns(RuntimeWarning, match="backward kernel of 99_broken failed to build"):
        mqa_attention(q, k, v, causal=True).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    attention_ref(*leaves, causal=True).sum().backward()
    for a, b in zip(grads, leaves):
        assert torch.allclose(a, b.grad, atol=1e-5)
    assert "99_broken:bwd" in ops._failed


def test_head_groups_match_the_kernel():
    """fastmqa.kernels._bwd_head_groups sizes the workspace for the launcher's head_groups(): same rule."""
    from fastmqa.build import KERNELS_DIR
    text = (KERNELS_DIR / "flash_bwd.cuh").read_text()
    assert "(causal ? 8 : 2) * num_sms / max(1, ctas)" in text and "HG = (H + G - 1) / G;" in text
    assert kernels._bwd_head_groups(16, 32, 1024, True, 132) == (4, 8)       # 256 CTAs -> 4 groups
    assert kernels._bwd_head_groups(16, 32, 1024, False, 132) == (1, 32)     # one wave already
    assert kernels._bwd_head_groups(1, 32, 128, False, 132) == (32, 1)       # 2 CTAs -> one per head
    assert kernels._bwd_head_groups(2, 5, 33, True, 132) == (5, 1)
    G, HG = kernels._bwd_head_groups(1, 12, 64, False, 8)                     # 16 -> HG 1 ... G covers H
    assert G * HG >= 12 and (G - 1) * HG < 12
    ws = kernels._bwd_workspace(2, 4, 65, 100, 64, False, 132)
    G, _ = kernels._bwd_head_groups(2, 4, 100, False, 132)
    assert ws == 2 * 4 * 2 * 4 * 128 + (2 * 4 * G * 2 * 100 * 64 if G > 1 else 0)


def test_prepare_backward_names_bad_arguments():
    kern = kernels.get("06_flash_mma")
    q, k, v = qkv(dtype=torch.bfloat16, D=64)
    with pytest.raises(ValueError, match="q is on cpu, expected a cuda tensor"):
        kern.prepare_backward(q, q, k, v, q, torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="has no backward kernel"):
        kernels.get("02_smem_tiled").prepare_backward(q, q, k, v, q, torch.zeros(2, 4, 8))


@gpu
@needs_cuda
def test_gpu_backward_kernel_is_deterministic():
    kern = ops.select_backward(torch.bfloat16, 128, True)
    for causal, (B, H, S) in ((True, (1, 32, 1000)), (False, (4, 8, 300))):
        q, k, v = qkv(B=B, H=H, Sq=S, Skv=S, D=128, dtype=torch.bfloat16, device="cuda", seed=S)
        out, lse = kern(q, k, v, causal=causal, return_lse=True)
        dout = torch.randn_like(out)
        first = kern.run_backward(dout, q, k, v, out, lse, causal=causal)
        for _ in range(3):
            again = kern.run_backward(dout, q, k, v, out, lse, causal=causal)
            assert all(torch.equal(a, b) for a, b in zip(first, again))


# -- 08_flash_wgmma's warp-specialised path -----------------------------------------------
needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="needs an sm_90 GPU (wgmma)")


@gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,Sq,Skv", [(False, 70, 1100), (True, 300, 2500), (True, 2049, 2049),
                                           (False, 1, 1500), (True, 5, 3000),
                                           (True, 77, 77), (False, 513, 513)])
def test_gpu_wgmma_d128_takes_the_warp_specialised_path(dtype, causal, Sq, Skv):
    """D = 128 runs the warp-specialised kernel with Q and O by TMA, no ping-pong (cfg 15; causal:
    cfg 16, whose last tile of an item runs at half width where no row sees past its first half):
    the default call equals the forced paths bitwise (the keys a half tile skips have P = 0), and
    meets the tolerance rule, lse included, with q and o through strides (a (B, S, H, D)
    projection); so do cfg 14 (with the ping-pong) and cfg 12 (Q by cp.async, O by stores): the
    same arithmetic, other widths, scheduling and copies."""
    wg = kernels.get("08_flash_wgmma")
    B, H, D = 2, 4, 128
    g = torch.Generator(device="cuda").manual_seed(Skv)
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(B, 1, Skv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, 1, Skv, D, device="cuda", dtype=dtype, generator=g)
    o, lse = wg(q, k, v, causal=causal, return_lse=True)
    for cfg in (16, 15):
        oc, lsec = wg(q, k, v, causal=causal, return_lse=True, num_splits=cfg)
        assert torch.equal(o, oc) and torch.equal(lse, lsec), f"cfg {cfg}"
    o14, lse14 = wg(q, k, v, causal=causal, return_lse=True, num_splits=14)
    assert torch.equal(o, o14) and torch.equal(lse, lse14)
    o12, lse12 = wg(q, k, v, causal=causal, return_lse=True, num_splits=12)
    assert torch.equal(o, o12) and torch.equal(lse, lse12)  # same arithmetic, other data movement
    check.assert_close(o, q, k, v, causal=causal, what="08_flash_wgmma (warp-specialised)")
    why = check_lse(lse, q, k, v, causal, None, None)  # the rule again, for the log-sum-exp
    assert why is None, why


@gpu
@needs_sm90
@pytest.mark.parametrize("causal,S,cfg", [(True, 1024, 15), (False, 512, 15), (True, 1030, 2), (False, 513, 2)])
def test_gpu_wgmma_d64_dispatch_by_row_length(causal, S, cfg):
    """D = 64 takes the warp-specialised kernel (cfg 15) where a row sees at most 512 keys on
    average (causal S <= 1024, else S <= 512) and the two-CTA kernel (cfg 2) past that: the
    default call equals that path bitwise and meets the tolerance rule."""
    wg = kernels.get("08_flash_wgmma")
    q, k, v = qkv(B=2, H=8, Sq=S, Skv=S, D=64, dtype=torch.bfloat16, device="cuda", seed=S)
    o, lse = wg(q, k, v, causal=causal, return_lse=True)
    oc, lsec = wg(q, k, v, causal=causal, return_lse=True, num_splits=cfg)
    assert torch.equal(o, oc) and torch.equal(lse, lsec)
    check.assert_close(o, q, k, v, causal=causal, what=f"08_flash_wgmma D = 64 (cfg {cfg})")


@gpu
@needs_sm90
def test_gpu_wgmma_paths_meet_the_rule_on_short_rows():
    """On short rows every cfg of the warp-specialised ladder and the two-CTA kernel (cfg 2, the
    default at D = 64) meet the rule, including rows past the last tile."""
    wg = kernels.get("08_flash_wgmma")
    q, k, v = qkv(B=3, H=32, Sq=77, Skv=333, D=128, dtype=torch.bfloat16, device="cuda", seed=5)
    for causal in (False, True):
        for cfg in (2, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16):
            check.assert_close(wg(q, k, v, causal=causal, num_splits=cfg), q, k, v, causal=causal,
                               what=f"08_flash_wgmma cfg {cfg}")
