"""Tests of varst_scverse.module: configs, quantiser, VQ-VAE, VAR transformer, sampling, generation, checkpoints."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from threadpoolctl import threadpool_limits

from varst_scverse.module import (
    MultiScaleResidualQuantizer,
    TwoStageVARST,
    block_causal_mask,
    filter_logits,
    guide,
    load_checkpoint,
    pool_genes,
    resolve_configs,
    resolve_scales,
    save_checkpoint,
    token_probs,
    upsample_genes,
)

G, H = 32, 12
VQ = {"vocab_size": 64, "embed_dim": 16, "hidden_dim": 32, "gene_mixing_dim": 16, "scales": (1, 4, 8, None)}
VAR = {
    "embed_dim": 32,
    "num_heads": 2,
    "num_layers": 2,
    "feedforward_dim": 64,
    "condition_embed_dim": 32,
    "neighbour_k": 0,
    "generate_scales": None,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and several threads on busy cores are many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)


def _module(seed: int = 0, var: dict | None = None, vq: dict | None = None, **kw) -> TwoStageVARST:
    torch.manual_seed(seed)
    return TwoStageVARST(
        G, vqvae_config={**VQ, **(vq or {})}, var_config={**VAR, **(var or {})}, histology_dim=H, preset="cpu", **kw
    )


def _expression(n: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(1, G, generator=g) * 4 + 0.2
    return torch.log1p(torch.poisson(rate.expand(n, G), generator=g))


def _condition(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, generator=g), torch.rand(n, 2, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def stage1_module() -> TwoStageVARST:
    """A module after a few tensor-level stage-1 steps (codebook initialised from data, gene order permuted)."""
    m = _module()
    m.gene_order.copy_(torch.randperm(G, generator=torch.Generator().manual_seed(3)))
    y = _expression(64)
    m.vqvae.set_standardisation(m.to_model_order(y).mean(0), m.to_model_order(y).std(0))
    opt = torch.optim.Adam(m.vqvae.parameters(), lr=1e-2)
    m.train()
    for _ in range(5):
        loss = m.stage1_loss(y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    return m


@pytest.fixture(scope="module")
def gen_module(stage1_module, tmp_path_factory) -> TwoStageVARST:
    """A stage-2 module (untrained transformer on the stage-1 tokenizer above) in eval mode, all 4 scales generated."""
    path = tmp_path_factory.mktemp("ck") / "stage1.safetensors"
    stage1_module.save_stage_checkpoint(path, stage=1)
    m = _module(seed=5)
    m.set_training_stage(2, stage1_ckpt_path=path)
    # a few stage-2 steps so that the head is not at its initialisation
    hist, xy = _condition(24, seed=2)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(3):
        loss = m.stage2_loss(_expression(24), hist, xy)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


# --- configs ---
def test_default_scales_give_241_tokens():
    # default (seed) stage 1; a small transformer keeps construction fast — the token count is stage 1's
    m = TwoStageVARST(200, var_config={"embed_dim": 32, "num_heads": 2, "num_layers": 1, "feedforward_dim": 32})
    assert m.scales == (1, 8, 32, 200)
    assert m.n_tokens == 241
    assert m.n_generated_tokens == 241
    y = torch.log1p(torch.poisson(torch.full((3, 200), 2.0)))
    tok = m.eval().tokenize(y)
    assert tok.shape == (3, 241)
    assert tok.dtype == torch.long
    assert int(tok.min()) >= 0 and int(tok.max()) < 4096


def test_seed_preset_matches_the_guide():
    vq, var = resolve_configs("seed")
    assert vq["vocab_size"] == var["vocab_size"] == 4096
    assert vq["embed_dim"] == 128 and vq["beta"] == 0.25 and vq["hierarchical_loss_weight"] == 0.1
    assert vq["scales"] == (1, 8, 32, None)
    assert (var["embed_dim"], var["num_heads"], var["num_layers"], var["feedforward_dim"]) == (640, 8, 12, 2560)
    assert var["dropout"] == 0.1 and var["condition_dropout"] == 0.1 and var["condition_embed_dim"] == 640


def test_config_override_and_vocab_carries_over():
    vq, var = resolve_configs("cpu", {"vocab_size": 96, "embed_dim": 24}, {"num_layers": 1})
    assert vq["vocab_size"] == var["vocab_size"] == 96
    assert vq["embed_dim"] == 24 and var["num_layers"] == 1
    assert vq["hidden_dim"] == 256  # the rest of the cpu preset survives


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError, match="Unknown vqvae_config key.*'codebook_sise'.*Valid keys.*'vocab_size'"):
        resolve_configs("cpu", {"codebook_sise": 3})
    with pytest.raises(ValueError, match="Unknown var_config key.*Valid keys.*'num_heads'"):
        resolve_configs("cpu", None, {"heads": 3})
    with pytest.raises(ValueError, match="Unknown preset"):
        resolve_configs("gpu")


def test_vocab_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="vocab_size must agree"):
        resolve_configs("cpu", {"vocab_size": 64}, {"vocab_size": 32})


@pytest.mark.parametrize(
    ("vq", "var", "match"),
    [
        ({"scales": (8, 4)}, {}, "increase strictly"),
        ({"scales": (1, None, 8)}, {}, "only be the last"),
        ({"codebook_update": "kmeans"}, {}, "codebook_update"),
        ({}, {"embed_dim": 30, "num_heads": 4}, "divisible"),
        ({}, {"dropout": 1.5}, "dropout"),
    ],
)
def test_invalid_config_values(vq, var, match):
    with pytest.raises(ValueError, match=match):
        resolve_configs("cpu", vq, var)


def test_scales_larger_than_the_gene_count_are_refused():
    with pytest.raises(ValueError, match="positions but there are only 6 genes"):
        resolve_scales((1, 4, 8, None), 6)  # 8 > G although the last scale (None) resolves to G
    with pytest.raises(ValueError, match="repeat"):
        resolve_scales((1, 4, 8, None), 8)
    assert resolve_scales((1, 4, 8, None), 9) == (1, 4, 8, 9)
    with pytest.raises(ValueError, match="genes"):
        TwoStageVARST(6, vqvae_config=VQ, var_config=VAR, preset="cpu")


def test_get_model_info_keys_and_counts():
    m = _module()
    info = m.get_model_info()
    for key in ("total_parameters", "stage1_parameters", "stage2_parameters", "current_stage", "vocab_size"):
        assert key in info
    assert info["stage1_parameters"] == sum(p.numel() for p in m.vqvae.parameters())
    assert info["stage1_parameters"] + info["stage2_parameters"] == info["total_parameters"]
    assert info["current_stage"] == 1 and info["vocab_size"] == 64
    assert info["scales"] == [1, 4, 8, G] and info["n_tokens"] == 1 + 4 + 8 + G
    assert info["vqvae_config"]["embed_dim"] == 16 and info["var_config"]["embed_dim"] == 32
    json.dumps(info)  # plain JSON types only


# --- quantiser ---
def test_pool_and_upsample_shapes():
    x = torch.randn(2, 10, 3)
    assert pool_genes(x, 4).shape == (2, 4, 3)
    assert torch.allclose(pool_genes(x, 1)[:, 0], x.mean(1), atol=1e-6)
    assert pool_genes(x, 10) is x
    assert upsample_genes(torch.ones(2, 1, 3), 10).shape == (2, 10, 3)
    assert torch.allclose(upsample_genes(torch.full((1, 1, 3), 2.0), 7), torch.full((1, 7, 3), 2.0))


def _toy_quantizer() -> MultiScaleResidualQuantizer:
    q = MultiScaleResidualQuantizer(8, (1, 2, 8), vocab_size=4, embed_dim=2, codebook_update="loss")
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.0], [5.0, 5.0], [-5.0, -5.0]]))
    return q.eval()


def test_quantiser_is_residual_not_independent_per_scale():
    """A profile equal to one code everywhere is coded by the coarsest scale; finer scales code the zero rest.

    Quantising each scale's raw pooled signal independently (the seed draft) would add the code once per scale.
    """
    q = _toy_quantizer()
    feats = torch.tensor([1.0, -2.0]).expand(3, 8, 2).clone()
    out = q(feats)
    assert torch.allclose(out["f_hat"], feats)
    assert [t.tolist() for t in out["tokens"]] == [[[0]] * 3, [[1, 1]] * 3, [[1] * 8] * 3]
    assert [t.tolist() for t in q.tokenize(feats)] == [t.tolist() for t in out["tokens"]]
    assert q.n_tokens == 11


def test_quantiser_prefixes_accumulate_codes():
    q = _toy_quantizer()
    feats = torch.randn(4, 8, 2)
    out = q(feats)
    tokens = q.tokenize(feats)
    prefixes = q.tokens_to_prefixes(tokens)
    assert len(prefixes) == 3
    for a, b in zip(out["prefixes"], prefixes):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(prefixes[0], q.embed(tokens[0]).expand(4, 8, 2))
    assert torch.allclose(q.embed_probs(torch.nn.functional.one_hot(tokens[0], 4).float()), q.embed(tokens[0]))


def test_ema_codebook_learns_in_training_only():
    q = MultiScaleResidualQuantizer(16, (1, 4, 16), vocab_size=8, embed_dim=4, ema_decay=0.9)
    x = torch.randn(32, 16, 4)
    q.train()
    q(x)
    assert bool(q.initialised)
    assert int(q.usage.sum()) == 32 * (1 + 4 + 16)
    before = q.codebook.clone()
    q(x)
    assert not torch.equal(before, q.codebook)
    q.eval()
    before, usage = q.codebook.clone(), q.usage.clone()
    q(x)
    q.tokenize(x)
    assert torch.equal(before, q.codebook) and torch.equal(usage, q.usage)
    q.reset_usage()
    assert int(q.usage.sum()) == 0


def test_dead_codes_are_restarted_on_data():
    q = MultiScaleResidualQuantizer(16, (1, 16), vocab_size=8, embed_dim=4, dead_code_threshold=0.5)
    q.train()
    q(torch.randn(4, 16, 4))
    with torch.no_grad():
        q.codebook[3] = 1e6  # far from everything: never chosen
        q.ema_sum[3] = 1e6
    q.ema_count[3] = 1e-3
    q(torch.randn(4, 16, 4))
    assert float(q.codebook[3].abs().max()) < 1e3
    assert float(q.ema_count[3]) == 1.0


# --- stage 1 ---
def test_stage1_loss_terms_and_tokenize_shapes(stage1_module):
    m = stage1_module
    y = _expression(6)
    out = m.vqvae.eval()(m.to_model_order(y))
    assert out["per_scale_mse"].shape == (4,)
    assert torch.isclose(out["recon_loss"], out["per_scale_mse"][-1])
    assert torch.isclose(out["hierarchical_loss"], out["per_scale_mse"][:-1].sum())
    assert [t.shape for t in out["tokens"]] == [(6, 1), (6, 4), (6, 8), (6, G)]
    assert m.tokenize(y).shape == (6, m.n_tokens)
    assert m.reconstruct(y).shape == (6, G)
    assert m.reconstruct(y, n_scales=1).shape == (6, G)


def test_gene_order_round_trip(stage1_module):
    m = stage1_module
    y = torch.arange(G, dtype=torch.float32)[None]
    assert not torch.equal(m.to_model_order(y), y)
    assert torch.equal(m.to_caller_order(m.to_model_order(y)), y)


def test_reconstruction_is_in_caller_gene_order(stage1_module):
    """Reconstruct is equivariant to the module's gene order: permuting the order buffer and the input together."""
    m = stage1_module
    y = _expression(5)
    direct = m.vqvae.reconstruct(m.to_model_order(y))
    assert torch.allclose(m.reconstruct(y), m.to_caller_order(direct))


