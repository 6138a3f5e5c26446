"""Unit tests for models/gpt.py (CPU, fast)."""

import dataclasses
import typing

import pytest
import torch
import torch.utils.checkpoint

from models import GPT, GPTConfig, estimate_flops_per_token, estimate_num_params

GPT2_VARIANT = dict(
    vocab_size=97,
    block_size=32,
    n_layer=2,
    n_head=4,
    d_model=64,
    pos_embedding="learned",
    norm="layernorm",
    mlp="gelu",
    bias=True,
)
LLAMA_VARIANT = dict(
    vocab_size=97,
    block_size=32,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    d_model=64,
    pos_embedding="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
)
VARIANTS = pytest.mark.parametrize("kwargs", [GPT2_VARIANT, LLAMA_VARIANT], ids=["gpt2", "llama"])


def make(seed: int = 0, **kwargs) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**kwargs))


def tokens(B: int, T: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


# --- shapes -----------------------------------------------------------------------------


@VARIANTS
def test_forward_shapes_and_loss(kwargs):
    model = make(**kwargs)
    idx = tokens(3, 17)
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 97)
    assert loss is None
    logits, loss = model(idx, tokens(3, 17, seed=2))
    assert logits.shape == (3, 17, 97)
    assert loss.shape == () and loss.dtype == torch.float32
    # near-uniform predictions at init: loss close to ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_loss_ignores_minus_one_targets():
    model = make(**GPT2_VARIANT)
    idx, targets = tokens(2, 8), tokens(2, 8, seed=2)
    logits, _ = model(idx)
    masked = targets.clone()
    masked[:, 4:] = -1
    _, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :4].reshape(-1, 97), targets[:, :4].reshape(-1)
    )
    torch.testing.assert_close(loss, expected)


def test_sequence_longer_than_block_size_raises():
    model = make(**GPT2_VARIANT)
    with pytest.raises(ValueError, match=r"sequence length \(33\).*block_size \(32\)"):
        model(tokens(1, 33))


def test_module_names():
    names = dict(make(**LLAMA_VARIANT).named_parameters())
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"blocks.0.attn.{n}.weight" in names
    for n in ("gate", "up", "down"):
        assert f"blocks.1.mlp.{n}.weight" in names
    assert {"wte.weight", "ln_f.weight", "lm_head.weight"} <= names.keys()
    assert "wpe.weight" not in names
    assert "wpe.weight" in dict(make(**GPT2_VARIANT).named_parameters())
    # RoPE tables are non-persistent buffers: not in the state dict
    assert not any("rotary" in k for k in make(**LLAMA_VARIANT).state_dict())


# --- causality ---------------------------------------------------------------------------


@VARIANTS
def test_causality(kwargs):
    model = make(**kwargs).eval()
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-4)


# --- parameter counting and FLOPs ------------------------------------------------------


def gpt2_124m() -> GPTConfig:
    return GPTConfig(
        name="gpt2",
        vocab_size=50257,
        block_size=1024,
        n_layer=12,
        n_head=12,
        d_model=768,
        pos_embedding="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
    )


def test_gpt2_124m_param_count():
    cfg = gpt2_124m()
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.num_params()
    assert abs(n - 124e6) / 124e6 < 0.01
    assert n == 124_439_808  # the well-known GPT-2 small count (tied lm_head)
    assert estimate_num_params(cfg) == n
    assert model.num_params(non_embedding=True) == n - 50257 * 768 - 1024 * 768


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"bias": False},
        {"norm": "rmsnorm"},
        {"d_ff": 200},
        dict(LLAMA_VARIANT),
        {**LLAMA_VARIANT, "n_kv_head": 1, "bias": True, "tie_embeddings": True},
    ],
)
def test_estimates_match_module(overrides):
    cfg = GPTConfig(**{**GPT2_VARIANT, **overrides})
    with torch.device("meta"):
        model = GPT(cfg)
    assert estimate_num_params(cfg) == model.num_params()
    assert estimate_flops_per_token(cfg, 32) == model.flops_per_token(32)
    # definition: 6 * (matmul params incl. lm_head, excl. lookup tables) + attention term
    matmul_params = model.num_params(non_embedding=True)
    if cfg.tie_embeddings:
        matmul_params += cfg.vocab_size * cfg.d_model  # tied wte doubles as lm_head
    attn = 12 * cfg.n_layer * cfg.d_model * 32
    assert model.flops_per_token(32) == 6 * matmul_params + attn


