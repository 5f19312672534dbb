"""Adam/AdamW against a float64 numpy reference and torch.optim; clipping; schedules vs formulas."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import reference as ref

from pytransformer.train.optim import Adam, AdamW
from pytransformer.train.schedule import Constant, Cosine, InverseSqrt, Noam, schedule_from_dict

SHAPES = {"w": (7, 5), "b": (5,), "emb": (11, 3), "g": (3,)}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def grad_stream(n, seed=1, scale=1.0):
    rng = np.random.default_rng(seed)
    return [
        {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(n)
    ]


def numpy_adam(params, grads_seq, *, lrs, b1, b2, eps, wd, decoupled, decays, max_norm=None):
    """Adam from the paper's pseudo-code in float64 (with AdamW's decoupled decay), one reference
    step per parameter after clipping the global norm to max_norm."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in grads.items()}
        if max_norm is not None:
            norm = ref.global_norm(list(g.values()))
            if norm > max_norm:
                g = {k: x * (max_norm / norm) for k, x in g.items()}
        lr = lrs(t)
        for k in p:
            d = wd if decays[k] else 0.0
            step = ref.adam_step(p[k], g[k], m[k], v[k], lr, b1, b2, eps, d, t, decoupled)
            p[k], m[k], v[k] = step
    return p


def run_ours(opt_cls, params, grads_seq, **kw):
    params = copy.deepcopy(params)
    opt = opt_cls(params, **kw)
    infos = [opt.step(copy.deepcopy(g)) for g in grads_seq]
    return params, opt, infos


