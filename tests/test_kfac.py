"""K-FAC factors against the exact per-example Fisher block, computed by plain autograd per example."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libortho.curvature.kfac import (
    KFACAccumulator,
    fisher_error,
    fit_kfac,
    load_kfac,
    per_example_fisher,
    save_kfac,
)


class TokenNet(nn.Module):
    """Embedding -> tanh(Linear) -> Linear logits at every position: a sequence model with small layers."""

    def __init__(self, vocab: int = 7, d: int = 5, h: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, h, bias=False)
        self.out = nn.Linear(h, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.up(self.emb(ids))))


def lm_outputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model(ids[:, :-1]), ids[:, 1:]


def net_and_layers(seed: int = 0) -> tuple[TokenNet, dict[str, nn.Linear]]:
    torch.manual_seed(seed)
    net = TokenNet().double()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, {"up": net.up, "out": net.out}


def exact(net: nn.Module, batches: list[torch.Tensor], layer: nn.Linear) -> torch.Tensor:
    return per_example_fisher(net, batches, layer, outputs=lm_outputs)


def test_one_example_one_position_kfac_is_the_exact_fisher_block() -> None:
    """With a single example of a single position, G ⊗ A is vec(dW) vec(dW)^T exactly (both layers)."""
    net, layers = net_and_layers()
    batches = [torch.tensor([[3, 1]])]
    f = fit_kfac(net, batches, layers, fisher="empirical", outputs=lm_outputs)
    for name, lin in layers.items():
        F = exact(net, batches, lin)
        assert torch.allclose(f[name].fisher_block(), F, rtol=1e-10, atol=1e-14), name


def test_many_examples_ekfac_is_never_worse_than_kfac_and_both_are_approximations() -> None:
    """Across examples and positions K-FAC is an approximation (a real error); EK-FAC, the best diagonal
    in K-FAC's eigenbasis, has an error no larger (a wrong eigenvalue correction breaks this)."""
    net, layers = net_and_layers(1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 7, (6, 5), generator=g) for _ in range(3)]
    kf = fit_kfac(net, batches, layers, fisher="empirical", outputs=lm_outputs)
    ek = fit_kfac(net, batches, layers, fisher="empirical", ekfac=True, outputs=lm_outputs)
    for name, lin in layers.items():
        F = exact(net, batches, lin)
        e_k, e_e = fisher_error(kf[name].fisher_block(), F), fisher_error(ek[name].fisher_block(), F)
        assert 1e-3 < e_k < 1.0 and e_e <= e_k + 1e-12, (name, e_k, e_e)
        # EK-FAC's eigenvalues are exactly the diagonal of the exact block in the K-FAC basis
        Q = torch.kron(ek[name].QG, ek[name].QA)
        assert torch.allclose(ek[name].ekfac.double().flatten(), torch.diagonal(Q.T @ F @ Q), rtol=1e-5, atol=1e-9)


def test_true_fisher_samples_labels_from_the_model() -> None:
    """For the logit layer at one position, E_y~p[g g^T] = diag(p) - p p^T; the empirical Fisher (data
    labels) is (e_y - p)(e_y - p)^T instead. Sampling the data's labels would fail the first check."""
    net, layers = net_and_layers(2)
    x = torch.tensor([[2, 5]])
    batches = [x.repeat(2000, 1) for _ in range(4)]
    with torch.no_grad():
        p = torch.softmax(net(x[:, :1])[0, 0], -1)
    true_G = fit_kfac(net, batches, {"out": net.out}, fisher="true", outputs=lm_outputs, seed=3)["out"].G
    want = torch.diag(p) - torch.outer(p, p)
    assert (true_G - want).abs().max() < 0.02
    emp_G = fit_kfac(net, batches[:1], {"out": net.out}, fisher="empirical", outputs=lm_outputs)["out"].G
    e = torch.nn.functional.one_hot(x[0, 1], 7).double() - p
    assert torch.allclose(emp_G, torch.outer(e, e), atol=1e-12)
    assert (emp_G - want).abs().max() > 0.05


