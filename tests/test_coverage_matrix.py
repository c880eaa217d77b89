"""Every weight of real architectures: Bayesian conversion, fixing with both methods, export.

Each architecture is built in code with random weights and tiny dimensions (Hugging Face models
from tiny configs; nothing is downloaded). For each one:

* ``bayesianize`` covers every floating parameter, mean mode is bit-exact, sample mode adds
  noise (also in eval mode under ``no_grad``, where torch's fused fast paths run), and
  ``to_point_estimate`` gives back the original module classes, keys and sharing;
* ``compress`` with PWFN and WFN under ``quantise.strict`` (and norms quantised) fixes 100 %
  of the parameters: every value of every tensor is on the shared codebook;
* the export reloads bit-exactly into a fresh instance, and the coverage report is right.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes
from pwfn import compress
from pwfn.errors import ModelError
from pwfn.export import ArtefactError, export_model, load_exported_model, load_packed_model

N_CLASSES = 3


class _Seq(nn.Module):
    """Token ids -> logits through a sequence encoder, mean-pooled."""

    def __init__(self, body: nn.Module, dim: int, vocab: int = 20, kind: str = "encoder") -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = body
        self.kind = kind
        self.head = nn.Linear(dim * (2 if kind == "birnn" else 1), N_CLASSES)

    def forward(self, ids):
        h = self.emb(ids)
        if self.kind in ("rnn", "birnn"):
            h = self.body(h)[0]
        else:
            h = self.body(h)
        return self.head(h.mean(1))


class _ViT(nn.Module):
    """A hand-written ViT: conv patches, a cls token and a position embedding as bare parameters."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, N_CLASSES)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(len(x), -1, -1), p], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(h))[:, 0])


class _EmbBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 8, mode="mean")
        self.head = nn.Linear(8, N_CLASSES)

    def forward(self, ids):
        return self.head(self.bag(ids))


class _AutoEnc(nn.Module):
    """ConvTranspose2d decoder; the reconstruction is pooled into logits so labels train it."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.dec = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(2, N_CLASSES)

    def forward(self, x):
        return self.head(self.dec(torch.relu(self.enc(x))).mean((2, 3)))


def _mobilenet():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, N_CLASSES))


class _Tied(nn.Module):
    """An LM-style tie (embedding <-> output projection) and one module used in two places."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.a = self.b = self.mix
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight
        self.head = nn.Linear(20, N_CLASSES)

    def forward(self, ids):
        h = self.b(torch.relu(self.a(self.emb(ids))))
        return self.head(self.out(h).mean(1))


class _HF(nn.Module):
    """A Hugging Face model's hidden states (or logits) pooled into class logits."""

    def __init__(self, model: nn.Module, dim: int, image: bool = False) -> None:
        super().__init__()
        self.model = model
        self.image = image
        self.head = nn.Linear(dim, N_CLASSES)

    def forward(self, x):
        out = self.model(pixel_values=x) if self.image else self.model(input_ids=x)
        h = out.logits if out.logits.dim() == 3 else out.logits[:, None]
        return self.head(h.mean(1))


def _hf(name: str):
    tr = pytest.importorskip("transformers")
    tr.logging.set_verbosity_error()
    if name == "gpt2":
        m = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20, n_positions=16,
                                             bos_token_id=0, eos_token_id=0))
        return _HF(m, 20)
    if name == "bert":
        m = tr.BertForSequenceClassification(tr.BertConfig(
            vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=4))
        return _HF(m, 4)
    if name == "llama":
        m = tr.LlamaForCausalLM(tr.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=20, max_position_embeddings=32, bos_token_id=0, eos_token_id=0))
        return _HF(m, 20)
    m = tr.ViTForImageClassification(tr.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=4))
    return _HF(m, 4, image=True)


def _weight_norm_param():
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))
    torch.nn.utils.parametrizations.weight_norm(m[1])
    return m


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 20, (n, 6), generator=torch.Generator().manual_seed(n))


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))


ARCHS = {
    "transformer_batch_first": (lambda: _Seq(nn.TransformerEncoder(nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False), 16), _tokens),
    "transformer_seq_first": (lambda: _SeqFirst(), _tokens),
    "vit_by_hand": (_ViT, _images),
    "lstm_bi_proj": (lambda: _Seq(nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=4),
                                  8, kind="birnn_proj"), _tokens),
    "gru": (lambda: _Seq(nn.GRU(8, 8, batch_first=True), 8, kind="rnn"), _tokens),
    "embedding_bag": (_EmbBag, _tokens),
    "conv_transpose_autoencoder": (_AutoEnc, _images),
    "mobilenet_like": (_mobilenet, _images),
    "weight_norm": (_weight_norm_param, _images),
    "tied_and_shared": (_Tied, _tokens),
    "hf_gpt2": (lambda: _hf("gpt2"), _tokens),
    "hf_bert": (lambda: _hf("bert"), _tokens),
    "hf_llama": (lambda: _hf("llama"), _tokens),
    "hf_vit": (lambda: _hf("vit"), _images),
}


