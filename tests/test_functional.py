"""The losses against float64 references, closed forms and their input checks."""

import math

import pytest
import torch

import sigreg
import sigreg.distributed
import sigreg.functional
from sigreg.functional import trapezoid_weights
from sigreg.reference import epps_pulley_integrand, strong_sigreg_reference, weak_sigreg_reference


def reference_weak(z, sketch=None):
    return weak_sigreg_reference(z.double(), None if sketch is None else sketch.double())


def reference_strong(z, directions, t):
    """The package's Epps-Pulley integrand on the nodes t (any grid over [-t_max, t_max]),
    integrated by torch's own trapezoid rule."""
    integrand = epps_pulley_integrand(z.double() @ directions.double(), t)  # (K, T)
    return torch.trapezoid(integrand, t, dim=-1).mean()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_weak_matches_float64_reference_with_and_without_sketch(gen):
    z = torch.randn(200, 48, generator=gen) * 3 + 1
    s = sigreg.draw_sketch(48, 16, gen)
    assert sigreg.weak_sigreg(z).item() == pytest.approx(reference_weak(z).item(), rel=1e-4)
    assert sigreg.weak_sigreg(z, s).item() == pytest.approx(reference_weak(z, s).item(), rel=1e-4)


def test_weak_reference_is_torch_cov_minus_identity(gen):
    z = torch.randn(50, 6, generator=gen, dtype=torch.float64) * 2 + 1
    expected = torch.linalg.matrix_norm(torch.cov(z.T) - torch.eye(6, dtype=torch.float64))
    assert weak_sigreg_reference(z).item() == pytest.approx(expected.item(), rel=1e-12)


def test_weak_is_zero_for_whitened_batch():
    z = torch.randn(500, 8, dtype=torch.float64)
    z = z - z.mean(0)
    # Whiten exactly: Cov(z W) = I.
    evals, evecs = torch.linalg.eigh(torch.cov(z.T))
    zw = z @ evecs @ torch.diag(evals.rsqrt())
    assert sigreg.weak_sigreg(zw).item() < 1e-9


def test_strong_dense_quadrature_matches_complex_reference(gen):
    z = torch.randn(300, 20, generator=gen) * 0.7 + 0.2
    a = sigreg.draw_directions(20, 12, gen)
    dense = torch.linspace(-3, 3, 4001, dtype=torch.float64)
    ref = reference_strong(z, a, dense).item()
    ours = sigreg.strong_sigreg(z.double(), a.double(), t_max=3.0, num_points=2001).item()
    assert ours == pytest.approx(ref, rel=1e-5)
    # The default 17-node rule approximates the same integral.
    assert sigreg.strong_sigreg(z, a).item() == pytest.approx(ref, rel=0.02)


def test_strong_17_nodes_equals_symmetric_trapezoid(gen):
    """[0, t_max] doubled equals the trapezoid over [-t_max, t_max] with mirrored nodes."""
    z = torch.randn(100, 6, generator=gen)
    a = sigreg.draw_directions(6, 5, gen)
    t = torch.linspace(-5, 5, 33, dtype=torch.float64)
    ref = reference_strong(z, a, t).item()
    ours = sigreg.strong_sigreg(z.double(), a.double(), t_max=5.0, num_points=17).item()
    assert ours == pytest.approx(ref, rel=1e-10)


def test_trapezoid_weights_integrate_exactly_linear_even_functions():
    t, w = trapezoid_weights(3.0, 17, dtype=torch.float64)
    assert (w * torch.ones_like(t)).sum().item() == pytest.approx(6.0)
    assert (w * t).sum().item() == pytest.approx(9.0)  # int_{-3}^{3} |t| dt


def test_strong_expectation_under_gaussian_is_closed_form():
    """E[N |ECF(t) - phi(t)|^2] = 1 - phi(t)^2 for Gaussian data, whatever N."""
    torch.manual_seed(1)
    t = torch.linspace(-3, 3, 20001, dtype=torch.float64)
    expected = torch.trapezoid((1 - torch.exp(-t**2)) * torch.exp(-t**2 / 2), t).item()
    values = [sigreg.strong_sigreg(torch.randn(256, 32), sketch_dim=256).item()
              for _ in range(40)]
    assert sum(values) / len(values) == pytest.approx(expected, rel=0.1)