def test_fit_leaves_the_model_as_it_found_it() -> None:
    """No gradients accumulated, requires_grad and the train flag restored."""
    net, layers = net_and_layers()
    net.train()
    fit_kfac(net, [torch.tensor([[1, 2, 3]])], layers, outputs=lm_outputs)
    assert net.training and all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_merged_halves_equal_one_pass_and_damping_is_a_fraction_of_the_mean() -> None:
    torch.manual_seed(0)
    a, gr = torch.randn(4, 3, 6), torch.randn(4, 3, 5)
    one = KFACAccumulator(6, 5)  # the same two batches, in one process or split over two workers
    one.add(a[:2], gr[:2])
    one.add(a[2:], gr[2:])
    h1, h2 = KFACAccumulator(6, 5), KFACAccumulator(6, 5)
    h1.add(a[:2], gr[:2])
    h2.add(a[2:], gr[2:])
    f1, f2 = one.factors(), h1.merge(h2).factors()
    assert torch.equal(f1.A, f2.A) and torch.equal(f1.G, f2.G) and (f1.n_tokens, f1.n_examples) == (12, 4)
    # A is the mean over token positions, G the per-example sum over positions averaged over examples
    assert torch.allclose(f1.A, torch.einsum("bti,btj->ij", a.double(), a.double()) / 12)
    assert torch.allclose(f1.G, torch.einsum("bti,btj->ij", gr.double(), gr.double()) / 4)
    lam = f1.eigenvalues()
    assert torch.allclose(lam, torch.outer(torch.linalg.eigvalsh(f1.G).clamp_min(0),
                                           torch.linalg.eigvalsh(f1.A).clamp_min(0)))
    lg, la = torch.linalg.eigvalsh(f1.G).clamp_min(0), torch.linalg.eigvalsh(f1.A).clamp_min(0)
    damped = torch.outer(lg + 0.1 * lg.mean(), la + 0.1 * la.mean())  # each factor damped, as the selectors do
    assert torch.allclose(f1.damped_eigenvalues(0.1), damped)
    # ... which is the spectrum KFACCurvature inverts: its inverse diagonal from the dense damped Kronecker
    from libortho.curvature.operator import KFACCurvature

    Gd = f1.G + 0.1 * lg.mean() * torch.eye(5, dtype=torch.float64)
    Ad = f1.A + 0.1 * la.mean() * torch.eye(6, dtype=torch.float64)
    dense_inv = torch.linalg.inv(torch.kron(Gd, Ad))
    torch.testing.assert_close(KFACCurvature(f1, 0.1).inverse_diagonal().double(),
                               torch.diagonal(dense_inv).view(5, 6), rtol=1e-5, atol=0)
    assert torch.allclose(torch.linalg.eigvalsh(torch.kron(Gd, Ad)).sort().values,
                          damped.flatten().sort().values)
    with pytest.raises(ValueError, match="damping"):
        f1.damped_eigenvalues(-1.0)
    R = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(f1.unrotate(f1.rotate(R)), R)


def test_save_load_round_trip_and_refusals(tmp_path) -> None:
    net, layers = net_and_layers()
    f = fit_kfac(net, [torch.tensor([[1, 2, 3], [4, 5, 6]])], layers, ekfac=True, outputs=lm_outputs)
    save_kfac(f, tmp_path / "k.safetensors", meta={"fisher": "true"})
    g, meta = load_kfac(tmp_path / "k.safetensors")
    assert meta == {"fisher": "true"} and set(g) == {"up", "out"}
    for n in f:
        for fld in ("A", "G", "QA", "lamA", "QG", "lamG", "ekfac"):
            assert torch.equal(getattr(f[n], fld), getattr(g[n], fld)), (n, fld)
        assert (f[n].n_tokens, f[n].n_examples) == (g[n].n_tokens, g[n].n_examples)
    with pytest.raises(FileNotFoundError):
        load_kfac(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a libortho K-FAC"):
        load_kfac(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="fisher"):
        fit_kfac(net, [torch.tensor([[1, 2]])], layers, fisher="exact", outputs=lm_outputs)
    with pytest.raises(ValueError, match="nn.Linear"):
        fit_kfac(net, [torch.tensor([[1, 2]])], {"emb": net.emb}, outputs=lm_outputs)


def test_fit_on_the_tiny_llama_with_the_default_causal_lm_outputs() -> None:
    from libortho.models.layers import find_linears
    from libortho.models.tiny import build_tiny_llama

    model = build_tiny_llama(seed=0)
    lins = dict(list(find_linears(model, ("lm_head",)).items())[:3])
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    f = fit_kfac(model, [ids, ids.flip(0)], lins, ekfac=True)
    for name, lin in lins.items():
        assert f[name].shape == (lin.out_features, lin.in_features)
        assert (f[name].n_tokens, f[name].n_examples) == (2 * 2 * 8, 4)
        assert torch.isfinite(f[name].ekfac).all() and (f[name].lamA >= 0).all()


def test_factors_agree_with_kronfluence_up_to_its_loss_scaling(tmp_path) -> None:
    """kronfluence (installed --no-deps) on the same data and loss: its activation covariance is our A;
    its gradient covariance is averaged over tokens, ours summed per example, so ours = its * tokens/examples."""
    pytest.importorskip("kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    net, layers = net_and_layers(4)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 7, (12, 6), generator=g)

    class LM(Task):
        def compute_train_loss(self, batch, model, sample=False):  # noqa: ANN001, ANN202
            logits, labels = lm_outputs(model, batch[0])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):  # noqa: ANN001, ANN202
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):  # noqa: ANN202
            return ["up", "out"]

    ours = fit_kfac(net, list(data.split(4)), layers, fisher="empirical", outputs=lm_outputs)
    task = LM()
    model = prepare_model(net, task)
    an = Analyzer(analysis_name="kfac", model=model, task=task, cpu=True, disable_tqdm=True,
                  output_dir=str(tmp_path))
    args = FactorArguments(use_empirical_fisher=True, activation_covariance_dtype=torch.float64,
                           gradient_covariance_dtype=torch.float64)
    an.fit_covariance_matrices("f", dataset=torch.utils.data.TensorDataset(data), per_device_batch_size=4,
                               factor_args=args, dataloader_kwargs=None, overwrite_output_dir=True)
    cov = an.load_covariance_matrices("f")
    tokens_per_example = data.shape[1] - 1
    for name in ("up", "out"):
        A = cov["activation_covariance"][name] / cov["num_activation_covariance_processed"][name]
        G = cov["gradient_covariance"][name] / cov["num_gradient_covariance_processed"][name]
        assert torch.allclose(ours[name].A, A.double(), rtol=1e-6, atol=1e-12), name
        assert torch.allclose(ours[name].G, G.double() * tokens_per_example, rtol=1e-6, atol=1e-12), name