class _SeqFirst(nn.Module):
    """nn.TransformerEncoder with batch_first=False (sequence-first tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1,
                                          enable_nested_tensor=False)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, ids):
        return self.head(self.body(self.emb(ids).transpose(0, 1)).mean(0))


def _fix_birnn_proj(model: nn.Module) -> nn.Module:
    if getattr(model, "kind", None) == "birnn_proj":  # proj_size=4, both directions -> 8 features
        model.kind = "rnn"
        model.head = nn.Linear(8, N_CLASSES)
    return model


def build(name: str):
    make, inputs = ARCHS[name]
    torch.manual_seed(0)
    return _fix_birnn_proj(make()), inputs


def loaders(inputs, n: int = 48):
    x = inputs(n)
    y = torch.arange(n) % N_CLASSES
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=16, shuffle=True), DataLoader(ds, batch_size=48)


FAST = {"progress": False, "quantise": {"strict": True}, "contract": {"enforce": False},  # coverage, not accuracy
        "pwfn": {"fractions": [0.6, 1.0], "round_epochs": 0.5, "first_round_epochs": 0.0, "mc_samples": 1,
                 "quantise_norms": True},
        "wfn": {"fractions": [0.6, 1.0], "round_epochs": 0.5, "quantise_norms": True}}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_bayesianize_covers_everything_and_mean_mode_is_exact(name):
    if name == "weight_norm":
        pytest.skip("covered by test_parametrized_weights_are_folded_or_refused")
    model, inputs = build(name)
    model.eval()
    x = inputs(4)
    with torch.no_grad():
        ref = model(x)
    b = bayes.bayesianize(model, norms=True, sigma_init=0.05)
    n_float = sum(s.tensor.numel() for s in bayes.parameter_sites(model) if s.tensor.is_floating_point())
    n_gauss = sum(e.mu.numel() for e in bayes.gaussian_parameters(b))
    assert n_gauss == n_float, "every floating parameter has a sigma"
    # the user's classes stay theirs
    for (n1, m1), (n2, m2) in zip(model.named_modules(), b.named_modules()):
        if n1 == n2:
            assert isinstance(m2, type(m1))
    with torch.no_grad():
        with bayes.forward_mode(b, "mean"):
            assert torch.equal(b(x), ref)
        # eval + no_grad: torch's fused fast paths still see the sampled weights
        s1, s2 = b(x), b(x)
    assert not torch.equal(s1, ref) and not torch.equal(s1, s2)
    with torch.no_grad(), bayes.forward_mode(b, "local"):
        loc = b(x)  # local reparameterisation where a rule exists, sampling elsewhere
    assert loc.shape == ref.shape and torch.isfinite(loc).all() and not torch.equal(loc, ref)
    point = bayes.to_point_estimate(b)
    assert list(point.state_dict()) == list(model.state_dict())
    point.eval()
    with torch.no_grad():
        assert torch.equal(point(x), ref)
    b.train()
    out = b(x)
    loss = out.square().mean() + bayes.sigma_regularizer(b, lam=1.0)
    loss.backward()
    assert all(e.sigma.grad is not None and e.sigma.grad.abs().sum() > 0 for e in bayes.gaussian_parameters(b))


@pytest.mark.parametrize("method", ["pwfn", "wfn"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_compress_fixes_every_parameter_and_export_reloads_bit_exact(name, method, tmp_path):
    model, inputs = build(name)
    train, val = loaders(inputs)
    result = compress(copy.deepcopy(model), train, val, method=method, config=FAST, run_dir=tmp_path / "run")
    cov = result.report["coverage"]
    assert cov["share"] == 1.0 and cov["left_float"] == []
    assert cov["quantised_parameters"] == sum(
        s.tensor.numel() for s in bayes.parameter_sites(result.point_model) if s.tensor.numel())
    final = result.report["final"]
    codebook = torch.tensor(final["codebook"], dtype=torch.float64)
    point = result.point_model
    for pname, p in point.named_parameters():
        assert torch.isin(p.detach().double(), codebook).all(), f"{pname} has values off the codebook"
    # sharing survives fixing
    if name == "tied_and_shared":
        assert point.out.weight is point.emb.weight and point.a is point.b
        assert cov["shared"] == {"emb.weight": ["out.weight"], "mix.weight": ["a.weight", "b.weight"],
                                 "mix.bias": ["a.bias", "b.bias"]}
    if name == "hf_gpt2":
        assert point.model.lm_head.weight is point.model.transformer.wte.weight
    if name == "weight_norm":
        assert "1.weight" in result.report["quantised_tensors"]
        assert result.report["coverage"]["folded_parametrizations"]
    # export -> reload into a fresh instance of the user's model, bit for bit
    out = export_model(point, result.report["quantised_tensors"], tmp_path / "export", method=method)
    assert out["fixed"]
    size = out["size"]
    params = {n for n, _ in point.named_parameters(remove_duplicate=False)}
    assert set(size["coverage"]["float_tensors"]) == {k for k in point.state_dict() if k not in params}
    total_fp32 = 4 * sum(v.numel() for k, v in point.state_dict().items() if k not in out_shared(point))
    assert size["total"]["fp32_bytes"] == total_fp32
    assert size["arithmetic"]["multiplications_kept"] == sum(  # persistent float buffers (BN statistics)
        v.numel() for k, v in point.state_dict().items() if k not in params and v.is_floating_point())
    fresh = build(name)[0]
    if name == "weight_norm":
        torch.nn.utils.parametrize.remove_parametrizations(fresh[1], "weight")
    for loader in (lambda: load_packed_model(tmp_path / "export" / "model.pwfn", model=copy.deepcopy(fresh)),
                   lambda: load_exported_model(tmp_path / "export", model=copy.deepcopy(fresh))):
        loaded = loader()
        want, got = point.state_dict(), loaded.state_dict()
        assert list(want) == list(got)
        for k in want:
            assert torch.equal(want[k], got[k]), k
        point.eval()
        x = inputs(5)
        with torch.no_grad():
            assert torch.equal(loaded(x), point(x))


def out_shared(model: nn.Module) -> set[str]:
    from pwfn.export import shared_keys

    return set(shared_keys(model.state_dict()))


def test_loading_into_a_model_whose_sharing_differs_is_refused(tmp_path):
    tr = pytest.importorskip("transformers")
    tr.logging.set_verbosity_error()
    model, inputs = build("tied_and_shared")
    export_model(model, [n for n, _ in model.named_parameters()], tmp_path / "e", method="wfn",
                 allow_unfixed=True)
    untied = build("tied_and_shared")[0]
    untied.out.weight = nn.Parameter(untied.emb.weight.detach().clone())
    with pytest.raises(ArtefactError, match="sharing differs.*out.weight tied to emb.weight"):
        load_packed_model(tmp_path / "e" / "model.pwfn", model=untied)
    # and the other way round: a model that ties what the artefact holds separately
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    export_model(plain, [], tmp_path / "p", method="wfn", allow_unfixed=True)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ArtefactError, match="the model ties 1.weight to 0.weight"):
        load_exported_model(tmp_path / "p", model=tied)


def test_coverage_report_lists_what_stays_float_and_strict_refuses(tmp_path):
    from pwfn.model.coverage import plan

    model = _mobilenet()
    cov = plan(model)
    left = {t.name: t for t in cov.left_float}
    assert set(left) == {"1.weight", "1.bias", "4.weight", "4.bias"}
    assert all("quantise_norms" in t.reason and t.owner_type == "BatchNorm2d" for t in left.values())
    s = cov.summary()
    n_bn = sum(t.numel for t in left.values())
    assert s["parameters"] == sum(p.numel() for p in model.parameters())
    assert s["quantised_parameters"] == s["parameters"] - n_bn
    assert s["by_owner_type"]["BatchNorm2d"]["share"] == 0.0 and s["by_owner_type"]["Conv2d"]["share"] == 1.0
    assert s["buffers"]["numel"] == sum(b.numel() for b in model.buffers())
    cov2 = plan(model, exclude=["*.bias"], include=[])
    assert {t.name for t in cov2.left_float} >= {"6.bias", "10.bias"}
    train, val = loaders(_images)
    cfg = {**FAST, "pwfn": {**FAST["pwfn"], "quantise_norms": False}}
    with pytest.raises(ModelError, match=r"strict coverage is on, but 4 tensors would stay float: 1.weight"):
        compress(model, train, val, method="pwfn", config=cfg, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # without strict the run goes ahead and the report says what stayed float
    cfg = {**cfg, "quantise": {"strict": False}}
    res = compress(model, train, val, method="pwfn", config=cfg)
    cov = res.report["coverage"]
    assert math.isclose(cov["share"], s["quantised_parameters"] / s["parameters"])
    assert [t["name"] for t in cov["left_float"]] == ["1.weight", "1.bias", "4.weight", "4.bias"]


def test_tensors_left_float_for_one_reason_are_one_warning(caplog):
    """Forty norm tensors must not bury the warnings that matter: one line per reason, with the count."""
    import logging

    from pwfn.model.coverage import LISTED, plan

    layers = []
    for _ in range(LISTED):  # 2 * LISTED norm tensors: more than one line names
        layers += [nn.Linear(4, 4), nn.LayerNorm(4)]
    model = nn.Sequential(*layers, nn.BatchNorm1d(4), nn.Linear(4, 2))
    cov = plan(model, exclude=["0.weight", "2.weight"], norms_option="pwfn.quantise_norms")
    with caplog.at_level(logging.WARNING, logger="pwfn.model.coverage"):
        cov.log("pwfn")
    lines = [r.getMessage() for r in caplog.records if r.name == "pwfn.model.coverage"]
    norms = [m for m in lines if "normalisation-layer" in m]
    assert len(norms) == 1 and len(lines) == 2, lines
    n_norm = 2 * LISTED + 2
    assert f"pwfn: {n_norm} tensors (BatchNorm1d, LayerNorm; {4 * n_norm} values) stay float" in norms[0]
    assert "1.weight, 1.bias, 3.weight" in norms[0] and f"and {n_norm - LISTED} more" in norms[0]
    (excluded,) = [m for m in lines if "excluded" in m]  # the other reason: its own line, listing both
    assert excluded.startswith("pwfn: 2 tensors (Linear; 32 values) stay float: excluded by a pattern")
    assert excluded.endswith(": 0.weight, 2.weight")


def test_parametrized_weights_are_folded_or_refused():
    m = _weight_norm_param()
    x = _images(3)
    with torch.no_grad():
        ref = m(x)
    with pytest.raises(bayes.ConversionError, match="computed by another parametrization.*fold=True"):
        bayes.bayesianize(m)
    old = nn.Sequential(nn.Flatten(), torch.nn.utils.weight_norm(nn.Linear(64, N_CLASSES)))
    with pytest.raises(bayes.ConversionError, match="WeightNorm"):
        bayes.bayesianize(old)
    for model in (m, old):
        b = bayes.bayesianize(model, fold=True)
        with torch.no_grad(), bayes.forward_mode(b, "mean"):
            assert torch.allclose(b(x), model(x) if model is old else ref, atol=1e-6)
        assert not any(type(h).__name__ == "WeightNorm" for mod in b.modules() for h in mod._forward_pre_hooks.values())


def test_low_precision_models_are_refused_with_advice(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, N_CLASSES)).to(torch.bfloat16)
    x = _images(48).to(torch.bfloat16)
    ds = TensorDataset(x, torch.arange(48) % N_CLASSES)
    for method in ("pwfn", "wfn"):
        with pytest.raises(ModelError, match="bfloat16.*model.float\\(\\).*precision=bf16"):
            compress(model, DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=48), method=method,
                     config=FAST, run_dir=tmp_path / method)
        assert not (tmp_path / method).exists()


def test_float64_and_compiled_models(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, N_CLASSES)).double()
    x = _images(48).double()
    ds = TensorDataset(x, torch.arange(48) % N_CLASSES)
    train, val = DataLoader(ds, batch_size=16), DataLoader(ds, batch_size=48)
    res = compress(model, train, val, method="pwfn", config=FAST)
    assert res.report["coverage"]["share"] == 1.0
    assert all(p.dtype == torch.float64 for p in res.point_model.parameters())
    compiled = torch.compile(nn.Sequential(nn.Flatten(), nn.Linear(64, N_CLASSES)))
    train, val = loaders(_images)
    res = compress(compiled, train, val, method="wfn", config=FAST)
    assert res.report["quantised_tensors"] == ["1.weight", "1.bias"]


@pytest.mark.parametrize("owner", ["conv_transpose", "hf_conv1d"])
def test_local_mode_variance_matches_sampling(owner):
    """Local reparameterisation draws pre-activations with the variance weight sampling gives."""
    torch.manual_seed(0)
    if owner == "conv_transpose":
        layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        x = torch.randn(1, 2, 4, 4)
    else:
        tr = pytest.importorskip("transformers")
        layer = tr.pytorch_utils.Conv1D(5, 4)
        x = torch.randn(3, 4)
    b = bayes.bayesianize(layer, sigma_init=0.2)
    assert all(bayes.local_mode_coverage(b).values())
    with torch.no_grad():
        with bayes.forward_mode(b, "sample"):
            s = torch.stack([b(x) for _ in range(4000)])
        with bayes.forward_mode(b, "local"):
            loc = torch.stack([b(x) for _ in range(4000)])
        with bayes.forward_mode(b, "mean"):
            mean = b(x)
    assert torch.allclose(loc.mean(0), mean, atol=0.05)
    assert torch.allclose(loc.var(0), s.var(0), rtol=0.15, atol=1e-3)