def test_isotropic_is_small_collapsed_is_large():
    torch.manual_seed(0)
    iso = torch.randn(8192, 32)
    collapsed = torch.randn(8192, 1) * torch.randn(1, 32)
    sketch = sigreg.draw_sketch(32, 32)
    assert sigreg.weak_sigreg(iso).item() < 0.5
    assert sigreg.weak_sigreg(collapsed).item() > 5 * sigreg.weak_sigreg(iso).item() + 5
    assert sigreg.weak_sigreg(collapsed, sketch) > sigreg.weak_sigreg(iso, sketch)
    assert sigreg.strong_sigreg(iso).item() < 3
    assert sigreg.strong_sigreg(collapsed).item() > 100


def test_permutation_invariance(gen):
    z = torch.randn(64, 10, generator=gen)
    perm = torch.randperm(64, generator=gen)
    s = sigreg.draw_sketch(10, 4, gen)
    a = sigreg.draw_directions(10, 4, gen)
    assert torch.allclose(sigreg.weak_sigreg(z, s), sigreg.weak_sigreg(z[perm], s), atol=1e-5)
    assert torch.allclose(sigreg.strong_sigreg(z, a), sigreg.strong_sigreg(z[perm], a), atol=1e-4)


def test_gradcheck_in_double(gen):
    z = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = sigreg.draw_sketch(5, 3, gen).double()
    a = sigreg.draw_directions(5, 3, gen).double()
    assert torch.autograd.gradcheck(lambda x: sigreg.weak_sigreg(x, s), (z,))
    assert torch.autograd.gradcheck(lambda x: sigreg.weak_sigreg(x), (z,))
    assert torch.autograd.gradcheck(lambda x: sigreg.strong_sigreg(x, a, 3.0, 9), (z,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_upcast(dtype, gen):
    z = torch.randn(256, 32, generator=gen).to(dtype)
    s = sigreg.draw_sketch(32, 8, gen)
    a = sigreg.draw_directions(32, 8, gen)
    for fn, proj in ((sigreg.weak_sigreg, s), (sigreg.strong_sigreg, a)):
        out = fn(z, proj)
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(fn(z.float(), proj).item(), rel=1e-5)


def test_autocast_does_not_lower_precision(gen):
    z = torch.randn(256, 32, generator=gen, requires_grad=True)
    s = sigreg.draw_sketch(32, 8, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sigreg.weak_sigreg(z, s)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(sigreg.weak_sigreg(z, s).item(), rel=1e-6)
    inside.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sigreg.weak_sigreg(torch.randn(4)), "2-D"),
        (lambda: sigreg.weak_sigreg(torch.randn(1, 3)), "at least 2"),
        (lambda: sigreg.weak_sigreg(torch.randn(4, 3), torch.randn(5, 2)), "C=3"),
        (lambda: sigreg.weak_sigreg(torch.randn(4, 3), torch.randn(3)), "shape"),
        (lambda: sigreg.strong_sigreg(torch.randn(4)), "2-D"),
        (lambda: sigreg.strong_sigreg(torch.randn(1, 3)), "at least 2"),
        (lambda: sigreg.strong_sigreg(torch.randn(4, 3), torch.randn(2, 2)), "C=3"),
        (lambda: sigreg.strong_sigreg(torch.randn(4, 3), t_max=0.0), "t_max"),
        (lambda: sigreg.strong_sigreg(torch.randn(4, 3), t_max=-1.0), "t_max"),
        (lambda: sigreg.strong_sigreg(torch.randn(4, 3), num_points=1), "num_points"),
    ],
)
def test_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_regularized_loss_conventions():
    task, reg = torch.tensor(2.0), torch.tensor(10.0)
    assert sigreg.regularized_loss(task, reg, alpha=0.1).item() == pytest.approx(0.9 * 2 + 1)
    assert sigreg.regularized_loss(task, reg, lam=0.5).item() == pytest.approx(7.0)
    for bad in ({}, {"alpha": 0.1, "lam": 1.0}, {"alpha": 1.5}, {"lam": -1.0}):
        with pytest.raises(ValueError):
            sigreg.regularized_loss(task, reg, **bad)