def test_positions_labelled_minus_100_carry_no_loss_under_either_fisher() -> None:
    """A label of -100 removes the position's gradient from G for the true Fisher too (sampling the label there
    would put the model's guesses about padding into the private records' Fisher); A still counts it."""
    net, layers = net_and_layers()
    ids = torch.tensor([[3, 1, 4, 1, 5, 2], [2, 6, 5, 3, 5, 0]])

    def masked(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch[:, :-1]), torch.full_like(batch[:, 1:], -100)

    def half(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = batch[:, 1:].clone()
        t[:, 2:] = -100  # only the first two positions have a loss
        return model(batch[:, :-1]), t

    def first_two(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return model(batch[:, :2]), batch[:, 1:3]

    for fisher in ("true", "empirical"):
        f = fit_kfac(net, [ids], layers, fisher=fisher, outputs=masked)
        assert float(f["up"].G.abs().max()) == 0.0 and float(f["up"].A.abs().max()) > 0, fisher
    # positions have no cross-talk in this model, so masking positions 2.. leaves G as if only 0-1 existed
    a = fit_kfac(net, [ids], layers, fisher="empirical", outputs=half)
    b = fit_kfac(net, [ids], layers, fisher="empirical", outputs=first_two)
    assert torch.allclose(a["out"].G, b["out"].G, rtol=1e-12, atol=1e-15)


def test_labelled_outputs_equal_the_plain_ones_when_every_token_has_a_loss() -> None:
    from libortho.curvature.kfac import labelled_causal_lm_outputs
    from libortho.models import build_tiny_llama

    model = build_tiny_llama(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    layers = {"q": model.model.layers[0].self_attn.q_proj}
    a = fit_kfac(model, [ids], layers, fisher="empirical")
    b = fit_kfac(model, [torch.stack([ids, ids])], layers, fisher="empirical", outputs=labelled_causal_lm_outputs)
    assert torch.equal(a["q"].A, b["q"].A) and torch.equal(a["q"].G, b["q"].G)
    with pytest.raises(ValueError, match="stack of input ids and labels"):
        labelled_causal_lm_outputs(model, ids)


def test_ekfac_eigenvalues_are_saved_with_their_basis_and_refused_where_unused(tmp_path) -> None:
    """EK-FAC eigenvalues mean nothing in another basis: with_eigen=False still stores it for them; the
    Kronecker-only consumers refuse them rather than silently dropping them."""
    from libortho.curvature.operator import KFACCurvature
    from libortho.select.kfac import kfac_best_rank

    net, layers = net_and_layers()
    ids = torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(1))
    f = fit_kfac(net, [ids], layers, fisher="empirical", outputs=lm_outputs, ekfac=True)
    save_kfac(f, tmp_path / "k.safetensors", with_eigen=False, dtype=torch.float32)
    g, _ = load_kfac(tmp_path / "k.safetensors")
    for n in f:
        assert g[n].QA is not None and torch.allclose(g[n].QA.double(), f[n].QA, atol=1e-6)
        assert torch.allclose(g[n].QG.double(), f[n].QG, atol=1e-6)
    with pytest.raises(ValueError, match="EK-FAC"):
        KFACCurvature(f["up"])
    with pytest.raises(ValueError, match="EK-FAC"):
        kfac_best_rank(torch.randn(4, 5, dtype=torch.float64), f["up"], 1)
