"""Training: the hand-written backward against central finite differences (float64) and against
torch autograd, the forward against the inference reference, and the WKV operator's backward on
its own from a non-zero initial state.

Tolerances: central differences with step h have truncation error O(h^2) and rounding error
O(eps_64 |L| / h). Measured on the tiny model: the error falls from ~4e-10 at h = 1e-6 to ~5e-12 at
h = 1e-4 (rounding-dominated), so h = 1e-4. A gradient passes when
|numeric - analytic| <= 1e-5 * max|gradient of that tensor| + 1e-9: the 1e-9 floor is ~100x the
measured noise, needed for tensors whose whole gradient is ~1e-6 (x_w, w0: the decay path is
weak at initialisation). A wrong term gives errors of the order of the gradient itself. Against
torch autograd, both are exact float64 computations of one function in a different order: 1e-10.
"""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import train
from tinyrwkv.synthetic import make_weights

from conftest import have, random_wkv_inputs

FD_STEP = 1e-4
TOL_FD = 1e-5
FD_FLOOR = 1e-9
TOL_TORCH = 1e-10


def tiny(L=2, C=32, N=16, V=37, seed=0):
    return make_weights(L, C, V, head_size=N, dim_ffn=48, ranks=(8, 8, 4, 8), seed=seed,
                        dtype=np.float64)


def batch(V, B=2, T=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def test_training_forward_is_the_reference_forward():
    """The loss from train.py's batched forward equals the cross-entropy of model.py's logits."""
    w = tiny()
    ids, targets = batch(37, B=3, T=9)
    loss, _ = train.loss_and_grad(w, ids, targets)
    model = tinyrwkv.RWKV7(w, dtype="float64")
    total = 0.0
    for row, tgt in zip(ids, targets):
        logits, _ = model.forward(row, full_output=True)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(tgt)), tgt].sum()
    assert abs(loss - total / ids.size) < 1e-12


def test_wkv_backward_matches_finite_differences():
    """The operator alone, from a non-zero initial state, T spanning several checkpoint chunks."""
    rng = np.random.default_rng(1)
    B, T, H, N = 2, 21, 2, 4
    r, w, k, v, alpha, beta, S0 = random_wkv_inputs(rng, B, T, H, N)
    Ry, RS = rng.standard_normal((B, T, H, N)), rng.standard_normal((B, H, N, N))

    def loss(S0, *inputs):
        S, y, _ = train.wkv_forward(S0, *inputs, chunk=8)
        return (y * Ry).sum() + (S * RS).sum()

    inputs = [r, w, k, v, alpha, beta]
    _, _, saved = train.wkv_forward(S0, *inputs, chunk=8)
    grads = train.wkv_backward(RS, Ry, saved, *inputs, chunk=8)     # dS0, dr, dw, dk, dv, da, db
    for n, (x, g) in enumerate(zip(inputs + [S0], list(grads[1:]) + [grads[0]])):
        for idx in map(tuple, rng.integers(0, x.shape, (6, x.ndim))):
            xp, xm = x.copy(), x.copy()
            xp[idx] += FD_STEP
            xm[idx] -= FD_STEP
            args = [a for a in inputs]
            if n < 6:
                args[n] = xp
                fp = loss(S0, *args)
                args[n] = xm
                fm = loss(S0, *args)
            else:
                fp, fm = loss(xp, *inputs), loss(xm, *inputs)
            fd = (fp - fm) / (2 * FD_STEP)
            assert abs(fd - g[idx]) <= TOL_FD * np.abs(g).max() + FD_FLOOR, (n, idx, fd, g[idx])


def test_every_parameter_gradient_matches_finite_differences():
    """Sampled entries of every parameter tensor of a 2-layer model (value residual included)."""
    w = tiny()
    ids, targets = batch(37)
    loss, grads = train.loss_and_grad(w, ids, targets)
    assert set(grads) == set(w) and all(grads[k].shape == w[k].shape for k in w)
    rng = np.random.default_rng(2)
    worst = {}
    for key, value in w.items():
        if key in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):   # unused in layer 0
            assert not grads[key].any()
            continue
        g = grads[key]
        scale = max(np.abs(g).max(), 1e-8)
        # The step scales with the tensor: emb.weight is ~1e-4 (LayerNorm then divides by that).
        h = FD_STEP * min(1.0, np.abs(value).max())
        flat = rng.choice(value.size, size=min(3, value.size), replace=False)
        for f in flat:
            idx = np.unravel_index(f, value.shape)
            wp, wm = dict(w), dict(w)
            wp[key], wm[key] = value.copy(), value.copy()
            wp[key][idx] += h
            wm[key][idx] -= h
            fd = (train.loss_and_grad(wp, ids, targets)[0]
                  - train.loss_and_grad(wm, ids, targets)[0]) / (2 * h)
            worst[key] = max(worst.get(key, 0.0), (abs(fd - g[idx]) - FD_FLOOR) / scale)
    bad = {k: e for k, e in worst.items() if e > TOL_FD}
    print(f"finite differences, worst relative error over {len(worst)} tensors: "
          f"{max(worst.values()):.1e}")
    assert not bad, bad


@pytest.mark.skipif(not have("torch"), reason="torch not installed (pip install -e '.[test]')")
def test_gradients_match_torch_autograd():
    """The same model written with torch ops (test-only), differentiated by autograd."""
    import torch
    w = tiny(L=3, seed=4)
    ids, targets = batch(37, B=2, T=11, seed=5)
    loss, grads = train.loss_and_grad(w, ids, targets)
    tw = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    tloss = torch_loss(tw, torch.tensor(ids), torch.tensor(targets))
    tloss.backward()
    assert abs(tloss.item() - loss) < 1e-12
    for key in w:
        tg = tw[key].grad
        tg = np.zeros_like(w[key]) if tg is None else tg.numpy()
        scale = max(np.abs(tg).max(), 1e-12)
        assert np.abs(grads[key] - tg).max() <= TOL_TORCH * max(scale, 1.0), key


