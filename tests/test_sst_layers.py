"""SST model side: exact conversion, merge, gradients against autograd, export, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowrank_optim as lo
from lowrank_optim import sst
from tests.helpers import lm_loss, tiny_llama, token_batches


def _outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_convert_is_exact_and_merge_restores_the_model():
    model = tiny_llama(seed=3)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = token_batches(1, seed=5)[0]
    before = _outputs(model, ids)
    sst.convert(model, rank=8)
    layers = sst.spectral_modules(model)
    assert len(layers) == 14 and not any(isinstance(m, nn.Linear) and "proj" in n
                                         for n, m in model.named_modules())
    assert isinstance(model.lm_head, nn.Linear)  # all-linear leaves the head alone, as in HF
    after = _outputs(model, ids)
    assert torch.allclose(after, before, atol=2e-5, rtol=0), (after - before).abs().max()
    for _, layer in layers:  # SVD initialisation: orthonormal vectors, sorted S >= 0, k=min
        assert layer.k == min(layer.in_features, layer.out_features)
        eye = torch.eye(layer.k)
        assert torch.allclose(layer.U.T @ layer.U, eye, atol=1e-5)
        assert torch.allclose(layer.V.T @ layer.V, eye, atol=1e-5)
        assert (layer.S[:-1] >= layer.S[1:]).all() and (layer.S >= 0).all()
    sst.merge(model)
    assert not sst.spectral_modules(model)
    for n, p in model.named_parameters():
        assert p.shape == original[n].shape
        assert torch.allclose(p, original[n], atol=1e-6, rtol=0), n
    assert torch.allclose(_outputs(model, ids), before, atol=2e-5, rtol=0)


def test_convert_respects_target_modules_and_bias():
    model = tiny_llama()
    sst.convert(model, rank=4, target_modules=["q_proj", "down_proj"])
    names = sorted(n.split(".")[-1] for n, _ in sst.spectral_modules(model))
    assert names == ["down_proj", "down_proj", "q_proj", "q_proj"]
    assert all(layer.rank == 4 for _, layer in sst.spectral_modules(model))
    linear = nn.Linear(10, 6)
    layer = sst.convert(linear, rank=3)  # a bare Linear comes back converted
    x = torch.randn(4, 10)
    assert isinstance(layer, sst.SpectralLinear)
    assert torch.allclose(layer(x), linear(x), atol=1e-6)
    assert torch.equal(sst.merge(layer).bias, linear.bias)


def _loss(out: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (out.tanh() * weights).sum() + 0.5 * out.square().sum()


@pytest.mark.parametrize("shape", [(7, 12), (12, 7)], ids=["wide", "tall"])
def test_gradients_match_autograd_on_the_plain_weight(shape):
    out_f, in_f = shape
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f).double()
    layer = sst.SpectralLinear.from_linear(linear)
    with torch.no_grad():
        layer.S[2] = 0.0  # a zero singular value: the enhanced gradient must stay exact
        linear.weight.copy_(layer.merged_weight())
    x = torch.randn(5, 3, in_f, dtype=torch.float64)
    x_plain, x_spec = x.clone().requires_grad_(), x.clone().requires_grad_()
    _loss(linear(x_plain)).backward()
    _loss(layer(x_spec)).backward()
    g = linear.weight.grad  # G = dL/dW on the original parameterisation
    u, s, v = layer.U.detach(), layer.S.detach(), layer.V.detach()
    torch.testing.assert_close(layer.S.grad, torch.diagonal(u.T @ g @ v))  # u_i^T G v_i
    torch.testing.assert_close(layer.U.grad, g @ v)  # enhanced: G v_i (no S_i factor)
    torch.testing.assert_close(layer.V.grad, g.T @ u)  # enhanced: G^T u_i
    assert layer.U.grad[:, 2].abs().sum() > 0  # nonzero although S_2 = 0
    torch.testing.assert_close(x_spec.grad, x_plain.grad)
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad)

    # enhanced_grad=False gives the true partial derivatives of U diag(S) V^T
    layer.enhanced_grad = False
    layer.zero_grad()
    _loss(layer(x)).backward()
    leaves = [t.clone().requires_grad_() for t in (u, s, v)]
    _loss(F.linear(x, (leaves[0] * leaves[1]) @ leaves[2].T, layer.bias.detach())).backward()
    for param, leaf in zip((layer.U, layer.S, layer.V), leaves, strict=True):
        torch.testing.assert_close(param.grad, leaf.grad)
    torch.testing.assert_close(layer.U.grad, g @ v * s)


def test_sampled_vectors_get_the_enhanced_gradient_columns():
    torch.manual_seed(1)
    linear = nn.Linear(9, 6).double()
    layer = sst.SpectralLinear.from_linear(linear, rank=2)
    x = torch.randn(8, 9, dtype=torch.float64)
    _loss(linear(x)).backward()
    _loss(layer(x)).backward()
    opt = lo.SSTAdamW(sst.sst_param_groups(nn.Sequential(layer)), lr=1e-3)
    _, group, u, _, v = opt.spectral_layers()[0]
    idx = opt.state[u]["proj_idx"]
    g = linear.weight.grad
    low_u = opt.projector.project(u.grad, opt.state[u], group)
    low_v = opt.projector.project(v.grad, opt.state[v], group)
    torch.testing.assert_close(low_u, g @ v.detach()[:, idx])
    torch.testing.assert_close(low_v, g.T @ u.detach()[:, idx])
    torch.testing.assert_close(opt.projector.project_back(low_u, opt.state[u], group)[:, idx],
                               low_u)


def test_autocast_backward_runs_and_keeps_parameter_dtypes():
    layer = sst.SpectralLinear.from_linear(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


def test_save_pretrained_merged_and_spectral_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    model = tiny_llama(seed=4)
    sst.convert(model, rank=4)
    opt = lo.SSTAdamW(sst.sst_param_groups(model), lr=1e-2, iteration_length=2,
                      iteration_warmup=0)
    for ids in token_batches(3, seed=6):  # train so the weights differ from the init
        opt.zero_grad()
        lm_loss(model, ids).backward()
        opt.step()
    ids = token_batches(1, seed=7)[0]
    expected = _outputs(model, ids)

    # path 1: save the spectral form, reload into a converted model built from the config
    model.save_pretrained(tmp_path / "spectral")
    saved = load_file(str(tmp_path / "spectral" / "model.safetensors"))
    assert any(k.endswith("q_proj.U") for k in saved)
    fresh = sst.convert(tiny_llama(seed=99), rank=4)
    fresh.load_state_dict(saved, strict=True)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert torch.equal(_outputs(fresh, ids), expected)

    # path 2: merge, then an ordinary checkpoint that loads without any SST code
    sst.merge(model).save_pretrained(tmp_path / "merged")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert not sst.spectral_modules(plain)
    assert torch.allclose(_outputs(plain, ids), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0), "rank=0"),
        (dict(rank=2.5), "rank=2.5"),
        (dict(rank=65), "rank=65 exceeds"),
        (dict(rank=4, target_modules=["embed_tokens"]), "not nn.Linear"),
        (dict(rank=4, target_modules=["no_such_layer"]), "matched no"),
    ],
)
def test_convert_rejects_bad_input(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        sst.convert(model, **kwargs)
    assert not sst.spectral_modules(model)  # nothing half-converted


def test_convert_rejects_tied_weights():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied"):
        sst.convert(model, rank=4, target_modules=["lm_head"])