def test_sketch_and_direction_helpers_are_seeded_and_scaled():
    a1 = sigreg.draw_directions(50, 7, sigreg.seeded_generator(3))
    a2 = sigreg.draw_directions(50, 7, sigreg.seeded_generator(3))
    assert torch.equal(a1, a2)
    assert torch.allclose(a1.norm(dim=0), torch.ones(7))
    s = sigreg.draw_sketch(4096, 64, sigreg.seeded_generator(0))
    assert s.std().item() == pytest.approx(1 / math.sqrt(4096), rel=0.02)
    with pytest.raises(ValueError):
        sigreg.draw_sketch(0, 3)


def reference_varcov(z, gamma=1.0, mu=25.0, nu=1.0, eps=1e-4):
    """VICReg's eqs. 1-4 written with explicit loops over features, in float64."""
    z = z.double()
    n, c = z.shape
    centred = z - z.mean(0)
    variance = sum(max(0.0, gamma - math.sqrt((centred[:, j] ** 2).sum().item() / (n - 1) + eps))
                   for j in range(c)) / c
    covariance = sum(((centred[:, i] * centred[:, j]).sum().item() / (n - 1)) ** 2
                     for i in range(c) for j in range(c) if i != j) / c
    return mu * variance + nu * covariance


def test_vicreg_varcov_matches_loop_reference(gen):
    # Mixed scales: some features below the hinge (std < 1), some above, correlated.
    z = torch.randn(64, 10, generator=gen) @ torch.randn(10, 10, generator=gen) * 0.4
    assert sigreg.vicreg_varcov(z).item() == pytest.approx(reference_varcov(z), rel=1e-5)
    got = sigreg.vicreg_varcov(z, gamma=2.0, var_weight=3.0, cov_weight=0.5).item()
    assert got == pytest.approx(reference_varcov(z, 2.0, 3.0, 0.5), rel=1e-5)


def test_vicreg_varcov_zero_only_for_decorrelated_wide_features():
    z = torch.randn(500, 8, dtype=torch.float64)
    z = z - z.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(z.T))
    white = z @ evecs @ torch.diag(evals.rsqrt())
    # Decorrelated with every std >= 1 (the hinge ignores large variances): zero.
    assert sigreg.vicreg_varcov(white * torch.linspace(1.01, 5, 8, dtype=torch.float64)).item() < 1e-9
    # Collapsed onto one direction: both terms fire.
    collapsed = torch.randn(500, 1, dtype=torch.float64) * torch.ones(1, 8, dtype=torch.float64)
    assert sigreg.vicreg_varcov(collapsed, var_weight=0.0).item() > 1.0
    assert sigreg.vicreg_varcov(0.1 * white, cov_weight=0.0).item() == pytest.approx(
        25 * (1 - math.sqrt(0.01 + 1e-4)), rel=1e-6)


def test_vicreg_varcov_gradcheck_and_errors(gen):
    z = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sigreg.vicreg_varcov(x), (z,))
    with pytest.raises(ValueError, match="2-D"):
        sigreg.vicreg_varcov(torch.randn(4))
    with pytest.raises(ValueError, match="at least 2"):
        sigreg.vicreg_varcov(torch.randn(1, 3))


def test_strong_constants_cached_under_inference_mode_still_train(gen):
    """The quadrature constants are cached; a first call under inference_mode must not
    poison later training calls with inference tensors."""
    from sigreg.functional import _local_constants, _quadrature

    _quadrature.cache_clear()
    _local_constants.cache_clear()
    z = torch.randn(32, 6, generator=gen)
    a = sigreg.draw_directions(6, 4, gen)
    with torch.inference_mode():
        evaluated = sigreg.strong_sigreg(z, a, t_max=2.5, num_points=11).item()
    z.requires_grad_()
    trained = sigreg.strong_sigreg(z, a, t_max=2.5, num_points=11)
    trained.backward()
    assert trained.item() == pytest.approx(evaluated, rel=1e-6)
    assert torch.isfinite(z.grad).all()
    assert _local_constants.cache_info().hits >= 1


# ---- a leading batch of layers (*, N, C): one value per layer ----------------------------

