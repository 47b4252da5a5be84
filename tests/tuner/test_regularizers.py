"""The regularisers against dense, literal implementations of method.md section 2."""

import pytest
import torch
from peft import get_peft_model

from peft_masm import MASMConfig
from peft_masm.tuner import stacked
from peft_masm.tuner.layer import MASMLayer
from peft_masm.tuner.regularizers import stacked_terms

from .conftest import tiny_vit


def _dense_reference(W, U, s, V, U0, s0, V0, k, gamma):
    """method.md section 2, literally, with the scale-free normalisation (rho^2 = ||W||_F^2 / d)."""
    K = U.shape[1] // k
    Us = [U[:, j * k : (j + 1) * k] for j in range(K)]
    Vs = [V[:, j * k : (j + 1) * k] for j in range(K)]
    ss = [s[j * k : (j + 1) * k] for j in range(K)]
    columns = K * k
    rho2 = W.square().sum() / min(W.shape)
    eye = torch.eye(k, dtype=W.dtype)
    cross = sum(
        (Us[i].T @ Us[j]).square().sum() + (Vs[i].T @ Vs[j]).square().sum()
        for i in range(K)
        for j in range(i + 1, K)
    )
    within = sum(
        (Us[j].T @ Us[j] - eye).square().sum() + (Vs[j].T @ Vs[j] - eye).square().sum() for j in range(K)
    )
    WP = W - (U0 * s0) @ V0.T
    leakage = sum((WP.T @ Us[j]).square().sum() + (WP @ Vs[j]).square().sum() for j in range(K))
    W_new = WP + (U * s) @ V.T  # = W + Delta
    drift = ((W_new.square().sum() - W.square().sum()) / W.square().sum()) ** 2
    fit = 0.0
    if gamma is not None:
        fit = sum(
            torch.relu(torch.linalg.matrix_norm((Us[j] * ss[j]) @ Vs[j].T, ord=2) / rho2.sqrt() - gamma) ** 2
            for j in range(K)
        )
    return {
        "orthogonality": (cross + within) / columns + leakage / (2 * columns * rho2),
        "spectral": drift + fit,
    }


def _terms_of_stack(layers, k, gamma):
    """``stacked_terms`` of layers given as (W, U, s, V, U0, s0, V0) each, stacked as ``stacked.py`` stacks them."""
    W = torch.stack([layer[0] for layer in layers])
    U, s, V, U0, s0, V0 = (torch.stack([layer[i] for layer in layers]) for i in range(1, 7))
    energy = W.square().sum(dim=(-2, -1))
    return stacked_terms(W.mT @ U, W @ V, U, s, V, U0, s0, V0, energy, min(W.shape[-2:]), k, gamma)