# --- stage 2 ---
def test_stage2_refuses_without_stage1():
    m = _module()
    with pytest.raises(RuntimeError, match="stage-1 tokenizer.*stage1_ckpt"):
        m.set_training_stage(2)
    assert m.current_stage == 1
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        m.set_training_stage(3)


def test_stage1_checkpoint_loads_the_tokenizer(stage1_module, gen_module):
    """The seed flow: save_stage_checkpoint(stage=1), then set_training_stage(2, stage1_ckpt_path=...)."""
    ref = stage1_module.vqvae.state_dict()
    got = gen_module.vqvae.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert torch.equal(gen_module.gene_order, stage1_module.gene_order)
    assert gen_module.current_stage == 2 and gen_module.stage1_trained
    assert not any(p.requires_grad for p in gen_module.vqvae.parameters())
    assert all(p.requires_grad for p in gen_module.var.parameters())


def test_stage2_trains_only_the_transformer(gen_module):
    m = gen_module
    before = {k: v.clone() for k, v in m.vqvae.state_dict().items()}
    m.train()
    assert not m.vqvae.training  # frozen tokenizer stays in eval mode
    hist, xy = _condition(8)
    out = m.stage2_loss(_expression(8), hist, xy)
    out["loss"].backward()
    assert all(p.grad is None for p in m.vqvae.parameters())
    assert m.var.head.weight.grad is not None and m.condition.hist[0].weight.grad is not None
    assert len(out["token_accuracy"]) == 4
    assert "aux_decode_loss" in out  # the cpu preset adds the expected-value decode loss
    m.zero_grad(set_to_none=True)
    m.eval()
    for k, v in m.vqvae.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stage2_loss_with_aux_decode_and_prefix_generation(stage1_module, tmp_path):
    path = tmp_path / "s1.safetensors"
    stage1_module.save_stage_checkpoint(path, stage=1)
    m = _module(var={"generate_scales": 2, "aux_decode_weight": 1.0})
    m.set_training_stage(2, stage1_ckpt_path=path)
    hist, xy = _condition(8)
    out = m.train().stage2_loss(_expression(8), hist, xy)
    assert m.n_generated_tokens == 5
    assert len(out["token_accuracy"]) == 2
    assert torch.isclose(out["loss"], out["ce_loss"] + out["aux_decode_loss"])
    tokens = m.tokenize(_expression(8))
    out2 = m.eval().stage2_loss(_expression(8), hist, xy, tokens=tokens)
    out3 = m.stage2_loss(_expression(8), hist, xy)
    assert torch.isclose(out2["ce_loss"], out3["ce_loss"])