def layer_stack(gen, dtype, layers=4, n=40, c=12):
    """Layers at different scales and means, so that no two values coincide."""
    scale = torch.linspace(0.3, 3.0, layers, dtype=torch.float64).view(-1, 1, 1)
    return (torch.randn(layers, n, c, generator=gen, dtype=torch.float64) * scale + scale).to(dtype)


def per_layer(fn, z, proj):
    """The per-layer functional definition: fn on each (N, C) slice with its projection."""
    if proj is None:
        return torch.stack([fn(zl, None) for zl in z])
    if proj.dim() == 2:
        return torch.stack([fn(zl, proj) for zl in z])
    return torch.stack([fn(zl, pl) for zl, pl in zip(z, proj)])


LOSSES = {
    "weak": (sigreg.weak_sigreg, sigreg.draw_sketch),
    "strong": (lambda z, a: sigreg.strong_sigreg(z, a, 3.0, 17), sigreg.draw_directions),
    "vicreg": (lambda z, _: sigreg.vicreg_varcov(z), None),
}


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("variant, projection", [
    ("weak", "per-layer"), ("weak", "shared"), ("weak", "none"),
    ("strong", "per-layer"), ("strong", "shared"), ("vicreg", "none"),
])
def test_stack_equals_per_layer_values_and_gradients(variant, projection, dtype, rel, gen):
    fn, draw = LOSSES[variant]
    z = layer_stack(gen, dtype).requires_grad_()
    batch = {"per-layer": (4,), "shared": ()}.get(projection)
    proj = None if batch is None else draw(12, 5, gen, batch=batch).to(dtype)
    batched = fn(z, proj)
    assert batched.shape == (4,) and batched.dtype == dtype
    (grad,) = torch.autograd.grad(batched.sum(), z)
    expected = per_layer(fn, z, proj)
    (expected_grad,) = torch.autograd.grad(expected.sum(), z)
    torch.testing.assert_close(batched, expected, rtol=rel, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=rel * 10, atol=rel * 1e-3)


def test_stack_against_float64_references(gen):
    z = layer_stack(gen, torch.float32, layers=3, n=200, c=20)
    s = sigreg.draw_sketch(20, 8, gen, batch=3)
    a = sigreg.draw_directions(20, 6, gen, batch=3)
    t = torch.linspace(-5, 5, 17, dtype=torch.float64)
    weak = sigreg.weak_sigreg(z, s)
    strong = sigreg.strong_sigreg(z.double(), a.double(), t_max=5.0, num_points=9)
    for i in range(3):
        assert weak[i].item() == pytest.approx(reference_weak(z[i], s[i]).item(), rel=1e-4)
        assert strong[i].item() == pytest.approx(reference_strong(z[i], a[i], t).item(), rel=1e-10)


