"""model.gelu_approximate: exact GELU (nanoGPT's nn.GELU()) besides GPT-2's tanh form, mapped
to Hugging Face's activation_function both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import GPT, GPTConfig
from models.gpt import shape_of
from models.hf import config_from_hf, hf_config
from trainer.export import write_model_dir

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=64)


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, **kw)).eval()


def test_exact_and_tanh_gelu_differ_and_exact_is_torch_default():
    exact, tanh = _model(gelu_approximate="none"), _model(gelu_approximate="tanh")
    tanh.load_state_dict(exact.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    assert not torch.allclose(exact(idx)[0], tanh(idx)[0], atol=1e-7)
    act = exact.blocks[0].mlp.act
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(act(x), torch.nn.GELU()(x))  # erf form


def test_an_unknown_approximation_is_refused():
    with pytest.raises(
        ValueError, match=r"gelu_approximate \('fast'\) must be one of 'tanh', 'none'"
    ):
        GPTConfig(**TINY, gelu_approximate="fast")


@pytest.mark.parametrize("approx, hf_name", [("tanh", "gelu_new"), ("none", "gelu")])
def test_hf_activation_function_maps_both_ways(approx, hf_name):
    cfg = GPTConfig(**TINY, gelu_approximate=approx)
    hf = hf_config(cfg)
    assert hf["activation_function"] == hf_name
    back = config_from_hf(hf)
    assert back.gelu_approximate == approx
    assert shape_of(back) == shape_of(cfg)
    other = dataclasses.replace(cfg, gelu_approximate="none" if approx == "tanh" else "tanh")
    assert shape_of(other) != shape_of(cfg)  # a resume or init_from across them is refused


def test_transformers_runs_the_exact_gelu_export_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model(gelu_approximate="none")
    write_model_dir(tmp_path, model.config, model.state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