@pytest.mark.parametrize(
    "cls, wd, eps",
    [(Adam, 0.0, 1e-9), (Adam, 0.1, 1e-9), (AdamW, 0.05, 1e-8), (Adam, 0.0, 1e-3)],
)
def test_matches_float64_reference(cls, wd, eps):
    params, grads = make_params(), grad_stream(25)
    sched = Noam(d_model=16, warmup=10, factor=2.0)
    ours, opt, infos = run_ours(
        cls, params, grads, lr=sched, betas=(0.9, 0.98), eps=eps, weight_decay=wd
    )
    want = numpy_adam(
        params,
        grads,
        lrs=sched,
        b1=0.9,
        b2=0.98,
        eps=eps,
        wd=wd,
        decoupled=cls is AdamW,
        decays={k: len(s) >= 2 for k, s in SHAPES.items()},
    )
    for k in params:
        np.testing.assert_allclose(ours[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert opt.step_count == 25
    assert [i["lr"] for i in infos] == [sched(t) for t in range(1, 26)]


@pytest.mark.parametrize("decoupled, wd", [(False, 0.0), (False, 0.01), (True, 0.1)])
def test_matches_torch_optim(decoupled, wd):
    torch = pytest.importorskip("torch")
    params, grads = make_params(3), grad_stream(20, seed=4)
    ours, _, _ = run_ours(
        Adam,
        params,
        grads,
        lr=3e-3,
        betas=(0.9, 0.98),
        eps=1e-9,
        weight_decay=wd,
        decoupled=decoupled,
        decay_filter=lambda n, p: True,
    )
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    topt = cls(list(tparams.values()), lr=3e-3, betas=(0.9, 0.98), eps=1e-9, weight_decay=wd)
    for g in grads:
        for k, p in tparams.items():
            p.grad = torch.from_numpy(g[k].copy())
        topt.step()
    for k in params:
        np.testing.assert_allclose(
            ours[k], tparams[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k
        )


def test_decay_filter_leaves_biases_alone():
    params = make_params()
    zero = [{k: np.zeros(s, np.float32) for k, s in SHAPES.items()}] * 3
    ours, _, _ = run_ours(AdamW, params, zero, lr=0.1, weight_decay=0.5)
    for k in params:  # zero gradients: only the decay moves a parameter
        if len(SHAPES[k]) >= 2:
            np.testing.assert_allclose(ours[k], params[k] * (1 - 0.1 * 0.5) ** 3, rtol=1e-6)
        else:
            np.testing.assert_array_equal(ours[k], params[k])


@pytest.mark.parametrize("scale, max_norm", [(10.0, 1.0), (0.01, 1.0), (1.0, 0.3)])
def test_clipping(scale, max_norm):
    params, grads = make_params(), grad_stream(6, scale=scale)
    norms = [ref.global_norm(list(g.values())) for g in grads]
    ours, _, infos = run_ours(Adam, params, grads, lr=1e-2, max_grad_norm=max_norm)
    np.testing.assert_allclose([i["grad_norm"] for i in infos], norms, rtol=1e-6)
    want = numpy_adam(
        params,
        grads,
        lrs=lambda t: 1e-2,
        b1=0.9,
        b2=0.98,
        eps=1e-9,
        wd=0.0,
        decoupled=False,
        decays=dict.fromkeys(SHAPES, False),
        max_norm=max_norm,
    )
    for k in params:
        np.testing.assert_allclose(ours[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    g = grads[0]
    Adam(make_params(), lr=1e-3, max_grad_norm=max_norm).step(g)  # clips the given arrays in place
    after = ref.global_norm(list(g.values()))
    assert after == pytest.approx(min(norms[0], max_norm), rel=1e-5)


def test_state_dict_resume_is_bit_identical():
    params, grads = make_params(), grad_stream(10)
    straight, _, _ = run_ours(Adam, params, grads, lr=Noam(8, 4))
    first = copy.deepcopy(params)
    opt = Adam(first, lr=Noam(8, 4))
    for g in grads[:4]:
        opt.step(copy.deepcopy(g))
    state = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(first)
    opt2 = Adam(resumed, lr=Noam(8, 4))
    opt2.load_state_dict(state)
    assert opt2.step_count == 4
    for g in grads[4:]:
        opt2.step(copy.deepcopy(g))
    for k in params:
        assert np.array_equal(resumed[k], straight[k]), k


@pytest.mark.parametrize("max_norm, bad", [(None, np.nan), (1.0, np.nan), (1.0, np.inf)])
def test_non_finite_gradients_leave_everything_untouched(max_norm, bad):
    params = make_params()
    opt = Adam(params, lr=1e-2, max_grad_norm=max_norm)
    opt.step(grad_stream(1)[0])
    before_p, before_m = copy.deepcopy(params), copy.deepcopy(opt.m)
    grads = grad_stream(1, seed=9)[0]
    grads["w"][2, 3] = bad
    with pytest.raises(FloatingPointError, match="update 2"):
        opt.step(grads)
    assert opt.step_count == 1
    for k in params:
        assert np.array_equal(params[k], before_p[k]) and np.array_equal(opt.m[k], before_m[k])


def test_untracked_norm_is_not_computed():
    params, grads = make_params(), grad_stream(2)
    _, _, infos = run_ours(Adam, params, grads, lr=1e-3, track_grad_norm=False)
    assert [i["grad_norm"] for i in infos] == [None, None]
    _, _, infos = run_ours(Adam, params, grads, lr=1e-3, track_grad_norm=False, max_grad_norm=5.0)
    assert all(i["grad_norm"] > 0 for i in infos)  # clipping needs (and reports) it anyway


def test_validation():
    params = make_params()
    with pytest.raises(ValueError, match="params"):
        Adam({})
    with pytest.raises(TypeError, match=r"params\['x'\]"):
        Adam({"x": np.zeros(3)})
    with pytest.raises(ValueError, match=r"params\['x'\]"):
        Adam({"x": np.zeros((3, 4), np.float32).T})
    for kw, name in [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ]:
        with pytest.raises(ValueError, match=name):
            Adam(params, **kw)
    opt = Adam(params)
    g = grad_stream(1)[0]
    with pytest.raises(ValueError, match="missing"):
        opt.step({k: v for k, v in g.items() if k != "b"})
    with pytest.raises(ValueError, match=r"grads\['w'\]"):
        opt.step({**g, "w": np.zeros((5, 7), np.float32)})
    with pytest.raises(TypeError, match=r"grads\['w'\]"):
        opt.step({**g, "w": g["w"].astype(np.float64)})
    with pytest.raises(ValueError, match="lr"):
        Adam(params, lr=lambda t: float("inf")).step(g)
    with pytest.raises(ValueError, match=r"state\['m'\]"):
        opt.load_state_dict({"step": 1, "m": {}, "v": opt.v})
    with pytest.raises(ValueError, match=r"state\['v'\]\['w'\]"):
        opt.load_state_dict({"step": 1, "m": opt.m, "v": {**opt.v, "w": np.zeros(3)}})
    with pytest.raises(TypeError, match="decoupled"):
        AdamW(params, decoupled=False)


# ---------------------------------------------------------------------------------------------
# schedules


def test_noam_matches_the_paper():
    s = Noam(d_model=512, warmup=4000)
    for step in (1, 2, 100, 3999, 4000, 4001, 10_000, 100_000):
        want = 512**-0.5 * min(step**-0.5, step * 4000**-1.5)
        assert s(step) == pytest.approx(want, rel=1e-12)
    assert max(range(1, 20_000, 7), key=s) in range(3994, 4007)  # peak at the warm-up's end
    assert s(4000) == pytest.approx((512 * 4000) ** -0.5)
    assert Noam(512, 4000, factor=2.0)(123) == pytest.approx(2 * s(123))


def test_other_schedules_match_their_formulas():
    c = Constant(0.5)
    assert [c(t) for t in (1, 10, 10**6)] == [0.5] * 3
    cw = Constant(0.5, warmup=10)
    assert cw(1) == pytest.approx(0.05) and cw(10) == 0.5 and cw(11) == 0.5
    inv = InverseSqrt(peak_lr=1e-3, warmup=100)
    assert inv(50) == pytest.approx(5e-4) and inv(100) == pytest.approx(1e-3)
    assert inv(400) == pytest.approx(1e-3 * 0.5)
    cos = Cosine(peak_lr=1.0, total_steps=110, warmup=10, min_lr=0.1)
    assert cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the cosine is at 0
    assert cos(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "sched",
    [Noam(64, 10, 0.5), Constant(1e-3, 5), InverseSqrt(2e-3, 50), Cosine(1e-3, 100, 10, 1e-5)],
)
def test_schedule_round_trip_and_step_check(sched):
    again = schedule_from_dict(json.loads(json.dumps(sched.to_dict())))
    assert again == sched and [again(t) for t in range(1, 200)] == [sched(t) for t in range(1, 200)]
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="step"):
            sched(bad)


def test_schedule_validation():
    with pytest.raises(ValueError, match="d_model"):
        Noam(0)
    with pytest.raises(ValueError, match="warmup"):
        Cosine(1.0, total_steps=10, warmup=10)
    with pytest.raises(ValueError, match="min_lr"):
        Cosine(1.0, total_steps=10, min_lr=2.0)
    with pytest.raises(ValueError, match="schedule"):
        schedule_from_dict({"name": "step"})
    with pytest.raises(ValueError, match="unknown"):
        schedule_from_dict({"name": "noam", "d_model": 8, "gamma": 1})
