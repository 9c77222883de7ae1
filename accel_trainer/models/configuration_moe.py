"""Configuration of the decoder-only mixture-of-experts language model."""

from __future__ import annotations

from transformers import PretrainedConfig


# Keys that change tensor shapes or which tensors exist: a checkpoint only resumes into the same values.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                     "shared_expert_intermediate_size", "tie_word_embeddings")


class MoEConfig(PretrainedConfig):
    """Hyperparameters of :class:`MoEForCausalLM`; saved as ``config.json`` next to the weights.

    Every layer has grouped-query attention with RoPE and a mixture-of-experts feed-forward block
    (``num_experts`` SwiGLU experts, ``num_experts_per_tok`` of them chosen per token by a softmax
    router, plus an optional always-on shared expert).

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention); must divide the query heads.
        head_dim: width of one head; defaults to ``hidden_size // num_attention_heads``.
        moe_intermediate_size: hidden width of one routed expert.
        num_experts: routed experts per layer.
        num_experts_per_tok: experts each token is sent to (top-k).
        shared_expert_intermediate_size: hidden width of the shared expert; 0 disables it.
        max_position_embeddings: longest sequence the model is meant for.
        rope_theta: RoPE base frequency.
        rms_norm_eps: epsilon of every RMSNorm.
        router_aux_loss_coef: weight of the load-balancing loss added to the LM loss.
        norm_topk_prob: renormalise the k routing weights of a token to sum to one.
        initializer_range: std of the normal init of weight matrices.
    """

    model_type = "accel_moe"
    keys_to_ignore_at_inference = ["aux_loss"]
    architecture_keys = ARCHITECTURE_KEYS  # what a resume refuses to change

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        moe_intermediate_size: int = 128,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        shared_expert_intermediate_size: int = 0,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        router_aux_loss_coef: float = 0.01,
        norm_topk_prob: bool = True,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.router_aux_loss_coef = router_aux_loss_coef
        self.norm_topk_prob = norm_topk_prob
        self.initializer_range = initializer_range
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self) -> None:
        problems = []
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "moe_intermediate_size", "num_experts",
                    "num_experts_per_tok", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{key}={value!r} must be a positive integer")
        if not problems:
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                    f"num_key_value_heads={self.num_key_value_heads}")
            if self.num_experts_per_tok > self.num_experts:
                problems.append(
                    f"num_experts_per_tok={self.num_experts_per_tok} cannot exceed num_experts={self.num_experts}")
            if self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.shared_expert_intermediate_size < 0:
            problems.append(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} must be >= 0")
        if problems:
            raise ValueError("Invalid MoEConfig: " + "; ".join(problems))