def test_block_causal_mask_matrix():
    mask = block_causal_mask((1, 2, 3))
    levels = [0, 1, 1, 2, 2, 2]
    expected = torch.tensor([[lj <= li for lj in levels] for li in levels])
    assert torch.equal(mask, expected)


def test_block_causal_mask_in_transformer_forward(gen_module):
    """Inputs of scale k change the logits of scale k (and finer) but never those of coarser scales."""
    var = gen_module.var
    with torch.no_grad():
        cond = gen_module.condition(*_condition(3))
    q = gen_module.vqvae.quantizer
    tokens = gen_module.vqvae.tokenize(gen_module.to_model_order(_expression(3)))
    prefixes = q.tokens_to_prefixes(tokens[:3])
    with torch.no_grad():
        base = var(cond, prefixes)
    assert base.shape == (3, var.seq_len, 64)
    off = var.offsets
    for k in range(1, len(var.scales)):
        pert = list(prefixes)
        pert[k - 1] = pert[k - 1] + torch.randn_like(pert[k - 1])  # prefixes[k-1] feeds scale k
        with torch.no_grad():
            out = var(cond, pert)
        torch.testing.assert_close(out[:, : off[k]], base[:, : off[k]], rtol=0, atol=1e-6)
        assert float((out[:, off[k] : off[k + 1]] - base[:, off[k] : off[k + 1]]).abs().max()) > 1e-4