def _moved_layer(seed, K, k, m, n, scale=1.0):
    """A random float64 weight, its K*k minor triplets and factors moved away from them."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, dtype=torch.float64, generator=generator) * scale
    u, sv, vh = torch.linalg.svd(W, full_matrices=False)
    U0, s0, V0 = u[:, -K * k :], sv[-K * k :], vh[-K * k :].T
    U = U0 + 0.2 * torch.randn(U0.shape, dtype=W.dtype, generator=generator)
    V = V0 + 0.2 * torch.randn(V0.shape, dtype=W.dtype, generator=generator)
    return W, U, s0 * 3 + 0.5 * scale, V, U0, s0, V0


@pytest.mark.parametrize("gamma", [0.05, None])
@pytest.mark.parametrize("k", [1, 3])
def test_stacked_terms_match_the_dense_formulas_for_each_layer(k, gamma):
    layers = [_moved_layer(seed, K=3, k=k, m=40, n=30, scale=1.0 + seed) for seed in range(3)]
    ours = _terms_of_stack(layers, k, gamma)
    for i, layer in enumerate(layers):
        ref = _dense_reference(*layer, k, gamma)
        for key in ("orthogonality", "spectral"):
            torch.testing.assert_close(ours[key][i], ref[key], rtol=1e-8, atol=1e-10)
        assert ref["spectral"] > 0 and ref["orthogonality"] > 0


def _rescaled_terms(scale: float, shape=(48, 32), K=2, k=2):
    """The terms of one perturbed layer whose weight is multiplied by ``scale`` (factors moved alike)."""
    torch.manual_seed(1)
    W = torch.randn(*shape, dtype=torch.float64) * scale
    u, sv, vh = torch.linalg.svd(W, full_matrices=False)
    U0, s0, V0 = u[:, -K * k :], sv[-K * k :], vh[-K * k :].T
    U = U0 + 0.3 * torch.randn_like(U0) / shape[0] ** 0.5
    V = V0 + 0.3 * torch.randn_like(V0) / shape[1] ** 0.5
    rho = float((W.square().sum() / min(shape)).sqrt())
    s = s0 + 2.0 * rho  # every subspace grew to twice the layer's RMS singular value
    terms = _terms_of_stack([(W, U, s, V, U0, s0, V0)], k, 1.0)
    return {key: value[0] for key, value in terms.items()}


def test_terms_are_scale_free_and_of_order_one():
    """The terms do not depend on the weight's scale, and stay O(1) after a move of the layer's own size.

    The old normalisation (leakage / sigma_r^2, fit bound against sigma_r) read 1e2..6.5e6 on such layers."""
    small, large = _rescaled_terms(1e-3), _rescaled_terms(1e3)
    for key in ("orthogonality", "spectral"):
        torch.testing.assert_close(small[key], large[key], rtol=1e-6, atol=1e-9)
        assert 1e-3 < float(small[key]) < 10.0


def test_regularization_loss_is_zero_at_init_and_differentiable():
    config = MASMConfig(num_subspaces=2, subspace_rank=2, orthogonality_weight=0.5, spectral_weight=2.0)
    model = get_peft_model(tiny_vit(), config)
    terms = model.base_model.regularization_loss()
    assert set(terms) == {"orthogonality", "spectral", "total"}
    assert float(terms["orthogonality"]) < 1e-6 and float(terms["spectral"]) < 1e-6
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, MASMLayer)):
            for p in layer.masm_U["default"]:
                p.add_(0.1 * torch.randn_like(p))
            for p in layer.masm_s["default"]:
                p.add_(0.05)
    terms = model.base_model.regularization_loss()
    torch.testing.assert_close(terms["total"], 0.5 * terms["orthogonality"] + 2.0 * terms["spectral"])
    terms["total"].backward()
    grads = [p.grad for n, p in model.named_parameters() if "masm_U" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unweighted_terms_are_skipped_unless_asked_for():
    model = get_peft_model(tiny_vit(), MASMConfig(num_subspaces=2, subspace_rank=2, init_weights=False))
    skipped = model.base_model.regularization_loss()
    assert float(skipped["total"]) == 0.0
    assert torch.isnan(skipped["orthogonality"]) and torch.isnan(skipped["spectral"])
    computed = model.base_model.regularization_loss(compute_all=True)
    assert float(computed["orthogonality"]) > 0 and float(computed["total"]) == 0.0


@pytest.mark.parametrize("fit_constraint", ["penalty", "projection"])
@pytest.mark.parametrize("subspace_alpha", [100.0, None])
def test_regularization_loss_is_the_dense_formula_of_each_layer(fit_constraint, subspace_alpha):
    """regularization_loss computes same-shape layers as one stack (issue 12): each layer's values (from
    stacked.regularization_terms, as the model and the benchmarks read them) and the mean's gradient are those of
    method.md's dense formulas of that layer, in a model whose layers have two shapes (attention + MLP)."""
    from peft_masm import default_target_modules

    config = MASMConfig(
        num_subspaces=2,
        subspace_rank=2,
        orthogonality_weight=1.0,
        spectral_weight=1.0,
        init_weights=False,
        fit_constraint=fit_constraint,
        fit_bound=0.01,
        subspace_alpha=subspace_alpha,
        target_modules=default_target_modules("vit", include_mlp=True),
    )
    model = get_peft_model(tiny_vit(), config)
    layers = [m for m in model.modules() if isinstance(m, MASMLayer)]
    assert len({(layer.out_features, layer.in_features) for layer in layers}) > 1
    mean = model.base_model.regularization_loss()
    params = [p for n, p in model.named_parameters() if "masm_" in n and p.requires_grad]
    grads = torch.autograd.grad(mean["total"], params)
    gamma = 0.01 if fit_constraint == "penalty" else None
    dense = [_dense_reference(*_float64_factors(layer), 2, gamma) for layer in layers]
    groups = stacked.same_shape_groups(layers, "default")
    assert len(groups) > 1
    for group in groups:
        terms = stacked.regularization_terms(group, "default")
        for i, layer in enumerate(group):
            want = dense[layers.index(layer)]
            for key in ("orthogonality", "spectral"):
                torch.testing.assert_close(terms[key][i].double(), want[key], rtol=1e-4, atol=1e-8)
    for key in ("orthogonality", "spectral"):
        expected = torch.stack([terms[key] for terms in dense]).mean()
        torch.testing.assert_close(mean[key].double(), expected, rtol=1e-4, atol=1e-8)
        assert float(expected) > 0
    expected_total = sum(t["orthogonality"] + t["spectral"] for t in dense) / len(layers)
    for got, want in zip(grads, torch.autograd.grad(expected_total, params)):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-6)