def torch_loss(P, ids, targets):
    """RWKV-7 x070 in torch, following the official package's sequence form, batched."""
    import torch
    import torch.nn.functional as F
    B, T = ids.shape
    V, C = P["emb.weight"].shape
    H, N = P["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in P if k.startswith("blocks."))
    ln = lambda x, w, b: F.layer_norm(x, (C,), w, b, eps=1e-5)
    x = ln(P["emb.weight"][ids], P["blocks.0.ln0.weight"], P["blocks.0.ln0.bias"])
    v_first = None
    for i in range(L):
        p = lambda n: P[f"blocks.{i}.{n}"]
        flat = lambda n: p(n).reshape(-1)
        xa = ln(x, p("ln1.weight"), p("ln1.bias"))
        prev = torch.cat([torch.zeros_like(xa[:, :1]), xa[:, :-1]], dim=1)
        dx = prev - xa
        xr, xw, xk, xv, xa_, xg = (xa + dx * flat(f"att.x_{c}") for c in "rwkvag")
        r = xr @ p("att.receptance.weight").T
        k = xk @ p("att.key.weight").T
        v = xv @ p("att.value.weight").T
        w_pre = flat("att.w0") + torch.tanh(xw @ p("att.w1")) @ p("att.w2")
        a = torch.sigmoid(flat("att.a0") + (xa_ @ p("att.a1")) @ p("att.a2"))
        g = torch.sigmoid(xg @ p("att.g1")) @ p("att.g2")
        kh = F.normalize((k * flat("att.k_k")).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * flat("att.k_a"))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(flat("att.v0") + (xv @ p("att.v1")) @ p("att.v2"))
        w = torch.exp(-np.exp(-0.5) * torch.sigmoid(w_pre))
        S = torch.zeros(B, H, N, N, dtype=x.dtype)
        ys = []
        hd = lambda u, t: u[:, t].view(B, H, N)
        for t in range(T):
            sa = (S @ (-hd(kh, t))[..., None])                               # (B, H, N, 1)
            S = S * hd(w, t)[:, :, None, :] + sa * (hd(kh, t) * hd(a, t))[:, :, None, :] \
                + hd(v, t)[..., None] * hd(k, t)[:, :, None, :]
            ys.append((S @ hd(r, t)[..., None])[..., 0].reshape(B, C))
        y = torch.stack(ys, dim=1)
        y = F.group_norm(y.reshape(B * T, C), H, p("att.ln_x.weight"), p("att.ln_x.bias"),
                         eps=64e-5).view(B, T, C)
        bonus = ((r * k * flat("att.r_k")).view(B, T, H, N).sum(-1, keepdim=True)
                 * v.view(B, T, H, N)).view(B, T, C)
        x = x + ((y + bonus) * g) @ p("att.output.weight").T
        xf = ln(x, p("ln2.weight"), p("ln2.bias"))
        prevf = torch.cat([torch.zeros_like(xf[:, :1]), xf[:, :-1]], dim=1)
        kx = xf + (prevf - xf) * flat("ffn.x_k")
        x = x + torch.relu(kx @ p("ffn.key.weight").T) ** 2 @ p("ffn.value.weight").T
    logits = ln(x, P["ln_out.weight"], P["ln_out.bias"]) @ P["head.weight"].T
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


def test_float32_in_float32_out_and_bad_input():
    w = {k: v.astype(np.float32) for k, v in tiny().items()}
    ids, targets = batch(37)
    loss, grads = train.loss_and_grad(w, ids, targets)
    assert all(g.dtype == np.float32 for g in grads.values())
    loss64, grads64 = train.loss_and_grad(tiny(), ids, targets)
    assert abs(loss - loss64) < 1e-5
    with pytest.raises(ValueError, match="token ids"):
        train.loss_and_grad(w, ids, targets + 100)
    with pytest.raises(ValueError, match="same shape"):
        train.loss_and_grad(w, ids, targets[:, :3])
    with pytest.raises(ValueError, match="DeepEmbed"):
        train.loss_and_grad(make_weights(1, 64, 50, deep_embed=True), ids, targets)


@pytest.mark.skipif(not have("numba"), reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_wkv_kernels_match_numpy(dtype):
    """The Numba WKV forward/backward = train's, from a non-zero state, T not a chunk multiple."""
    from tinyrwkv.backends import numba_train as train_fast
    rng = np.random.default_rng(7)
    B, T, H, N = 2, 37, 3, 16
    r, w, k, v, alpha, beta, S0 = random_wkv_inputs(rng, B, T, H, N, dtype)
    dy, dS = rng.standard_normal((B, T, H, N)).astype(dtype), rng.standard_normal((B, H, N, N)).astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-5      # float32: rounding of N-long sums, T steps
    ref_f = train.wkv_forward(S0, r, w, k, v, alpha, beta)
    got_f = train_fast.wkv_forward(S0, r, w, k, v, alpha, beta)
    for a, b in zip(ref_f, got_f):
        assert np.abs(a - b).max() <= tol * np.abs(a).max()
    ref_b = train.wkv_backward(dS, dy, ref_f[2], r, w, k, v, alpha, beta)
    got_b = train_fast.wkv_backward(dS, dy, got_f[2], r, w, k, v, alpha, beta)
    for a, b in zip(ref_b, got_b):
        assert b.dtype == dtype
        assert np.abs(a - b).max() <= tol * np.abs(a).max()
