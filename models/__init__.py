from models.gpt import GPT, GPTConfig, estimate_flops_per_token, estimate_num_params

__all__ = ["GPT", "GPTConfig", "estimate_flops_per_token", "estimate_num_params"]