def test_kv_cache_equals_full_recompute(gen_module):
    hist, xy = _condition(4)
    for kw in ({"decode": "expected"}, {"decode": "greedy", "cfg": 2.0}, {"decode": "expected", "top_k": 5}):
        a = gen_module.generate(hist, xy, use_cache=True, **kw)
        b = gen_module.generate(hist, xy, use_cache=False, **kw)
        torch.testing.assert_close(a["expression"], b["expression"], rtol=1e-4, atol=1e-5)
        assert torch.equal(a["tokens"], b["tokens"])
    a = gen_module.generate(hist, xy, decode="sample", n_samples=2, generator=torch.Generator().manual_seed(0))
    b = gen_module.generate(
        hist, xy, decode="sample", n_samples=2, generator=torch.Generator().manual_seed(0), use_cache=False
    )
    assert torch.equal(a["tokens"], b["tokens"])


def test_generate_shapes_and_prefixes(gen_module):
    hist, xy = _condition(5)
    out = gen_module.generate(hist, xy, decode="sample", n_samples=3, return_prefixes=True)
    assert out["expression"].shape == (3, 5, G)
    assert out["tokens"].shape == (3, 5, gen_module.n_generated_tokens)
    assert out["prefix_expression"].shape == (4, 3, 5, G)
    torch.testing.assert_close(out["prefix_expression"][-1], out["expression"])
    with pytest.raises(ValueError, match="decode"):
        gen_module.generate(hist, xy, decode="beam")
    with pytest.raises(ValueError, match="n_samples"):
        gen_module.generate(hist, xy, n_samples=0)
    with pytest.raises(ValueError, match="width 7"):
        gen_module.generate(torch.randn(5, 7), xy)


