"""Specification of the GPT model: shapes, init, causality, determinism, tying, training."""

import math

import pytest
import torch

from diloco.errors import ConfigError
from diloco.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)


def make_model(seed: int = 0, config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def random_batch(B: int = 4, T: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CONFIG.vocab_size, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_forward_returns_logits_of_shape_B_T_V_and_a_scalar_loss():
    x, y = random_batch(B=3, T=17)
    logits, loss = make_model()(x, y)
    assert logits.shape == (3, 17, CONFIG.vocab_size)
    assert loss.shape == ()


def test_forward_without_targets_returns_no_loss():
    x, _ = random_batch()
    _, loss = make_model()(x)
    assert loss is None


def test_loss_at_init_is_close_to_uniform_ln_vocab():
    x, y = random_batch(B=8)
    _, loss = make_model()(x, y)
    assert abs(loss.item() - math.log(256)) < 0.3


def test_sequence_longer_than_block_size_is_rejected():
    x = torch.zeros(1, CONFIG.block_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size 32"):
        make_model()(x)


def test_n_embd_not_divisible_by_n_head_is_a_config_error():
    with pytest.raises(ConfigError, match="n_embd=66 is not divisible by model.n_head=4"):
        GPTConfig(n_embd=66, n_head=4)


def test_attention_is_causal_changing_token_t_leaves_earlier_logits_unchanged():
    model = make_model()
    x, _ = random_batch(B=2)
    t = 10
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % CONFIG.vocab_size
    with torch.no_grad():
        before, after = model(x)[0], model(x2)[0]
    torch.testing.assert_close(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t], after[:, t])


def test_construction_is_deterministic_under_manual_seed():
    a, b, c = make_model(seed=0), make_model(seed=0), make_model(seed=1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_lm_head_is_tied_to_token_embedding():
    model = make_model()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_residual_projections_use_the_depth_scaled_init():
    config = GPTConfig(n_layer=8, n_embd=256, n_head=4)
    model = make_model(config=config)
    std = model.blocks[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert model.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_num_params_counts_the_tied_weight_once():
    model = make_model()
    C, V, L, T = CONFIG.n_embd, CONFIG.vocab_size, CONFIG.n_layer, CONFIG.block_size
    per_block = 2 * C + 3 * C * C + C * C + 4 * C * C + 4 * C * C  # 2 LN gains + attn + mlp
    expected = V * C + T * C + L * per_block + C  # wte (= lm_head), wpe, blocks, ln_f
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - T * C


def test_state_dict_round_trip_reproduces_logits_and_keeps_weights_tied():
    source, target = make_model(seed=0), make_model(seed=1)
    state = source.state_dict()
    assert {"wte.weight", "lm_head.weight"} <= state.keys()
    target.load_state_dict(state)
    x, _ = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(target(x)[0], source(x)[0], rtol=0, atol=0)
    assert target.lm_head.weight is target.wte.weight


def test_a_few_adamw_steps_on_a_fixed_batch_reduce_the_loss():
    model = make_model().train()
    x, y = random_batch(B=4, T=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_loss_is_computed_in_fp32_from_bf16_parameters():
    """With bf16 parameters (what FSDP2's mixed-precision policy gives the forward) the logits
    are bf16 and the loss is still the fp32 cross-entropy of the logits widened to fp32, as
    under autocast."""
    x, y = random_batch()
    logits, loss = make_model().to(torch.bfloat16)(x, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    flat = logits.float().view(-1, CONFIG.vocab_size)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(flat, y.reshape(-1)))


def test_loss_of_fp64_parameters_stays_fp64():
    """An fp64 run (``topology.mixed_precision: fp64``) computes the loss in fp64: widening to
    at least fp32 never narrows."""
    x, y = random_batch()
    logits, loss = make_model().to(torch.float64)(x, y)
    assert logits.dtype == loss.dtype == torch.float64
    flat = logits.view(-1, CONFIG.vocab_size)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(flat, y.reshape(-1)))