def _float64_factors(layer):
    """(W, U, s, V, U0, s0, V0) of a layer in float64, differentiable in its trainable factors."""
    U, s, V = layer.factors("default")
    frozen = (layer.masm_U0["default"], layer.masm_s0["default"], layer.masm_V0["default"])
    return tuple(t.double() for t in (layer.get_base_layer().weight, U, s, V, *frozen))


@pytest.mark.parametrize("subspace_alpha", [100.0, None])
def test_fit_bound_projection_of_the_stack_matches_each_layer_and_leaves_the_rest_bit_equal(subspace_alpha):
    """apply_fit_bound projects all same-shape layers as one stack (issue 12): a subspace over the bound lands
    on it, as the per-layer projection puts it; a subspace under the bound keeps its exact value (the old
    write-back of every subspace, ((s0 + u t) - s0) / u, rounded values that were never limited)."""
    config = MASMConfig(
        num_subspaces=2, subspace_rank=2, fit_bound=0.5, subspace_alpha=subspace_alpha, init_weights=False
    )
    model = get_peft_model(tiny_vit(), config)
    layers = [m for m in model.modules() if isinstance(m, MASMLayer)]
    with torch.no_grad():  # subspace 1 of the first layer (columns 2:4 of its one masm_s tensor)
        layers[0].masm_s["default"][0][2:4].mul_(1e3).add_(1e3 if subspace_alpha is None else 10.0)
    single = get_peft_model(tiny_vit(), config)
    single.load_state_dict(model.state_dict())

    def per_subspace(layer):
        return torch.cat(list(layer.masm_s["default"])).detach().clone().split(2)

    before = [per_subspace(layer) for layer in layers]
    limited = model.base_model.apply_fit_bound()
    assert int(limited) >= 1
    single_layers = [m for m in single.modules() if isinstance(m, MASMLayer)]
    assert sum(int(stacked.project_fit_bound([layer], "default")) for layer in single_layers) == int(limited)
    for layer, twin, old in zip(layers, single_layers, before):
        norms = stacked.subspace_norms([layer], "default")[0]
        assert float(norms.max()) <= 0.5 * (1 + 1e-5)
        for j, (p, q, b) in enumerate(zip(per_subspace(layer), per_subspace(twin), old)):
            torch.testing.assert_close(p, q)
            if float(norms[j]) < 0.5 * (1 - 1e-4):
                assert torch.equal(p, b)


