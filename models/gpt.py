"""A GPT language model in one file, in the spirit of nanoGPT's model.py.

Supports two families from the same code:
  * GPT-2 style: learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
  * Llama style: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.

Module names (wte, wpe, blocks.{i}.attn.q_proj, ..., lm_head) are part of the interface:
tensor parallelism and the Hugging Face export match on them.

Shape legend: B batch, T sequence length, C d_model, H query heads, KV key/value heads,
D head_dim, F ffn_dim, V vocab_size.
"""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from models.config import GPTConfig, shape_of  # noqa: F401  (re-exported)
from models.loss import chunked_head_cross_entropy

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """Root-mean-square norm (weight only), computed in fp32 like Llama's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension (HF Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE cos/sin tables; no parameters, buffers are not saved in state_dict."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_len, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, D)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (B, H, T, D), k: (B, KV, T, D)
        T = q.size(-2)
        cos = self.cos[:T].to(q.dtype)  # (T, D)
        sin = self.sin[:T].to(q.dtype)  # (T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        q_dim = config.n_head * config.head_dim
        kv_dim = config.kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, q_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.o_proj = nn.Linear(q_dim, config.d_model, bias=config.bias)
        self.o_proj.residual_proj = True  # scaled init (GPT.init_module_weights)
        self.resid_drop = nn.Dropout(config.dropout)
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.block_size, config.rope_theta)
            if config.pos_embedding == "rope"
            else None
        )
        # Sequence parallelism's hook, set from outside (trainer/worker/parallel.py apply_sp):
        # an object whose heads_to_sequence / sequence_to_heads exchange heads for sequence.
        self.sequence_parallel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()  # (B, T, C)
        # Head counts are read off the projections (-1), so a tensor-parallel shard that holds
        # a subset of the heads runs the same code.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, KV, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)  # (B, T, KV, D)
        if self.sequence_parallel is not None:  # Ulysses: this T-slice's heads -> H/N heads, all T
            q, k, v = (self.sequence_parallel.heads_to_sequence(t) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D), (B, KV, T, D) x 2
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        # grouped-query (KV < H): kv head j serves query heads j*H/KV .. (j+1)*H/KV-1, read
        # by SDPA in place (enable_gqa) rather than copied H/KV times
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.size(1) != q.size(1),
        )  # (B, H, T, D)
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.sequence_parallel is not None:  # back: all H heads of this rank's T-slice
            y = self.sequence_parallel.sequence_to_heads(y)
        y = y.contiguous().view(B, T, -1)  # (B, T, H*D)
        return self.resid_drop(self.o_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        d, f = config.d_model, config.ffn_dim
        if self.kind == "swiglu":
            self.gate = nn.Linear(d, f, bias=config.bias)
        self.up = nn.Linear(d, f, bias=config.bias)
        approximate = config.gelu_approximate
        self.act = nn.SiLU() if self.kind == "swiglu" else nn.GELU(approximate=approximate)
        self.down = nn.Linear(f, d, bias=config.bias)
        self.down.residual_proj = True  # scaled init (GPT.init_module_weights)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C)
        if self.kind == "swiglu":
            h = self.act(self.gate(x)) * self.up(x)  # (B, T, F)
        else:
            h = self.act(self.up(x))  # (B, T, F)
        return self.drop(self.down(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # Tokens per chunk of the loss (models/loss.py); 0: the loss of the whole logits, which
        # forward returns. A training run sets it from outside (trainer.loss_chunk_tokens).
        self.loss_chunk = 0
        # Sequence parallelism's hook (apply_sp): idx is slice `.rank` of the whole sequence.
        self.sequence_parallel = None

        self.apply(self.init_module_weights)

    def init_module_weights(
        self, module: nn.Module, generator: torch.Generator | None = None
    ) -> None:
        """GPT-2 init of one module's own parameters (children untouched), so a caller can
        run it module by module, e.g. on gathered ZeRO-3 shards. Residual projections
        (flagged `residual_proj`) shrink with depth: std / sqrt(2 * n_layer)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_proj", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights count once. non_embedding subtracts wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if hasattr(self, "wpe"):
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward); see estimate_flops_per_token."""
        return estimate_flops_per_token(self.config, seq_len)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        B, T = idx.size()  # (B, T)
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length ({T}) must be <= block_size ({self.config.block_size})"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.config.pos_embedding == "learned":
            start = self.sequence_parallel.rank * T if self.sequence_parallel is not None else 0
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.wpe(pos)  # (B, T, C)
        x = self.drop(x)
        checkpointing = (  # "auto" is a training run's, applied from outside
            self.config.activation_checkpointing is True
            and self.training
            and torch.is_grad_enabled()
        )
        for block in self.blocks:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        if targets is not None and self.loss_chunk:
            # head + loss a chunk of tokens at a time: no (B, T, V) logits, so none returned
            return None, chunked_head_cross_entropy(self.lm_head, x, targets, self.loss_chunk)
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # (B, <=block_size)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0.0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
        return idx


# -----------------------------------------------------------------------------
# Size and cost from the config alone (no module construction; fine for huge models)


def _norm_params(config: GPTConfig) -> int:
    if config.norm == "layernorm" and config.bias:
        return 2 * config.d_model
    return config.d_model


def _linear_params(d_in: int, d_out: int, bias: bool) -> int:
    return d_in * d_out + (d_out if bias else 0)


def estimate_num_params(config: GPTConfig) -> int:
    """Exactly GPT(config).num_params() (tied weights counted once)."""
    d, f, b = config.d_model, config.ffn_dim, config.bias
    q_dim = config.n_head * config.head_dim
    kv_dim = config.kv_heads * config.head_dim
    attn = (
        _linear_params(d, q_dim, b) + 2 * _linear_params(d, kv_dim, b) + _linear_params(q_dim, d, b)
    )
    n_in = 2 if config.mlp == "swiglu" else 1
    mlp = n_in * _linear_params(d, f, b) + _linear_params(f, d, b)
    block = 2 * _norm_params(config) + attn + mlp

    n = config.vocab_size * d  # wte
    if config.pos_embedding == "learned":
        n += config.block_size * d  # wpe
    n += config.n_layer * block
    n += _norm_params(config)  # ln_f
    if not config.tie_embeddings:
        n += config.vocab_size * d  # lm_head
    return n


def estimate_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM / nanoGPT style.

    6 * N + 12 * n_layer * d_model * seq_len, where N counts every parameter a token is
    multiplied through: all block parameters, ln_f and the lm_head matrix (vocab x d_model,
    counted even when tied to wte), but not the wte/wpe lookup tables. That is
    N = num_params() - wpe, minus wte when it is untied from lm_head. Norm gains and biases
    are included at 6 FLOPs each (negligible). The second term is the QK^T and AV matmuls,
    forward + backward, with the full (non-causal) seq_len as in PaLM.
    """
    n = estimate_num_params(config)
    if config.pos_embedding == "learned":
        n -= config.block_size * config.d_model  # wpe: a lookup, no matmul
    if not config.tie_embeddings:
        n -= config.vocab_size * config.d_model  # wte: a lookup; lm_head counted separately
    return float(6 * n + 12 * config.n_layer * config.d_model * seq_len)