def test_top_k_1_sampling_equals_greedy(gen_module):
    hist, xy = _condition(6)
    greedy = gen_module.generate(hist, xy, decode="greedy")
    s1 = gen_module.generate(hist, xy, decode="sample", top_k=1, generator=torch.Generator().manual_seed(1))
    s2 = gen_module.generate(hist, xy, decode="sample", top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(s1["tokens"], greedy["tokens"])
    assert torch.equal(s2["tokens"], greedy["tokens"])
    torch.testing.assert_close(s1["expression"], greedy["expression"])


def test_sampling_seeds(gen_module):
    hist, xy = _condition(6)

    def draw(seed):
        return gen_module.generate(
            hist, xy, decode="sample", n_samples=4, temperature=2.0, generator=torch.Generator().manual_seed(seed)
        )["tokens"]

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_inference_api(gen_module):
    hist, xy = _condition(3)
    gen_module.train()
    out = gen_module.inference(hist, xy, temperature=1.0, top_k=50, top_p=0.9)
    assert gen_module.training  # mode restored
    gen_module.eval()
    assert set(out) == {"predicted_gene_expression", "tokens"}
    assert out["predicted_gene_expression"].shape == (3, G)
    assert out["tokens"].shape == (3, gen_module.n_generated_tokens)
    assert torch.isfinite(out["predicted_gene_expression"]).all()


def test_neighbour_condition_is_required_when_configured():
    m = _module(var={"neighbour_k": 3}, current_stage=2).eval()
    hist, xy = _condition(2)
    with pytest.raises(ValueError, match="neighbour"):
        m.generate(hist, xy)
    assert m.generate(hist, xy, hist)["expression"].shape == (1, 2, G)


# --- sampling ---
def test_filter_logits_top_k_top_p_and_guidance():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=1)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1e-3)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.99)).sum() >= 3
    assert torch.allclose(token_probs(logits).sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="temperature"):
        token_probs(logits, temperature=0)
    cond, unc = torch.tensor([2.0]), torch.tensor([1.0])
    assert guide(cond, unc, 1.0) is cond
    assert torch.equal(guide(cond, unc, 3.0), torch.tensor([4.0]))


# --- checkpoints ---
def test_complete_model_round_trip(gen_module, tmp_path):
    path = tmp_path / "complete.safetensors"
    gen_module.stage2_trained = True
    gen_module.save_complete_model(path)
    loaded = TwoStageVARST.load_complete_model(path).eval()
    ref, got = gen_module.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert loaded.current_stage == 2 and loaded.stage1_trained and loaded.stage2_trained
    assert loaded.vqvae_config == gen_module.vqvae_config and loaded.var_config == gen_module.var_config
    hist, xy = _condition(4)
    for decode in ("expected", "greedy"):
        a, b = gen_module.generate(hist, xy, decode=decode), loaded.generate(hist, xy, decode=decode)
        assert torch.equal(a["expression"], b["expression"]) and torch.equal(a["tokens"], b["tokens"])
    a = gen_module.inference(hist, xy, generator=torch.Generator().manual_seed(4))
    b = loaded.inference(hist, xy, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a["tokens"], b["tokens"])
    torch.testing.assert_close(a["predicted_gene_expression"], b["predicted_gene_expression"])


def test_stage1_file_loads_as_a_complete_model(stage1_module, tmp_path):
    path = tmp_path / "s1.safetensors"
    stage1_module.save_stage_checkpoint(path, stage=1)
    loaded = TwoStageVARST.load_complete_model(path)
    y = _expression(4)
    assert torch.equal(loaded.eval().tokenize(y), stage1_module.tokenize(y))


def test_stage1_checkpoint_with_other_architecture_is_refused(stage1_module, tmp_path):
    path = tmp_path / "s1.safetensors"
    stage1_module.save_stage_checkpoint(path, stage=1)
    other = _module(vq={"vocab_size": 32})
    with pytest.raises(ValueError, match="vocab_size"):
        other.set_training_stage(2, stage1_ckpt_path=path)