@pytest.mark.parametrize("per_subspace", [False, True], ids=["one-tensor", "per-subspace"])
def test_fit_bound_with_frozen_singular_values_scales_the_vectors_and_never_writes_s(per_subspace):
    """train_factors="vectors" freezes masm_s, so the projection shrinks U_j and V_j instead (issue 26: it scaled
    the frozen s, which PEFT's test_only_params_are_updated caught once the fit bound ran inside every step)."""
    layout = {"layer_mask": "dynamic", "mask_granularity": "subspace"} if per_subspace else {}
    config = MASMConfig(num_subspaces=2, subspace_rank=2, train_factors="vectors", **layout)
    model = get_peft_model(tiny_vit(), config)
    layers = [m for m in model.modules() if isinstance(m, MASMLayer)]

    def factor(layer, name):
        return torch.cat(list(getattr(layer, name)["default"]), dim=-1).detach().clone()

    with torch.no_grad():  # subspace 1 of the first layer: 30 x its U columns, 30 x its V columns
        grown = layers[0].masm_U["default"][1] if per_subspace else layers[0].masm_U["default"][0][:, 2:4]
        grown.mul_(30.0)
        grown = layers[0].masm_V["default"][1] if per_subspace else layers[0].masm_V["default"][0][:, 2:4]
        grown.mul_(30.0)
    assert float(stacked.subspace_norms([layers[0]], "default")[0][1]) > 100
    before = [{name: factor(layer, name) for name in ("masm_U", "masm_s", "masm_V")} for layer in layers]
    limited = model.base_model.apply_fit_bound()
    assert int(limited) >= 1
    for layer, old in zip(layers, before):
        assert not any(p.requires_grad for p in layer.masm_s["default"])
        assert torch.equal(factor(layer, "masm_s"), old["masm_s"])  # the frozen factor is never written
        norms = stacked.subspace_norms([layer], "default")[0]
        assert float(norms.max()) <= 1 + 1e-5
        for j, norm in enumerate(norms.tolist()):
            cols = slice(2 * j, 2 * j + 2)
            for name in ("masm_U", "masm_V"):
                new, was = factor(layer, name)[:, cols], old[name][:, cols]
                if norm < 1 - 1e-4:
                    assert torch.equal(new, was)  # under the bound: untouched
                else:  # on the bound: the same directions, shorter
                    ratio = new.norm() / was.norm()
                    assert float(ratio) < 1
                    torch.testing.assert_close(new, was * ratio)
    assert float(stacked.subspace_norms([layers[0]], "default")[0][1]) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_subspace_spectral_norms_equal_the_dense_norm_also_for_degenerate_blocks(k):
    from peft_masm.tuner.regularizers import subspace_spectral_norms

    generator = torch.Generator().manual_seed(k)
    num, m, n = 4, 24, 20
    U = torch.randn(2, m, num * k, generator=generator, dtype=torch.float64)
    V = torch.randn(2, n, num * k, generator=generator, dtype=torch.float64)
    s = torch.rand(2, num * k, generator=generator, dtype=torch.float64) * 1e-3
    if k > 1:
        U[1, :, 1] = U[1, :, 0]  # a rank-deficient block
        s[1, k : 2 * k] = s[1, k]  # equal singular values in another
    s[1, -k:] = 0  # a zero block
    got = subspace_spectral_norms(U.float(), s.float(), V.float(), k).double()
    blocks = [
        [
            U[b, :, j * k : (j + 1) * k]
            @ torch.diag(s[b, j * k : (j + 1) * k])
            @ V[b, :, j * k : (j + 1) * k].T
            for j in range(num)
        ]
        for b in range(2)
    ]
    dense = torch.tensor(
        [[float(torch.linalg.matrix_norm(x, ord=2)) for x in row] for row in blocks], dtype=torch.float64
    )
    torch.testing.assert_close(got, dense, rtol=2e-6, atol=1e-12)
    # Its gradient stays finite at the degenerate blocks (the penalty differentiates it).
    leaves = [t.float().requires_grad_() for t in (U, s, V)]
    subspace_spectral_norms(*leaves, k).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_subspace_movement_and_norms_are_the_dense_values_of_each_layer():
    """MASMModel.subspace_movement (stacked.subspace_movement, one stack per shape) and stacked.subspace_norms
    equal ||U_j s_j V_j^T - U0_j s0_j V0_j^T||_F / rho and ||U_j s_j V_j^T||_2 / rho formed densely, per layer."""
    from peft_masm import default_target_modules

    config = MASMConfig(
        num_subspaces=2,
        subspace_rank=2,
        init_weights=False,
        target_modules=default_target_modules("vit", include_mlp=True),
    )
    model = get_peft_model(tiny_vit(), config)
    movement = model.base_model.subspace_movement()
    named = list(model.base_model.masm_layers("default"))
    assert list(movement) == [name for name, _ in named]
    for name, layer in named:
        U, s, V = (t.detach().double() for t in layer.factors("default"))
        U0, s0, V0 = (
            layer.masm_U0["default"].double(),
            layer.masm_s0["default"].double(),
            layer.masm_V0["default"].double(),
        )
        rho = layer.reference_scale_value("default")
        moved, norms = [], []
        for j in range(2):
            cols = slice(2 * j, 2 * j + 2)
            M = (U[:, cols] * s[cols]) @ V[:, cols].T
            moved.append(float(torch.linalg.matrix_norm(M - (U0[:, cols] * s0[cols]) @ V0[:, cols].T)) / rho)
            norms.append(float(torch.linalg.matrix_norm(M, ord=2)) / rho)
        assert movement[name] == pytest.approx(moved, rel=1e-4)
        assert stacked.subspace_norms([layer], "default")[0].tolist() == pytest.approx(norms, rel=1e-4)
        assert min(moved) > 0


def test_an_all_zero_weight_gets_finite_factors_and_trains_finite():
    """A zero-initialised target weight (rho = 0): get_peft_model gives finite factors (the minor-spectrum solver
    divided by its zero singular values), and a step with the regularisers and the fit bound keeps them finite
    (the projection scaled a zero-norm subspace against a zero bound by 0 / 0)."""
    base = tiny_vit()
    with torch.no_grad():
        base.vit.layers[0].attention.q_proj.weight.zero_()
    config = MASMConfig(num_subspaces=2, subspace_rank=2, orthogonality_weight=0.1, spectral_weight=0.1)
    model = get_peft_model(base, config)
    params = [p for n, p in model.named_parameters() if "masm_" in n and p.requires_grad]
    assert all(torch.isfinite(p).all() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(pixel_values=pixels).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in params)
    assert torch.isfinite(model(pixel_values=pixels).logits).all()