def test_gpt2_flops_per_token():
    cfg = gpt2_124m()
    n_matmul = 124_439_808 - 1024 * 768  # everything except wpe; tied wte counted as lm_head
    assert estimate_flops_per_token(cfg, 1024) == 6 * n_matmul + 12 * 12 * 768 * 1024


def test_ffn_dim_defaults():
    assert GPTConfig(d_model=256, mlp="gelu").ffn_dim == 1024
    assert GPTConfig(d_model=256, mlp="swiglu").ffn_dim == 704  # int(682.67) -> 704
    assert (
        GPTConfig(d_model=4096, n_head=32, mlp="swiglu").ffn_dim == 10944
    )  # int(10922.67) -> 10944
    assert GPTConfig(d_model=256, mlp="swiglu", d_ff=500).ffn_dim == 500
    cfg = GPTConfig(d_model=256, n_head=8, n_kv_head=2)
    assert (cfg.head_dim, cfg.kv_heads) == (32, 2)
    assert GPTConfig(n_head=8).kv_heads == 8


# --- training ----------------------------------------------------------------------------


@VARIANTS
def test_loss_falls(kwargs):
    model = make(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = tokens(1, 17).repeat(4, 1)
    x, y = seq[:, :-1], seq[:, 1:]
    model.train()
    _, first = model(x, y)
    for _ in range(50):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _, last = model(x, y)
    assert last.item() < 0.5 * first.item()


@VARIANTS
def test_activation_checkpointing_identical(kwargs, monkeypatch):
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def spy(*args, **kw):
        calls.append(kw.get("use_reentrant"))
        return real_checkpoint(*args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)

    results = []
    for ckpt in (False, True):
        model = make(seed=3, activation_checkpointing=ckpt, **kwargs).train()
        _, loss = model(tokens(2, 16), tokens(2, 16, seed=2))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))

    assert calls == [False] * kwargs["n_layer"]  # one non-reentrant checkpoint per block
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_activation_checkpointing_off_in_eval(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1))
    model = make(activation_checkpointing=True, **GPT2_VARIANT).eval()
    model(tokens(1, 8))
    with torch.no_grad():
        model.train()(tokens(1, 8))
    assert calls == []


def test_init_deterministic_and_scaled():
    a, b = make(seed=5, **GPT2_VARIANT), make(seed=5, **GPT2_VARIANT)
    c = make(seed=6, **GPT2_VARIANT)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert not torch.equal(a.wte.weight, c.wte.weight)

    cfg = GPTConfig(vocab_size=512, d_model=256, n_head=4, n_layer=8, init_std=0.02)
    torch.manual_seed(0)
    m = GPT(cfg)
    resid_std = 0.02 / (2 * 8) ** 0.5
    assert abs(m.blocks[0].attn.o_proj.weight.std().item() - resid_std) < 0.1 * resid_std
    assert abs(m.blocks[0].mlp.down.weight.std().item() - resid_std) < 0.1 * resid_std
    assert abs(m.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(m.wte.weight.std().item() - 0.02) < 0.002
    assert torch.all(m.blocks[0].attn.q_proj.bias == 0)
    assert torch.all(m.blocks[0].ln_1.weight == 1) and torch.all(m.blocks[0].ln_1.bias == 0)


# --- grouped-query attention -------------------------------------------------------------


def test_gqa_full_kv_heads_is_mha():
    mha = make(**{**LLAMA_VARIANT, "n_kv_head": None})
    full = make(**{**LLAMA_VARIANT, "n_kv_head": 4})
    shapes = {n: p.shape for n, p in mha.named_parameters()}
    assert shapes == {n: p.shape for n, p in full.named_parameters()}
    for n, p in full.state_dict().items():  # same seed, same shapes -> same model
        assert torch.equal(p, mha.state_dict()[n]), n
    idx = tokens(2, 12)
    assert torch.equal(mha(idx)[0], full(idx)[0])

    gqa = make(**{**LLAMA_VARIANT, "n_kv_head": 2})
    head_dim = 64 // 4
    assert gqa.blocks[0].attn.k_proj.weight.shape == (2 * head_dim, 64)
    assert gqa.blocks[0].attn.v_proj.weight.shape == (2 * head_dim, 64)
    assert gqa.blocks[0].attn.q_proj.weight.shape == (4 * head_dim, 64)
    assert gqa.num_params() == mha.num_params() - 2 * 2 * (4 - 2) * head_dim * 64


@pytest.mark.parametrize("kwargs", [LLAMA_VARIANT, {**GPT2_VARIANT, "n_kv_head": 2}])
def test_gqa_matches_mha_with_repeated_kv_heads(kwargs):
    """GQA == MHA whose k/v heads are copies: kv head j serves query heads j*rep..(j+1)*rep-1."""
    gqa = make(**kwargs).eval()
    mha = make(**{**kwargs, "n_kv_head": None}).eval()
    rep, head_dim = 4 // 2, 64 // 4
    state = {}
    for name, p in gqa.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:
            p = p.view(2, head_dim, *p.shape[1:]).repeat_interleave(rep, dim=0)
            p = p.reshape(4 * head_dim, *p.shape[2:])
        state[name] = p
    mha.load_state_dict(state)
    idx = tokens(2, 12)
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)