@pytest.fixture
def ckpt_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, {"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, 3)}, {"kind": "test"})
    return path


def test_checkpoint_reads_back(ckpt_file):
    tensors, meta = load_checkpoint(ckpt_file)
    assert torch.equal(tensors["a"], torch.arange(64, dtype=torch.float32))
    assert meta["kind"] == "test" and meta["format"] == "varst-scverse"
    assert not list(ckpt_file.parent.glob("*.tmp"))  # atomic write leaves no temporary file


def test_truncated_checkpoint_is_refused(ckpt_file):
    data = ckpt_file.read_bytes()
    ckpt_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated|readable"):
        load_checkpoint(ckpt_file)


def test_tampered_checkpoint_fails_integrity(ckpt_file):
    data = bytearray(ckpt_file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    pos = 8 + header_len + 5  # a byte inside the tensor data
    data[pos] ^= 0xFF
    ckpt_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="integrity"):
        load_checkpoint(ckpt_file)


def test_foreign_files_are_refused(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(ValueError, match="not a readable varst-scverse checkpoint"):
        load_checkpoint(text)
    with pytest.raises(ValueError, match="not a readable"):
        TwoStageVARST.load_complete_model(text)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a varst-scverse checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_newer_checkpoint_format_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    save_checkpoint(path, {"a": torch.zeros(1)}, {"version": 99})
    with pytest.raises(ValueError, match="newer varst-scverse"):
        load_checkpoint(path)


def test_coordinate_dropout_one_ignores_coordinates_and_zero_uses_them():
    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "num_heads": 2, "num_layers": 1, "feedforward_dim": 32, "condition_embed_dim": 16}
    vq = {"vocab_size": 32, "embed_dim": 8, "hidden_dim": 16, "gene_mixing_dim": 8, "scales": (1, 2, 4, None)}
    h = torch.randn(5, 6)
    xy, xy2 = torch.rand(5, 2), torch.rand(5, 2)
    for p, same in ((1.0, True), (0.0, False)):
        m = TwoStageVARST(8, vqvae_config=vq, var_config={**cfg, "coordinate_dropout": p}, histology_dim=6).eval()
        c1, c2 = m.condition(h, xy), m.condition(h, xy2)
        assert torch.allclose(c1, c2) is same
    with pytest.raises(ValueError, match="coordinate_dropout"):
        TwoStageVARST(8, vqvae_config=vq, var_config={**cfg, "coordinate_dropout": 1.5}, histology_dim=6)


def test_free_running_aux_decode_trains_what_expected_generation_predicts():
    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "num_heads": 2, "num_layers": 1, "feedforward_dim": 32, "condition_embed_dim": 16}
    vq = {"vocab_size": 32, "embed_dim": 8, "hidden_dim": 16, "gene_mixing_dim": 8, "scales": (1, 2, 4, None)}
    var = {**cfg, "aux_decode_weight": 1.0, "aux_decode_mode": "free", "generate_scales": 3}
    m = TwoStageVARST(8, vqvae_config=vq, var_config=var, histology_dim=6)
    m.stage1_trained = True
    m.set_training_stage(2)
    h, xy = torch.randn(4, 6), torch.rand(4, 2)
    m.eval()
    with torch.no_grad():
        rolled = m.to_caller_order(m.vqvae.decode(m._expected_rollout(m.condition(h, xy))))
    generated = m.generate(h, xy, decode="expected")["expression"][0]
    torch.testing.assert_close(rolled, generated, rtol=1e-5, atol=1e-5)
    m.train()
    out = m.stage2_loss(torch.rand(4, 8), h, xy)
    out["loss"].backward()
    assert out["aux_decode_loss"] > 0 and m.var.blocks[0].qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.vqvae.parameters())  # the tokenizer stays frozen


def test_resampling_matrices_survive_inference_mode():
    """The cached gene pooling/interpolation matrices first built inside inference mode still train afterwards."""
    from varst_scverse.module._quantizer import _resampling_matrix, pool_genes, upsample_genes

    _resampling_matrix.cache_clear()
    x = torch.randn(3, 23, 4)
    with torch.inference_mode():
        pool_genes(x, 5)
        upsample_genes(torch.randn(3, 5, 4), 23)
    w = torch.randn(3, 23, 4, requires_grad=True)
    upsample_genes(pool_genes(w, 5), 23).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    ref = torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), 5).transpose(1, 2)
    torch.testing.assert_close(pool_genes(x, 5), ref)


