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
    assert torch.allclose(f1.damped_eigenvalues(0.1), lam + 0.1 * lam.mean())
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