# --- RoPE --------------------------------------------------------------------------------


def test_rope_is_relative():
    """With RoPE, q.k depends only on the distance between positions."""
    from models.gpt import RotaryEmbedding

    rope = RotaryEmbedding(head_dim=16, max_len=64, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q1, k1 = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(i: int, j: int) -> float:
        q = torch.zeros(1, 1, 64, 16)
        k = torch.zeros(1, 1, 64, 16)
        q[:, :, i], k[:, :, j] = q1[:, :, 0], k1[:, :, 0]
        q, k = rope(q, k)
        return (q[0, 0, i] @ k[0, 0, j]).item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    assert score(3, 3) == pytest.approx((q1 @ k1.transpose(-1, -2)).item(), abs=1e-5)


# --- generation --------------------------------------------------------------------------


@VARIANTS
def test_generate(kwargs):
    model = make(**kwargs).eval()
    idx = tokens(2, 5)
    out = model.generate(idx, max_new_tokens=40, temperature=0.0)  # crosses block_size 32
    assert out.shape == (2, 45) and out.dtype == torch.long
    assert torch.equal(out[:, :5], idx)
    assert torch.equal(out, model.generate(idx, max_new_tokens=40, temperature=0.0))
    # greedy: first new token is the argmax of the prompt's last logits
    logits, _ = model(idx)
    assert torch.equal(out[:, 5], logits[:, -1].argmax(-1))

    torch.manual_seed(0)
    sampled = model.generate(idx, max_new_tokens=8, temperature=1.0, top_k=1)
    assert torch.equal(sampled, out[:, :13])  # top_k=1 sampling is greedy
    sampled = model.generate(idx, max_new_tokens=8, temperature=0.8, top_k=10)
    assert sampled.shape == (2, 13) and int(sampled.max()) < 97


# --- tied embeddings ---------------------------------------------------------------------


def test_tied_and_untied_embeddings():
    tied = make(**GPT2_VARIANT)
    assert tied.lm_head.weight is tied.wte.weight
    assert sum(1 for p in tied.parameters() if p is tied.wte.weight) == 1

    untied = make(**{**GPT2_VARIANT, "tie_embeddings": False})
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() == tied.num_params() + 97 * 64


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"d_model": 250, "n_head": 4}, r"d_model \(250\) must be divisible by n_head \(4\)"),
        ({"n_head": 8, "n_kv_head": 3}, r"n_head \(8\) must be divisible by n_kv_head \(3\)"),
        ({"n_head": 8, "n_kv_head": 16}, r"n_head \(8\) must be divisible by n_kv_head \(16\)"),
        (
            {"pos_embedding": "abs"},
            r"pos_embedding \('abs'\) must be one of 'learned', 'rope'",
        ),
        ({"norm": "batchnorm"}, r"norm \('batchnorm'\) must be one of 'layernorm', 'rmsnorm'"),
        ({"mlp": "relu"}, r"mlp \('relu'\) must be one of 'gelu', 'swiglu'"),
        ({"vocab_size": 0}, r"vocab_size \(0\) must be positive"),
        ({"block_size": -1}, r"block_size \(-1\) must be positive"),
        ({"n_layer": 0}, r"n_layer \(0\) must be positive"),
        ({"n_head": 0}, r"n_head \(0\) must be positive"),
        ({"d_model": 0}, r"d_model \(0\) must be positive"),
        ({"n_kv_head": 0}, r"n_kv_head \(0\) must be positive"),
        ({"d_ff": -4}, r"d_ff \(-4\) must be positive"),
        ({"norm_eps": 0.0}, r"norm_eps \(0.0\) must be positive"),
        ({"init_std": -0.02}, r"init_std \(-0.02\) must be positive"),
        ({"rope_theta": 0.0}, r"rope_theta \(0.0\) must be positive"),
        ({"dropout": 1.0}, r"dropout \(1.0\) must satisfy 0 <= dropout < 1"),
        ({"dropout": -0.1}, r"dropout \(-0.1\) must satisfy 0 <= dropout < 1"),
        (
            {"d_model": 36, "n_head": 4, "pos_embedding": "rope"},
            r"head_dim \(9 .*must be even for pos_embedding 'rope'",
        ),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        GPTConfig(**overrides)
    assert "\n" not in str(info.value)