# --- stage-2 ensembles ---
@pytest.fixture(scope="module")
def ensemble(gen_module) -> TwoStageVARST:
    """Three stage-2 members (random, distinct transformers) on ``gen_module``'s tokenizer."""
    m = _module(seed=9, var={"ensemble_size": 3})
    m.vqvae.load_state_dict(gen_module.vqvae.state_dict())
    m.gene_order.copy_(gen_module.gene_order)
    m.stage1_trained = True
    m.set_training_stage(2)
    return m.eval()


def _single_member(ens: TwoStageVARST, k: int) -> TwoStageVARST:
    """A one-member module holding member ``k`` of ``ens`` (and its tokenizer)."""
    one = _module()
    one.vqvae.load_state_dict(ens.vqvae.state_dict())
    one.gene_order.copy_(ens.gene_order)
    with ens.member(k):
        one.condition.load_state_dict(ens.condition.state_dict())
        one.var.load_state_dict(ens.var.state_dict())
    return one.eval()


def test_ensemble_members_are_distinct_and_the_swap_is_undone(ensemble):
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    assert ensemble.n_members == 3 and ensemble.get_model_info()["ensemble_size"] == 3
    weights = []
    for k in range(3):
        with ensemble.member(k):
            weights.append(next(ensemble.var.parameters()).detach().clone())
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    after = ensemble.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="member must lie in"):
        with ensemble.member(3):
            pass
    with pytest.raises(ValueError, match="ensemble_size"):
        _module(var={"ensemble_size": 0})


def test_ensemble_point_prediction_is_the_members_mean(ensemble):
    hist, xy = _condition(5)
    out = ensemble.generate(hist, xy, decode="expected", return_prefixes=True)
    singles = [
        _single_member(ensemble, k).generate(hist, xy, decode="expected", return_prefixes=True) for k in range(3)
    ]
    mean = torch.stack([s["expression"] for s in singles]).mean(0)
    torch.testing.assert_close(out["expression"], mean)
    torch.testing.assert_close(out["prefix_expression"], torch.stack([s["prefix_expression"] for s in singles]).mean(0))
    assert torch.equal(out["tokens"], singles[0]["tokens"])
    assert not torch.allclose(singles[0]["expression"], mean)  # the members disagree, so the mean is not member 0


def test_ensemble_draws_are_shared_out_among_the_members(ensemble):
    hist, xy = _condition(4)
    greedy = [_single_member(ensemble, k).generate(hist, xy, decode="greedy")["expression"][0] for k in range(3)]

    def owners(n_samples: int, seed: int) -> list[list[int]]:
        # top_k=1 makes each draw its member's greedy decode, so every draw says which member made it
        gen = torch.Generator().manual_seed(seed)
        draws = ensemble.generate(hist, xy, decode="sample", n_samples=n_samples, top_k=1, generator=gen)
        return [[k for k in range(3) if torch.allclose(d, greedy[k])] for d in draws["expression"]]

    for seed in range(3):
        owner = owners(7, seed)
        assert all(len(o) == 1 for o in owner), owner
        counts = sorted(sum(o[0] == k for o in owner) for k in range(3))
        assert counts == [2, 2, 3], counts
    # a single draw does not always come from the first member
    firsts = {owners(1, s)[0][0] for s in range(12)}
    assert len(firsts) > 1


def test_ensemble_checkpoint_round_trip(ensemble, tmp_path):
    path = tmp_path / "ens.safetensors"
    ensemble.save_complete_model(path)
    loaded = TwoStageVARST.load_complete_model(path).eval()
    assert loaded.n_members == 3
    hist, xy = _condition(5)
    torch.testing.assert_close(
        loaded.generate(hist, xy)["expression"], ensemble.generate(hist, xy)["expression"], rtol=0, atol=0
    )