def test_any_leading_shape_and_gradcheck(gen):
    z = torch.randn(2, 3, 10, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    s = sigreg.draw_sketch(5, 3, gen, batch=(2, 3)).double()
    a = sigreg.draw_directions(5, 3, gen, batch=(2, 3)).double()
    assert sigreg.weak_sigreg(z, s).shape == (2, 3)
    assert sigreg.strong_sigreg(z, a).shape == (2, 3)
    assert sigreg.vicreg_varcov(z).shape == (2, 3)
    assert torch.autograd.gradcheck(lambda x: sigreg.weak_sigreg(x, s), (z,))
    assert torch.autograd.gradcheck(lambda x: sigreg.strong_sigreg(x, a, 2.0, 5), (z,))
    assert torch.autograd.gradcheck(lambda x: sigreg.vicreg_varcov(x), (z,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weak_gradient_at_an_exactly_zero_gap_is_zero_not_nan(dtype):
    z = torch.tensor([[1.0, 2.0], [0.0, 2.0], [-1.0, 2.0]], dtype=dtype)  # variance exactly 1
    z = z[:, :1].clone().requires_grad_()
    loss = sigreg.weak_sigreg(z)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_strong_draws_one_direction_set_per_layer(gen):
    z = layer_stack(gen, torch.float32, layers=2)
    a = sigreg.draw_directions(12, 7, sigreg.seeded_generator(4), batch=2)
    drawn = sigreg.strong_sigreg(z, sketch_dim=7, generator=sigreg.seeded_generator(4))
    torch.testing.assert_close(drawn, sigreg.strong_sigreg(z, a))


@pytest.mark.parametrize("proj_shape", [(3, 12, 5), (2, 2, 12, 5), (12,), (11, 5)])
def test_stack_rejects_projections_of_another_shape(proj_shape, gen):
    z = layer_stack(gen, torch.float32)  # (4, 40, 12)
    with pytest.raises(ValueError, match="C=12"):
        sigreg.weak_sigreg(z, torch.randn(proj_shape))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: sigreg.strong_sigreg(torch.randn(4, 3), num_points=2.5), TypeError, "num_points"),
        (lambda: sigreg.strong_sigreg(torch.randn(4, 3), t_max=float("inf")), ValueError, "t_max"),
        (lambda: sigreg.strong_sigreg(torch.randn(4, 3), t_max="3"), TypeError, "t_max"),
        (lambda: sigreg.draw_sketch(8, 2.5), TypeError, "sketch_dim"),
        (lambda: sigreg.weak_sigreg(torch.randn(4, 3), "S"), TypeError, "sketch"),
        (lambda: sigreg.regularized_loss(torch.tensor(1.0), torch.tensor(1.0), lam=float("inf")),
         ValueError, "lam"),
        (lambda: sigreg.regularized_loss(torch.tensor(1.0), torch.tensor(1.0), alpha="0.1"),
         TypeError, "alpha"),
    ],
)
def test_argument_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("kwargs", [{"var_weight": -1}, {"cov_weight": math.nan},
                                    {"var_weight": 0, "cov_weight": 0}, {"gamma": 0.0},
                                    {"eps": -1e-4}, {"var_weight": "25"}])
def test_vicreg_varcov_refuses_what_varcovreg_refuses(kwargs):
    for build in (lambda: sigreg.vicreg_varcov(torch.randn(8, 4), **kwargs),
                  lambda: sigreg.VarCovReg(**kwargs)):
        with pytest.raises((TypeError, ValueError), match="|".join(kwargs)):
            build()


def test_features_on_the_meta_device_are_named():
    """A model built under torch.device("meta") outputs shapes without values."""
    z = torch.randn(8, 4, device="meta")
    for loss in (sigreg.weak_sigreg, sigreg.strong_sigreg, sigreg.vicreg_varcov,
                 sigreg.WeakSIGReg(2), sigreg.StrongSIGReg(2), sigreg.VarCovReg()):
        with pytest.raises(ValueError, match="features are on the meta device.* materialise "
                           r"the model first \(model.to_empty"):
            loss(z)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8)).to("meta")
    handle = sigreg.attach(model, "0")
    model(torch.randn(8, 4, device="meta"))
    with pytest.raises(ValueError, match="layer 0's features are on the meta device"):
        handle.loss()


# ---- the fast paths against the package's reference (sigreg.reference), float64 -------------

@pytest.fixture
def one_rank(monkeypatch):
    """The distributed path in this process, as on a world of one rank: the collectives are
    identities (so global statistics are the local ones); returns the list of all-reduces."""
    calls = []

    def identity(x):
        calls.append(x.shape)
        return x

    monkeypatch.setattr(sigreg.functional, "use_distributed", lambda flag: bool(flag))
    monkeypatch.setattr(sigreg.distributed, "all_reduce_sum", identity)  # all_reduce_with_count
    monkeypatch.setattr(sigreg.functional, "all_reduce_sum", identity)
    monkeypatch.setattr(sigreg.functional, "broadcast_from_rank0", lambda x: x)
    return calls


def fast_and_reference(variant, z, proj, distributed, quadrature=(3.0, 17)):
    """The fast loss and the reference loss of z with proj: a tensor, or 'drawn' (strong's
    own draw of 5 directions from a seeded generator, reproduced for the reference)."""
    if variant == "weak":
        return sigreg.weak_sigreg(z, proj, distributed=distributed), weak_sigreg_reference(z, proj)
    if isinstance(proj, str):
        fast = sigreg.strong_sigreg(z, None, *quadrature, sketch_dim=5,
                                    generator=sigreg.seeded_generator(4), distributed=distributed)
        proj = sigreg.draw_directions(z.shape[-1], 5, sigreg.seeded_generator(4),
                                      batch=z.shape[:-2])
        return fast, strong_sigreg_reference(z, proj, *quadrature)
    fast = sigreg.strong_sigreg(z, proj, *quadrature, distributed=distributed)
    return fast, strong_sigreg_reference(z, proj, *quadrature)