def test_config_valid_edge_cases_and_frozen():
    GPTConfig(d_model=36, n_head=4, pos_embedding="learned")  # odd head_dim fine without rope
    GPTConfig(dropout=0.0)
    GPTConfig(n_kv_head=1)
    cfg = GPTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        GPTConfig(256)  # type: ignore[misc]  # keyword-only
    assert dataclasses.replace(cfg, n_layer=3).n_layer == 3


def test_config_field_types():
    """OmegaConf structured configs accept only these; optionals must be typing.Optional[...]
    (origin typing.Union), not PEP 604 `int | None` (origin types.UnionType)."""
    optional = {}
    for f in dataclasses.fields(GPTConfig):
        if typing.get_origin(f.type) is typing.Union:
            args = typing.get_args(f.type)
            assert len(args) == 2 and args[1] is type(None), f.name
            optional[f.name] = args[0]
        else:
            assert f.type in (str, int, float, bool), (f.name, f.type)
    assert optional == {"n_kv_head": int, "d_ff": int, "init_from": str}


# --- reference implementations (Hugging Face) ----------------------------------------------


def _detached(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _randomize(model: GPT) -> GPT:
    """Large random weights (incl. norm gains/biases) so small numeric differences show up."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_matches_hf_llama():
    """RoPE (rotate-half), RMSNorm, SwiGLU and GQA match LlamaForCausalLM numerically."""
    transformers = pytest.importorskip("transformers")
    kwargs = {**LLAMA_VARIANT, "rope_theta": 500.0}
    model = _randomize(make(**kwargs)).eval()
    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {
        "model.embed_tokens.weight": model.wte.weight,
        "model.norm.weight": model.ln_f.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.ln_1.weight
        sd[p + "post_attention_layernorm.weight"] = block.ln_2.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = getattr(block.attn, n).weight
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            sd[p + f"mlp.{theirs}.weight"] = getattr(block.mlp, ours).weight
    result = hf.load_state_dict(_detached(sd), strict=False)  # HF may hold extra rope buffers
    assert result.missing_keys == [] and result.unexpected_keys == []
    idx = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_matches_hf_gpt2():
    """Learned positions, LayerNorm, tanh-GELU and tied head match GPT2LMHeadModel."""
    transformers = pytest.importorskip("transformers")
    model = _randomize(make(**GPT2_VARIANT)).eval()
    cfg = model.config
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.ffn_dim,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    sd = {
        "transformer.wte.weight": model.wte.weight,
        "transformer.wpe.weight": model.wpe.weight,
        "transformer.ln_f.weight": model.ln_f.weight,
        "transformer.ln_f.bias": model.ln_f.bias,
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        a, m = block.attn, block.mlp
        for ln in ("ln_1", "ln_2"):
            sd[p + f"{ln}.weight"] = getattr(block, ln).weight
            sd[p + f"{ln}.bias"] = getattr(block, ln).bias
        # HF GPT-2 uses Conv1D (weight is (in, out)) and a fused qkv projection
        sd[p + "attn.c_attn.weight"] = torch.cat(
            [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        ).T
        sd[p + "attn.c_attn.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[p + "attn.c_proj.weight"] = a.o_proj.weight.T
        sd[p + "attn.c_proj.bias"] = a.o_proj.bias
        sd[p + "mlp.c_fc.weight"] = m.up.weight.T
        sd[p + "mlp.c_fc.bias"] = m.up.bias
        sd[p + "mlp.c_proj.weight"] = m.down.weight.T
        sd[p + "mlp.c_proj.bias"] = m.down.bias
    result = hf.load_state_dict(_detached(sd), strict=False)
    assert not result.missing_keys or all("lm_head" in k for k in result.missing_keys)
    hf.tie_weights()
    idx = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-4, atol=1e-4)