# --- genes pooled into fewer feature-map positions (vqvae_config["gene_positions"]) ---
@pytest.mark.parametrize(("n_genes", "n_pos"), [(10, 4), (32, 8), (7, 7), (33, 32), (5, 1)])
def test_gene_blocks_cover_every_gene_once_in_contiguous_blocks(n_genes, n_pos):
    from varst_scverse.module._vqvae import GeneBlocks

    b = GeneBlocks(n_genes, n_pos)
    real = b.index[b.index < n_genes]
    assert sorted(real.tolist()) == list(range(n_genes))  # every gene in exactly one block
    sizes = (b.index < n_genes).sum(1)
    assert int(sizes.min()) >= 1 and int(sizes.max() - sizes.min()) <= 1  # no empty block, sizes within one
    assert torch.equal(real, torch.arange(n_genes))  # blocks follow the (clustered) gene order
    z = torch.randn(3, n_genes)
    assert torch.equal(b.genes(b.profile(z)), z)
    w = torch.randn(n_genes, 5)
    # a block's features sum its genes' value terms, with each gene's own weights
    enc = b.encode(z, w)
    blocks = b.index.tolist()
    want = torch.stack([sum(z[:, g, None] * w[g] for g in blk if g < n_genes) for blk in blocks], 1)
    assert torch.allclose(enc, want, atol=1e-5)
    x = torch.randn(3, n_pos, 5)
    pos = [next(p for p, blk in enumerate(blocks) if g in blk) for g in range(n_genes)]
    assert torch.allclose(b.read_out(x, w), (x[:, pos] * w).sum(-1), atol=1e-5)
    with pytest.raises(ValueError, match="num_positions"):
        GeneBlocks(4, 5)


def test_gene_positions_shrinks_the_feature_map_and_the_tokens():
    m = _module(vq={"gene_positions": 16})
    assert m.num_positions == 16 and m.scales == (1, 4, 8, 16)
    assert m.n_tokens == 1 + 4 + 8 + 16 and m.get_model_info()["num_positions"] == 16
    y = _expression(5)
    feats = m.vqvae.encode(m.to_model_order(y))
    assert feats.shape == (5, 16, VQ["embed_dim"])
    out = m.vqvae(y)
    assert out["reconstruction"].shape == (5, G) and torch.isfinite(out["loss"])
    assert m.tokenize(y).shape == (5, m.n_tokens)
    # at least as many positions as genes: exactly the one-position-per-gene model
    same, base = _module(vq={"gene_positions": 10 * G}), _module()
    assert same.num_positions == G and same.scales == base.scales
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), base.state_dict().values(), strict=True))


def test_pooled_tokenizer_still_reads_every_gene_out_on_its_own():
    """Genes that share a position but vary independently are each reconstructed (per-gene weights both ways)."""
    from varst_scverse.module._vqvae import GeneDecoder, GeneEncoder

    torch.manual_seed(0)
    enc, dec = GeneEncoder(G, 16, 32, 1, 16, num_positions=8), GeneDecoder(G, 16, 1, 16, num_positions=8)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    z = torch.randn(256, G)
    for _ in range(300):
        loss = ((dec(enc(z)) - z) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    zt = torch.randn(128, G)
    with torch.no_grad():
        rec = dec(enc(zt))
    r = torch.stack([torch.corrcoef(torch.stack([rec[:, g], zt[:, g]]))[0, 1] for g in range(G)])
    assert float(r.min()) > 0.9, r  # 4 independent genes per position, each recovered


def test_gene_positions_is_validated_and_named_in_scale_errors():
    for bad in (0, -3, True, 2.5, "64"):
        with pytest.raises(ValueError, match="gene_positions"):
            resolve_configs("cpu", {"gene_positions": bad}, None)
    with pytest.raises(ValueError, match=r"pools the 32 genes into only 6; raise gene_positions to at least 8"):
        _module(vq={"gene_positions": 6})
    with pytest.raises(ValueError, match=r"feature map of 8 positions \(vqvae_config\[.gene_positions.\]\)"):
        _module(vq={"gene_positions": 8})


def test_gene_positions_checkpoint_round_trip(tmp_path):
    m = _module(vq={"gene_positions": 16}).eval()
    path = tmp_path / "m.safetensors"
    m.save_complete_model(path)
    loaded = TwoStageVARST.load_complete_model(path).eval()
    assert loaded.num_positions == 16
    y = _expression(6)
    assert torch.equal(loaded.tokenize(y), m.tokenize(y))
    assert torch.allclose(loaded.reconstruct(y), m.reconstruct(y))
    m.save_stage_checkpoint(tmp_path / "s1.safetensors", stage=1)
    with pytest.raises(ValueError, match="gene_positions"):
        _module(vq={"gene_positions": 12}).load_stage1(tmp_path / "s1.safetensors")