def projection(variant, kind, z, gen):
    """None, 'drawn' (strong draws its own), or a sketch / directions shared by every layer
    (C, K) or one per layer (*, C, K), with a gradient."""
    if kind in ("none", "drawn"):
        return None if kind == "none" else kind
    draw = sigreg.draw_sketch if variant == "weak" else sigreg.draw_directions
    batch = z.shape[:-2] if kind == "per-layer" else ()
    return draw(z.shape[-1], 5, gen, batch=batch).double().requires_grad_()


EQUIVALENCE_CASES = [  # (variant, projection, layers): layers None is one layer (N, C)
    (variant, kind, layers)
    for variant, kinds in (("weak", ("none", "shared", "per-layer")),
                           ("strong", ("drawn", "shared", "per-layer")))
    for kind in kinds for layers in (None, 3) if layers or kind != "per-layer"
]


@pytest.mark.parametrize("path", ["local", "distributed"])
@pytest.mark.parametrize("variant, kind, layers", EQUIVALENCE_CASES)
def test_fast_path_equals_reference_values_and_gradients(variant, kind, layers, path, request,
                                                         gen):
    calls = request.getfixturevalue("one_rank") if path == "distributed" else None
    z = layer_stack(gen, torch.float64, layers=layers or 1, n=40, c=12)
    z = (z if layers else z[0]).requires_grad_()
    proj = projection(variant, kind, z, gen)
    inputs = [z] + [proj] * isinstance(proj, torch.Tensor)
    for quadrature in ((3.0, 17), (5.0, 9)) if variant == "strong" else ((3.0, 17),):
        fast, ref = fast_and_reference(variant, z, proj, path == "distributed", quadrature)
        assert fast.shape == ref.shape == z.shape[:-2] and fast.dtype == torch.float64
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-12)
        # Distinct weights per layer, so that a gradient routed to the wrong layer shows.
        weights = torch.linspace(1, 2, fast.numel(), dtype=torch.float64).view(fast.shape)
        grads = torch.autograd.grad((fast * weights).sum(), inputs)
        expected = torch.autograd.grad((ref * weights).sum(), inputs)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if calls is not None:
        assert calls, "the distributed path was not taken"


def simpson_weights(t_max, num_points, device=None, dtype=torch.float32):
    """Simpson's rule on trapezoid_weights's nodes (num_points odd), doubled."""
    t = torch.linspace(0.0, t_max, num_points, device=device, dtype=dtype)
    q = torch.ones(num_points, device=device, dtype=dtype)
    q[1:-1:2], q[2:-1:2] = 4, 2
    return t, 2 * q * t_max / (num_points - 1) / 3


@pytest.mark.parametrize("name, replacement", [
    ("epps_pulley_weight", lambda t: 1 / (1 + t * t)),
    ("trapezoid_weights", simpson_weights),
])
def test_one_edit_to_the_definition_changes_every_path(name, replacement, monkeypatch, one_rank,
                                                       gen):
    """The weight function and the quadrature are read from sigreg.reference only: replacing
    one there changes the reference, the local fast path and the distributed one alike."""
    z = layer_stack(gen, torch.float64, layers=2, n=30, c=6)
    a = sigreg.draw_directions(6, 4, gen).double()
    before = strong_sigreg_reference(z, a)
    monkeypatch.setattr(sigreg.reference, name, replacement)
    sigreg.functional._quadrature.cache_clear()
    sigreg.functional._local_constants.cache_clear()
    try:
        ref = strong_sigreg_reference(z, a)
        assert not torch.allclose(ref, before)
        for distributed in (False, True):
            torch.testing.assert_close(sigreg.strong_sigreg(z, a, distributed=distributed), ref,
                                       rtol=1e-10, atol=1e-12)
    finally:  # the caches hold the replaced definition's constants
        sigreg.functional._quadrature.cache_clear()
        sigreg.functional._local_constants.cache_clear()
