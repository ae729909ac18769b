"""Pruning numerics on plain arrays: scores, masks, N:M, SparseGPT, channel least squares."""

import numpy as np
import pytest

from onnxcomp import layerwise
from onnxcomp.errors import OnnxcompError
from onnxcomp.prune import numerics as pn


def _layer(seed=0, out_f=16, in_f=32, samples=512):
    rng = np.random.default_rng(seed)
    # Correlated inputs with uneven scales, as real activations are.
    mix = rng.standard_normal((in_f, in_f)) * 0.3 + np.eye(in_f)
    x = rng.standard_normal((samples, in_f)) @ mix * rng.uniform(0.2, 3.0, in_f)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    h = 2 * x.T @ x / samples
    return w, x, h


def test_layer_mask_prunes_the_smallest_fraction():
    w = np.array([[0.1, -3.0, 0.5, 2.0], [-0.05, 1.0, 0.2, -0.3]])
    mask = pn.layer_mask(pn.magnitude_scores(w), 0.5)
    assert mask.sum() == 4
    assert not mask[1, 0] and not mask[0, 0] and mask[0, 1] and mask[0, 3]


def test_row_mask_prunes_each_output_channel_alike():
    w, _, _ = _layer()
    mask = pn.row_mask(pn.magnitude_scores(w), 0.75)
    assert (mask.sum(axis=1) == 8).all()


def test_global_masks_share_one_threshold():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([0.1, 0.2, 10.0, 20.0])
    masks = pn.global_masks({"a": a, "b": b}, 0.375)
    assert masks["a"].tolist() == [False, True, True, True]
    assert masks["b"].tolist() == [False, False, True, True]


def test_n_m_mask_keeps_two_of_every_four():
    w, _, _ = _layer()
    mask = pn.n_m_mask(pn.magnitude_scores(w), 2, 4)
    assert (mask.reshape(16, -1, 4).sum(axis=2) == 2).all()
    with pytest.raises(OnnxcompError, match="multiple of 4"):
        pn.n_m_mask(np.ones((2, 6)), 2, 4)


def test_wanda_weighs_by_input_norm():
    w = np.ones((2, 3))
    scores = pn.wanda_scores(w, np.array([1.0, 5.0, 0.1]))
    mask = pn.row_mask(scores, 1 / 3)
    assert mask[:, 2].sum() == 0 and mask[:, :2].all()


def test_threshold_and_random():
    w = np.array([0.01, -0.5, 0.02, 1.0])
    assert pn.threshold_mask(w, 0.1).tolist() == [False, True, False, True]
    r = pn.random_scores(np.zeros((4, 4)), seed=3)
    assert np.array_equal(r, pn.random_scores(np.zeros((4, 4)), seed=3))


def test_sparsegpt_beats_magnitude_at_the_same_sparsity():
    w, x, h = _layer()
    mag = np.where(pn.layer_mask(pn.magnitude_scores(w), 0.5), w, 0)
    new, keep = pn.sparsegpt(w, h, sparsity=0.5, blocksize=8)
    assert abs(pn.sparsity_of(new) - 0.5) < 0.02
    assert np.all(new[~keep] == 0)
    err_mag = np.mean((x @ (w - mag).T) ** 2)
    err_sgpt = np.mean((x @ (w - new).T) ** 2)
    assert err_sgpt < 0.6 * err_mag


def test_sparsegpt_with_a_fixed_mask_keeps_it():
    w, x, h = _layer(1)
    mask = pn.row_mask(pn.wanda_scores(w, np.sqrt(np.diag(h))), 0.5)
    new, keep = pn.sparsegpt(w, h, mask=mask)
    assert np.array_equal(keep, mask)
    assert np.all(new[~mask] == 0)
    plain = np.where(mask, w, 0)
    assert layerwise.reconstruction_error(w, new, h) < layerwise.reconstruction_error(w, plain, h)


def test_sparsegpt_2_4():
    w, _, h = _layer(2)
    new, keep = pn.sparsegpt(w, h, pattern=(2, 4))
    assert (keep.reshape(16, -1, 4).sum(axis=2) == 2).all()
    assert np.all(new[~keep] == 0)


def test_masked_least_squares_after_sparsegpt_is_no_worse():
    w, _, h = _layer(3)
    new, keep = pn.sparsegpt(w, h, sparsity=0.7)
    exact = layerwise.masked_least_squares(w, h, keep)
    assert layerwise.reconstruction_error(w, exact, h) <= layerwise.reconstruction_error(w, new, h) * 1.0001
    assert pn.lstsq_cost(keep) > 0


def test_admm_mask_leaves_less_error_than_sparsegpts_after_the_exact_solve():
    for seed in range(3):
        w, _, h = _layer(seed, out_f=24, in_f=48)
        _, sgpt = pn.sparsegpt(w, h, sparsity=0.5, blocksize=16)
        admm = pn.admm_mask(w, h, sparsity=0.5)
        assert np.count_nonzero(~admm) == np.count_nonzero(~sgpt) == w.size // 2
        errors = [layerwise.reconstruction_error(w, layerwise.masked_least_squares(w, h, k), h) for k in (sgpt, admm)]
        assert errors[1] < errors[0]


def test_admm_mask_patterns_and_dead_inputs():
    w, _, h = _layer(4)
    h[:, 5] = h[5, :] = 0.0  # an input that is always 0: its weights go first
    nm = pn.admm_mask(w, h, pattern=(2, 4))
    assert (nm.reshape(16, -1, 4).sum(axis=2) == 2).all()
    rows = pn.admm_mask(w, h, sparsity=0.25, per_row=True)
    assert (rows.sum(axis=1) == 24).all() and not rows[:, 5].any()
    with pytest.raises(OnnxcompError, match="exactly one"):
        pn.admm_mask(w, h)


def test_bad_sparsity_is_named():
    with pytest.raises(OnnxcompError, match="--sparsity"):
        pn.layer_mask(np.ones(4), 1.5)
    with pytest.raises(OnnxcompError, match="--pattern"):
        pn.parse_pattern("4:2")


def test_allocate_by_error_puts_the_zeros_where_the_error_grows_least():
    levels = np.array([0.4, 0.45, 0.5, 0.55, 0.6])
    curves = {"steep": (1000, 10 * levels**2), "flat": (2000, 0.01 * levels), "mid": (1000, levels**2)}
    got = pn.allocate_by_error(curves, levels, 0.52)
    assert got == pytest.approx({"steep": 0.4, "flat": 0.6, "mid": 0.48})
    assert sum(curves[k][0] * s for k, s in got.items()) == pytest.approx(0.52 * 4000)
    with pytest.raises(OnnxcompError, match="outside the levels"):
        pn.allocate_by_error(curves, levels, 0.7)
