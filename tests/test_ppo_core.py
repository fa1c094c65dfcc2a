"""Tests for rlhfkit.core: hand-computed toys (derivations in comments) plus reference tests.

Most toys use a batch of 2 with T = 3 where the second row has length 2 and its padded
position holds garbage (NaN / inf / huge numbers), to prove that masked positions are
ignored, in values and in gradients.
"""

import json
import math

import pytest
import torch

from rlhfkit.core import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    approx_kl,
    compute_gae,
    ensemble_reward,
    entropy_from_logits,
    first_true_indices,
    kl_per_token,
    logprobs_from_logits,
    mask_after_eos,
    masked_mean,
    masked_var,
    policy_loss,
    critic_free_advantages,
    grpo_advantages,
    kl_penalty_loss,
    loss_weight,
    rewards_with_kl,
    rloo_advantages,
    sequence_policy_loss,
    shaped_scores,
    value_loss,
    whiten,
)

NAN = float("nan")
INF = float("inf")
# batch of 2, T = 3; row 0 has length 3, row 1 has length 2
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def close(actual, expected, atol=1e-4):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def random_prefix_mask(B, T, gen, allow_empty=True):
    lengths = torch.randint(0 if allow_empty else 1, T + 1, (B,), generator=gen)
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


# --------------------------------------------------------------------------- masked stats
def test_masked_mean_is_global_token_mean_and_ignores_garbage():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    # global: (1+2+3+4+5)/5 = 3.0   (a mean of row means would be (2 + 4.5)/2 = 3.25)
    close(masked_mean(x, MASK), 3.0)
    # per row: [6/3, 9/2] = [2.0, 4.5]
    close(masked_mean(x, MASK, dim=1), [2.0, 4.5])
    # per column: [(1+4)/2, (2+5)/2, 3/1]
    close(masked_mean(x, MASK, dim=0), [2.5, 3.5, 3.0])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_masked_mean_accepts_bool_int_float_masks(mask_dtype):
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1e30]])
    close(masked_mean(x, MASK.to(mask_dtype)), 3.0)


def test_masked_mean_empty_mask_gives_zero_not_nan():
    x = torch.tensor([[1.0, NAN], [3.0, 4.0]])
    empty = torch.zeros(2, 2, dtype=torch.bool)
    close(masked_mean(x, empty), 0.0)
    # one empty row with dim=1: that row's mean is 0
    close(masked_mean(x, torch.tensor([[0, 0], [1, 1]]), dim=1), [0.0, 3.5])


def test_masked_mean_rejects_broadcast_mask():
    with pytest.raises(ValueError):
        masked_mean(torch.zeros(2, 3), torch.ones(1, 3))


def test_masked_var_by_hand_and_guards():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, INF]])
    # values 1..5, mean 3, squared deviations 4,1,0,1,4 -> sum 10
    close(masked_var(x, MASK), 10.0 / 4)  # unbiased: / (n-1) = 2.5
    close(masked_var(x, MASK, unbiased=False), 10.0 / 5)  # biased: / n = 2.0
    # agrees with torch.var on the unmasked values
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    close(masked_var(x, MASK), vals.var(unbiased=True).item())
    # n = 1: spread 0, no NaN from Bessel's 1/(n-1); n = 0: 0
    one = torch.tensor([[0, 0, 1], [0, 0, 0]])
    close(masked_var(x, one), 0.0)
    close(masked_var(x, one, unbiased=False), 0.0)
    close(masked_var(x, torch.zeros_like(one)), 0.0)


# --------------------------------------------------------------------------- GAE
def test_gae_by_hand_gamma1_lam05_with_padding_garbage():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, NAN]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 1e6]])
    # gamma = 1, lam = 0.5 -> gamma*lam = 0.5; the value after the last token is 0.
    # row 0: d2 = 1 + 0   - 0.1 =  0.9     A2 = 0.9
    #        d1 = 0 + 0.1 - 0.2 = -0.1     A1 = -0.1 + 0.5*0.9  =  0.35
    #        d0 = 0 + 0.2 - 0.5 = -0.3     A0 = -0.3 + 0.5*0.35 = -0.125
    #        returns = A + V = [0.375, 0.55, 1.0]
    # row 1 (length 2; the garbage at t=2 must not leak):
    #        d1 = 2 + 0   - 0.4 =  1.6     A1 = 1.6
    #        d0 = 0 + 0.4 - 0.3 =  0.1     A0 = 0.1 + 0.5*1.6 = 0.9
    #        returns = [1.2, 2.0, 0 (masked)]
    adv, ret = compute_gae(rewards, values, MASK, gamma=1.0, lam=0.5)
    close(adv, [[-0.125, 0.35, 0.9], [0.9, 1.6, 0.0]])
    close(ret, [[0.375, 0.55, 1.0], [1.2, 2.0, 0.0]])


def test_gae_by_hand_gamma09_lam05():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, -7.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 5.0]])
    # gamma = 0.9, lam = 0.5 -> gamma*lam = 0.45
    # row 0: d2 = 1 - 0.1 = 0.9;  d1 = 0.9*0.1 - 0.2 = -0.11;  d0 = 0.9*0.2 - 0.5 = -0.32
    #        A2 = 0.9;  A1 = -0.11 + 0.45*0.9 = 0.295;  A0 = -0.32 + 0.45*0.295 = -0.18725
    # row 1: d1 = 2 - 0.4 = 1.6;  d0 = 0.9*0.4 - 0.3 = 0.06
    #        A1 = 1.6;  A0 = 0.06 + 0.45*1.6 = 0.78
    adv, ret = compute_gae(rewards, values, MASK, gamma=0.9, lam=0.5)
    close(adv, [[-0.18725, 0.295, 0.9], [0.78, 1.6, 0.0]])
    close(ret, [[0.31275, 0.495, 1.0], [1.08, 2.0, 0.0]])


def test_gae_lam1_gamma1_is_return_to_go_minus_value():
    # lam = 1, gamma = 1: A_t = sum_{k>=t} r_k - V_t (telescoping), R_t = sum_{k>=t} r_k
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, -1.0, 2.0]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(ret, [[6.0, 5.0, 3.0]])
    close(adv, [[5.5, 6.0, 1.0]])


def _gae_reference(rewards, values, mask, gamma, lam):
    """Plain per-row Python loop (cleanrl-style), only over each row's response tokens."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b][t] = last
            ret[b][t] = last + float(values[b, t])
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (0.8, 1.0)])
def test_gae_vectorised_matches_per_row_loop(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    B, T = 7, 11
    mask = random_prefix_mask(B, T, gen)
    mask[0] = True  # at least one full row
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
    # garbage at masked positions must not change anything
    rewards = rewards.masked_fill(~mask, NAN)
    values = values.masked_fill(~mask, 1e9)
    adv, ret = compute_gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_outputs_are_detached():
    values = torch.tensor([[0.5, 0.2]], requires_grad=True)
    adv, ret = compute_gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- whiten
def test_whiten_by_hand_with_padding():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    # mean 3, unbiased var 2.5 (see masked_var), std sqrt(2.5) = 1.581139
    # (x - 3)/1.581139 = [-1.2649, -0.6325, 0, 0.6325, 1.2649]; padding -> 0
    s = math.sqrt(2.5 + 1e-8)
    close(whiten(x, MASK), [[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    close(whiten(x, MASK), [[-1.2649, -0.6325, 0.0], [0.6325, 1.2649, 0.0]])
    # shift_mean=False adds the mean 3 back (masked positions stay 0)
    close(whiten(x, MASK, shift_mean=False), [[3 - 2 / s, 3 - 1 / s, 3.0], [3 + 1 / s, 3 + 2 / s, 0.0]])


def test_whiten_random_mean0_var1_over_mask():
    gen = torch.Generator().manual_seed(1)
    x = 3.0 + 5.0 * torch.randn(6, 9, generator=gen, dtype=torch.float64)
    mask = random_prefix_mask(6, 9, gen, allow_empty=False)
    w = whiten(x.masked_fill(~mask, INF), mask)
    assert torch.isfinite(w).all()
    assert abs(masked_mean(w, mask).item()) < 1e-6
    assert abs(masked_var(w, mask).item() - 1.0) < 1e-6
    assert (w[~mask] == 0).all()
    # shift_mean=False keeps the mean, normalises the scale only
    w2 = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(masked_mean(w2, mask), masked_mean(x, mask))
    assert abs(masked_var(w2, mask).item() - 1.0) < 1e-6


def test_whiten_without_mask_and_degenerate_inputs():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = whiten(x)
    close(w.mean(), 0.0)
    close(w.var(), 1.0)
    # a single element / a constant: no NaN (var 0 -> output 0)
    assert whiten(torch.tensor([[5.0]])).item() == 0.0
    assert (whiten(torch.full((2, 3), 7.0), MASK) == 0).all()


def test_whiten_gradient_finite_with_garbage():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]], requires_grad=True)
    (whiten(x, MASK) * torch.arange(6.0).view(2, 3)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[1, 2] == 0


# --------------------------------------------------------------------------- KL
def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.7])
    ref = torch.tensor([-2.0, -1.0, -0.7])
    # k1 = logp - ref = [1, -1, 0]
    close(kl_per_token(logp, ref, "k1"), [1.0, -1.0, 0.0])
    close(kl_per_token(logp, ref), [1.0, -1.0, 0.0])  # default
    # k2 = 0.5*(logp-ref)^2 = [0.5, 0.5, 0]
    close(kl_per_token(logp, ref, "k2"), [0.5, 0.5, 0.0])
    # k3 with d = ref - logp = [-1, 1, 0]: e^-1 - 1 + 1 = 0.367879; e^1 - 1 - 1 = 0.718282; 0
    close(kl_per_token(logp, ref, "k3"), [math.exp(-1), math.e - 2, 0.0])
    close(kl_per_token(logp, ref, "k3"), [0.3679, 0.7183, 0.0])
    assert KL_KINDS == ("k1", "k2", "k3")


def test_kl_signs_on_random_data():
    gen = torch.Generator().manual_seed(2)
    logp = -torch.rand(50, 20, generator=gen) * 5
    ref = -torch.rand(50, 20, generator=gen) * 5
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert (kl_per_token(logp, ref, "k2") >= 0).all()
    k1 = kl_per_token(logp, ref, "k1")
    # k1 is positive exactly where the policy gives the token more probability than ref
    assert torch.equal(k1 > 0, logp > ref)
    assert (k1 < 0).any()  # k1 can be negative per token
    # tiny log-ratios: k3 ~ d^2/2, still >= 0 and not lost to rounding
    d = torch.tensor([1e-4, -1e-4], dtype=torch.float64)
    close(kl_per_token(torch.zeros(2, dtype=torch.float64), d, "k3"), (d**2 / 2).tolist(), atol=1e-12)


def test_kl_unknown_kind_raises():
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(torch.zeros(2), torch.zeros(2), kind="k4")


# --------------------------------------------------------------------------- policy loss
def test_policy_loss_ratio_one():
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(2, 3, generator=gen)
    adv = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, 99.0]])
    # ratio = 1 everywhere: both terms equal -A -> loss = -masked_mean(A), nothing clipped
    # -masked_mean(A) = -(1 - 2 + 0.5 + 3 + 0.25)/5 = -2.75/5 = -0.55
    loss, clipfrac = policy_loss(logp, logp.clone(), adv, MASK, clip_range=0.2)
    close(loss, -0.55)
    close(clipfrac, 0.0)


def test_policy_loss_clipping_by_hand_positive_and_negative_advantages():
    eps = 0.2
    ln = math.log
    # token: (ratio, A) -> -A*ratio, -A*clip(ratio, 0.8, 1.2), max, clipped?
    # row0 t0: (1.5, +1) -> -1.5, -1.2 -> -1.2  clipped (ratio too high, A > 0)
    # row0 t1: (1.5, -1) ->  1.5,  1.2 ->  1.5  not clipped (pessimistic unclipped term)
    # row0 t2: (1.0, +2) -> -2.0, -2.0 -> -2.0  not clipped (equal: strict comparison)
    # row1 t0: (0.5, +1) -> -0.5, -0.8 -> -0.5  not clipped
    # row1 t1: (0.5, -1) ->  0.5,  0.8 ->  0.8  clipped (ratio too low, A < 0)
    # row1 t2: padding with garbage (log-ratio 1e4 -> exp = inf, A = NaN)
    # loss = (-1.2 + 1.5 - 2.0 - 0.5 + 0.8)/5 = -1.4/5 = -0.28; clipfrac = 2/5 = 0.4
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1e4]])
    logp = (old + torch.tensor([[ln(1.5), ln(1.5), 0.0], [ln(0.5), ln(0.5), 2e4]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0], [1.0, -1.0, NAN]])
    loss, clipfrac = policy_loss(logp, old, adv, MASK, clip_range=eps)
    close(loss, -0.28)
    close(clipfrac, 0.4)
    assert not clipfrac.requires_grad
    # gradient: d(-A*ratio)/dlogp = -A*ratio where unclipped, 0 where clipped; / 5 tokens
    # = [0, 1.5/5, -2/5 ; -0.5/5, 0, 0 (padding)]
    loss.backward()
    close(logp.grad, [[0.0, 0.3, -0.4], [-0.1, 0.0, 0.0]])


def test_approx_kl_by_hand():
    # log-ratios [ln1.5, ln1.5, 0 ; ln0.5, ln0.5, garbage]
    # = 0.5*(2*ln(1.5)^2 + 2*ln(0.5)^2)/5 = 0.5*(2*0.164402 + 2*0.480453)/5 = 0.128971
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.5), math.log(1.5), 0.0], [math.log(0.5), math.log(0.5), INF]])
    close(approx_kl(logp, old, MASK), 0.128971)
    close(approx_kl(old, old, MASK), 0.0)


# --------------------------------------------------------------------------- value loss
def test_value_loss_by_hand_with_clipping():
    eps = 0.2
    # token: v, old, R -> v_clip = old + clip(v-old, -0.2, 0.2); (v-R)^2, (v_clip-R)^2 -> max
    # row0 t0:  1.0, 0.5, 1.2 -> 0.7 ; 0.04, 0.25 -> 0.25  clipped
    # row0 t1:  0.0, 0.1, 1.0 -> 0.0 ; 1.00, 1.00 -> 1.00  not clipped (equal, strict)
    # row0 t2:  2.0, 1.0, 0.0 -> 1.2 ; 4.00, 1.44 -> 4.00  not clipped
    # row1 t0: -1.0, 0.0,-0.1 ->-0.2 ; 0.81, 0.01 -> 0.81  not clipped
    # row1 t1:  0.5, 0.0, 0.6 -> 0.2 ; 0.01, 0.16 -> 0.16  clipped
    # row1 t2: padding, garbage
    # loss = 0.5 * (0.25 + 1 + 4 + 0.81 + 0.16)/5 = 0.5 * 6.22/5 = 0.622; clipfrac = 2/5
    values = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 0.5, INF]], requires_grad=True)
    old = torch.tensor([[0.5, 0.1, 1.0], [0.0, 0.0, NAN]])
    returns = torch.tensor([[1.2, 1.0, 0.0], [-0.1, 0.6, -INF]])
    loss, clipfrac = value_loss(values, old, returns, MASK, clip_range=eps)
    close(loss, 0.622)
    close(clipfrac, 0.4)
    # gradient: where the unclipped term wins, d/dv 0.5*(v-R)^2/5 = (v-R)/5;
    # where the clipped term wins and v is outside the band, v_clip is constant -> 0
    # = [0, -1/5, 2/5 ; -0.9/5, 0, 0]
    loss.backward()
    close(values.grad, [[0.0, -0.2, 0.4], [-0.18, 0.0, 0.0]])


def test_value_loss_no_clip_when_inside_band():
    # |v - old| <= eps everywhere -> v_clip = v, loss = 0.5*masked_mean((v-R)^2), clipfrac 0
    v = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    R = torch.tensor([[1.1, 0.2, -0.7], [0.4, 1.5, 0.0]])
    # squared errors 1, 0, 1, 0, 1 -> 0.5 * 3/5 = 0.3
    loss, clipfrac = value_loss(v, v + 0.05, R, MASK, clip_range=0.2)
    close(loss, 0.3)
    close(clipfrac, 0.0)


# --------------------------------------------------------------------------- logits
def test_logprobs_two_token_vocab_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4] -> log p = [-1.386294, -0.287682]
    # at tau = 2: logits/2 = [0, ln(3)/2] -> p = [1/(1+sqrt3), sqrt3/(1+sqrt3)] = [0.366025, 0.633975]
    #             log p = [-1.005053, -0.455746]
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])  # [1, 2, 2]
    tokens = torch.tensor([[0, 1]])
    close(logprobs_from_logits(logits, tokens), [[math.log(0.25), math.log(0.75)]])
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[-1.005053, -0.455746]])
    s3 = math.sqrt(3)
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[-math.log(1 + s3), math.log(s3 / (1 + s3))]])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_equal_log_softmax_gather(temperature):
    gen = torch.Generator().manual_seed(4)
    B, T, V = 3, 5, 17
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 3
    tokens = torch.randint(0, V, (B, T), generator=gen)
    expected = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = logprobs_from_logits(a, tokens, temperature)
    torch.testing.assert_close(got, expected)
    # same gradients as the straightforward computation
    w = torch.randn(B, T, generator=gen, dtype=torch.float64)
    (got * w).sum().backward()
    (torch.log_softmax(b / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_logprobs_half_precision_upcast_and_bad_args():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 50, generator=gen) * 4
    tokens = torch.randint(0, 50, (2, 4), generator=gen)
    got = logprobs_from_logits(logits.bfloat16(), tokens)
    assert got.dtype == torch.float32
    expected = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, expected)
    assert (got <= 0).all()
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tokens[:, :3])


def test_entropy_by_hand_uniform_and_sanity():
    # 2-token vocab, logits [0, ln 3] -> p = [1/4, 3/4]
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[[0.0, math.log(3)]]])
    close(entropy_from_logits(logits), [[0.562335]])
    # uniform logits -> H = log V, for any temperature
    V = 13
    close(entropy_from_logits(torch.full((2, 3, V), 0.3)), torch.full((2, 3), math.log(V)))
    close(entropy_from_logits(torch.zeros(1, 1, V), temperature=0.5), [[math.log(V)]])
    # random: 0 <= H <= log V, equals torch.distributions.Categorical
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 6, V, generator=gen) * 5
    h = entropy_from_logits(x, temperature=1.3)
    assert (h >= 0).all() and (h <= math.log(V) + 1e-5).all()
    torch.testing.assert_close(h, torch.distributions.Categorical(logits=x / 1.3).entropy())
    # a near one-hot distribution has entropy ~0, still >= 0
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    h0 = entropy_from_logits(peaked)
    assert 0 <= h0.item() < 1e-6


def test_entropy_with_minus_inf_logits_value_and_gradient():
    # banned token (-inf): p = [1/2, 1/2, 0] -> H = ln 2; 0*log 0 counts as 0, no NaN
    logits = torch.tensor([[[0.0, 0.0, -INF]]], requires_grad=True)
    h = entropy_from_logits(logits)
    close(h, [[math.log(2)]])
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- rewards
def test_rewards_with_kl_by_hand():
    scores = torch.tensor([10.0, 20.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, NAN]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -2.0, 3.0]])
    # k1 = logp - ref: row0 [0.5, 0, -0.5]; row1 [-1, 0, masked -> 0]
    # rewards = -0.1*kl, plus the score at the last response token (index 2 and 1):
    # row0 [-0.05, 0, 0.05 + 10] ; row1 [0.1, 0 + 20, 0]
    rewards, kl = rewards_with_kl(scores, logp, ref, MASK, kl_coef=0.1)
    close(kl, [[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 10.05], [0.1, 20.0, 0.0]])
    # [B, 1] scores work too; k3 kind: row0 d = ref-logp = [-0.5, 0, 0.5]
    # k3 = [e^-0.5 - 1 + 0.5, 0, e^0.5 - 1 - 0.5] = [0.106531, 0, 0.148721]
    rewards3, kl3 = rewards_with_kl(scores.view(2, 1), logp, ref, MASK, kl_coef=1.0, kind="k3")
    close(kl3[0], [0.106531, 0.0, 0.148721])
    close(rewards3[0], [-0.106531, 0.0, 10.0 - 0.148721])


def test_rewards_with_kl_score_at_last_token_of_each_prefix_length():
    # lengths 1, 3, 2, 0 (an empty row gets no score)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    zeros = torch.zeros(4, 3)
    rewards, kl = rewards_with_kl(scores, zeros, zeros, mask, kl_coef=0.5)
    close(rewards, [[1.0, 0, 0], [0, 0, 2.0], [0, 3.0, 0], [0, 0, 0]])
    close(kl, torch.zeros(4, 3))
    # matches mask_after_eos built masks: score lands on the EOS token
    tokens = torch.tensor([[7, 2, 5], [7, 7, 7], [2, 9, 9]])
    m = mask_after_eos(tokens, eos_id=2)
    rewards, _ = rewards_with_kl(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 3), torch.zeros(3, 3), m, 0.1)
    close(rewards, [[0, 1.0, 0], [0, 0, 2.0], [3.0, 0, 0]])


def test_rewards_with_kl_rejects_wrong_score_count():
    with pytest.raises(ValueError):
        rewards_with_kl(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3), MASK, 0.1)


# --------------------------------------------------------------------------- KL controllers
def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    assert c.value == 0.05
    c.update(123.0, 512)
    assert c.value == 0.05
    state = json.loads(json.dumps(c.state_dict()))
    assert state == {"value": 0.05}
    c2 = FixedKLController(0.3)
    c2.load_state_dict(state)
    assert c2.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-0.1)
    with pytest.raises(ValueError):
        c2.load_state_dict({"value": 1.0, "target": 6.0, "horizon": 1.0})


def test_adaptive_kl_controller_by_hand():
    # init 0.2, target 6, horizon 10000
    # KL 9: 9/6 - 1 = 0.5 -> clipped to 0.2; mult = 1 + 0.2*512/10000 = 1.01024 -> 0.2020480
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert c.update(9.0, 512) == pytest.approx(0.20204800, abs=1e-12)
    assert c.value == pytest.approx(0.20204800, abs=1e-12)
    # KL 3: 3/6 - 1 = -0.5 -> clipped to -0.2; mult = 1 - 0.01024 = 0.98976
    #       0.202048 * 0.98976 = 0.19997903
    c.update(torch.tensor(3.0), 512)
    assert c.value == pytest.approx(0.202048 * 0.98976, abs=1e-12)
    assert c.value == pytest.approx(0.19997903, abs=1e-8)
    # unclipped error: KL 6.6 -> 0.1; mult = 1 + 0.1*512/10000 = 1.00512 -> 0.2*1.00512 = 0.201024
    c = AdaptiveKLController(0.2, 6.0, 10000)
    c.update(6.6, 512)
    assert c.value == pytest.approx(0.201024, abs=1e-12)
    # KL on target: no change
    c.update(6.0, 512)
    assert c.value == pytest.approx(0.201024, abs=1e-12)
    # huge KL is clipped exactly like 9 was
    c = AdaptiveKLController(0.2, 6.0, 10000)
    c.update(1e9, 512)
    assert c.value == pytest.approx(0.20204800, abs=1e-12)


def test_adaptive_kl_controller_state_dict_round_trip_and_validation():
    c = AdaptiveKLController(0.2, 6.0, 10000)
    c.update(9.0, 512)
    state = json.loads(json.dumps(c.state_dict()))
    assert state == {"value": c.value, "target": 6.0, "horizon": 10000.0}
    assert all(type(v) is float for v in state.values())
    fresh = AdaptiveKLController(0.2, 6.0, 10000)
    fresh.load_state_dict(state)
    assert fresh.value == c.value
    # both continue identically
    assert fresh.update(4.0, 256) == c.update(4.0, 256)
    with pytest.raises(ValueError):
        fresh.load_state_dict({"value": 0.1})
    with pytest.raises(ValueError):
        c.update(NAN, 512)
    for bad in [dict(init_kl_coef=-1, target=6, horizon=1), dict(init_kl_coef=0.1, target=0, horizon=1),
                dict(init_kl_coef=0.1, target=6, horizon=0)]:
        with pytest.raises(ValueError):
            AdaptiveKLController(**bad)


# --------------------------------------------------------------------------- EOS
def test_first_true_indices():
    b = torch.tensor([[False, False, False], [True, True, False], [False, False, True], [False, True, True]])
    assert first_true_indices(b).tolist() == [3, 0, 2, 1]


def test_mask_after_eos_first_middle_absent_repeated():
    eos = 2
    tokens = torch.tensor(
        [
            [2, 5, 5, 5],  # EOS first -> only the EOS is kept
            [5, 6, 2, 7],  # EOS in the middle -> up to and including it
            [5, 6, 7, 8],  # no EOS -> all ones
            [5, 2, 2, 2],  # repeated EOS (pad = eos style) -> up to the first one
            [5, 6, 7, 2],  # EOS last
        ]
    )
    m = mask_after_eos(tokens, eos)
    assert m.dtype == torch.bool
    assert m.long().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
    ]
    # prefix masks: ones never follow a zero
    assert (m[:, 1:] <= m[:, :-1]).all()


# --------------------------------------------------------------------------- reward ensembles
def test_rloo_baseline_leaves_the_sample_out_by_hand():
    # k = 3. Row 0: r = 1, 2, 3 -> baselines (2+3)/2, (1+3)/2, (1+2)/2 = 2.5, 2, 1.5 -> A = -1.5, 0, 1.5
    # Row 1: r = 0, 0, 6 -> baselines 3, 3, 0 -> A = -3, -3, 6 (= 3/2 x (r - mean 2))
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    a = rloo_advantages(rewards)
    close(a, [[-1.5, 0.0, 1.5], [-3.0, -3.0, 6.0]])
    close(a.sum(1), [0.0, 0.0])
    # the sample itself is not in its baseline: raising r_i by d raises A_i by exactly d
    bumped = rewards.clone()
    bumped[1, 2] += 10.0
    close(rloo_advantages(bumped)[1, 2] - a[1, 2], 10.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"\[prompts, k\]"):
        rloo_advantages(torch.ones(6))


def test_grpo_group_normalised_and_dr_grpo_by_hand():
    # Row 0: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4)
    # Row 1: r = 0, 0, 6: mean 2, deviations -2, -2, 4; var = (4 + 4 + 16) / 2 = 12, std = 2 sqrt 3 = 3.4641
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    s = 2 * math.sqrt(3)
    close(grpo_advantages(rewards), [[-1 / 1.0001, 0.0, 1 / 1.0001],
                                     [-2 / (s + 1e-4), -2 / (s + 1e-4), 4 / (s + 1e-4)]])
    close(grpo_advantages(rewards, scale=False), [[-1.0, 0.0, 1.0], [-2.0, -2.0, 4.0]])  # Dr. GRPO
    assert torch.equal(grpo_advantages(torch.full((2, 4), 0.7)), torch.zeros(2, 4))  # equal rewards: 0, not NaN
    with pytest.raises(ValueError, match="at least 2 samples"):
        grpo_advantages(torch.ones(3, 1))


def test_critic_free_advantages_by_hand():
    # two prompts x k = 2: scores 1, 3 | 0, 0; KL of each response 2, 0 | 1, 3; beta 0.5
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    kl_seq = torch.tensor([2.0, 0.0, 1.0, 3.0])
    # rloo: r = s - 0.5 KL = 0, 3 | -0.5, -1.5; k = 2 -> A_i = r_i - r_other = -3, 3 | 1, -1
    close(critic_free_advantages("rloo", scores, kl_seq, 2, 0.5), [-3.0, 3.0, 1.0, -1.0])
    # grpo: KL stays out of the advantage; group 0: mean 2, std sqrt(2) -> -/+ 1/sqrt2; group 1: equal -> 0
    s2 = math.sqrt(2) + 1e-4
    close(critic_free_advantages("grpo", scores, kl_seq, 2, 0.5), [-1 / s2, 1 / s2, 0.0, 0.0])
    close(critic_free_advantages("grpo", scores, kl_seq, 2, 0.5, scale_rewards=False), [-1.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="groups of num_generations=3"):
        critic_free_advantages("rloo", scores, kl_seq, 3, 0.5)
    with pytest.raises(ValueError, match="'rloo' or 'grpo'"):
        critic_free_advantages("ppo", scores, kl_seq, 2, 0.5)


def test_kl_penalty_loss_value_and_its_gradient_by_hand():
    # one row, tokens 1-2 real, token 3 padding (garbage there changes nothing)
    logp = torch.tensor([[math.log(0.5), math.log(0.2), float("nan")]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.4), 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    # k3 = r - 1 - log r with r = ref / p: token 1 r = 0.5 -> 0.5 - 1 + ln 2; token 2 r = 2 -> 1 - ln 2
    loss = kl_penalty_loss(logp, ref, mask)
    close(loss, ((0.5 - 1 + math.log(2)) + (1 - math.log(2))) / 2)
    loss.backward()
    # d k3 / d logp = 1 - r, over 2 tokens: (1 - 0.5) / 2, (1 - 2) / 2, padding 0
    close(logp.grad, [[0.25, -0.5, 0.0]])


def test_kl_penalty_loss_gradient_is_the_forward_kl_gradient_on_policy():
    # the bias the docstring states: E_{a~pi}[grad k3(a)] = grad KL(ref || pi), not grad KL(pi || ref)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.4, -0.6]), 0)
    logpi = torch.log_softmax(theta, 0)
    pi = logpi.exp().detach()
    # the exact expectation over the 3 actions of the per-sample loss's gradient
    expected_k3 = sum(pi[a] * kl_per_token(logpi[a], ref[a], "k3") for a in range(3))
    g_k3, = torch.autograd.grad(expected_k3, theta, retain_graph=True)
    forward_kl = (ref.exp() * (ref - logpi)).sum()
    g_fwd, = torch.autograd.grad(forward_kl, theta, retain_graph=True)
    reverse_kl = (logpi.exp() * (logpi - ref)).sum()
    g_rev, = torch.autograd.grad(reverse_kl, theta)
    close(g_k3, g_fwd)
    assert (g_k3 - g_rev).abs().max() > 1e-3


def test_sequence_policy_loss_one_ratio_per_response_by_hand():
    # response 1: 2 tokens, log-ratios 0.1 and 0.05, A = 1; response 2: 1 token, log-ratio -0.3, A = -2;
    # padding holds garbage (NaN, 7) that must change nothing
    logp = torch.tensor([[0.1, 0.05, float("nan")], [-0.3, 7.0, 7.0]], requires_grad=True)
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    # whole response (TRL's RLOO): rho_1 = e^0.15 = 1.162 inside [0.8, 1.2] -> l_1 = -e^0.15;
    # rho_2 = e^-0.3 = 0.741 < 0.8 with A < 0: max(2 x 0.741, 2 x 0.8) = 1.6, the clipped branch
    losses, clipped = sequence_policy_loss(logp, old, adv, mask, 0.2, length_normalise=False)
    close(losses, [-math.exp(0.15), 1.6])
    close(clipped, [0.0, 1.0])
    losses.sum().backward()
    # d l_1 / d logp_t = -A_1 rho_1 at each of its tokens (summed, not averaged); clipped: no gradient
    close(logp.grad, [[-math.exp(0.15), -math.exp(0.15), 0.0], [0.0, 0.0, 0.0]])
    # GSPO: the per-token geometric mean, rho_1 = e^(0.15 / 2); response 2 (one token) unchanged
    logp.grad = None
    losses, clipped = sequence_policy_loss(logp, old, adv, mask, 0.2, length_normalise=True)
    close(losses, [-math.exp(0.075), 1.6])
    losses.sum().backward()
    close(logp.grad, [[-math.exp(0.075) / 2, -math.exp(0.075) / 2, 0.0], [0.0, 0.0, 0.0]])
    # on-policy (every ratio 1) both are REINFORCE with the response's advantage: -A x n_i / D_i
    losses, clipped = sequence_policy_loss(old, old, adv, mask, 0.2, length_normalise=False)
    close(losses, [-1.0, 2.0])
    close(clipped, [0.0, 0.0])


def test_loss_weight_sums_micro_batches_to_the_minibatch_aggregate():
    # per-token losses of 2 episodes (response length R = 4), split into 2 micro-batches of one episode
    losses = [torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([4.0, 4.0, 4.0, 6.0])]
    masks = [torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 1, 1])]
    total_tokens = torch.tensor(6.0)
    parts = {t: sum(loss_weight(t, m.sum(), total_tokens, 2, 4) * masked_mean(loss, m) for loss, m in zip(losses, masks))
             for t in ("dapo", "dr_grpo")}
    close(parts["dapo"], (1 + 2 + 4 + 4 + 4 + 6) / 6)  # token mean over the minibatch
    close(parts["dr_grpo"], (1 + 2 + 4 + 4 + 4 + 6) / (2 * 4))  # token sum over episodes x R
    with pytest.raises(ValueError, match="unknown loss_type"):
        loss_weight("grpo", total_tokens, total_tokens, 2, 4)


def test_shaped_scores_by_hand():
    # scores 3, -0.5, 1.2, -4; rows 1 and 3 stopped without EOS; penalty 1, clip 2:
    # 3 -> clip 2;  -0.5 - 1 = -1.5;  1.2;  -4 - 1 = -5 -> clip -2
    scores = torch.tensor([3.0, -0.5, 1.2, -4.0])
    has_eos = torch.tensor([True, False, True, False])
    close(shaped_scores(scores, has_eos, 1.0, 2.0), [2.0, -1.5, 1.2, -2.0])
    close(shaped_scores(scores, has_eos, 1.0, None), [3.0, -1.5, 1.2, -5.0])
    close(shaped_scores(scores, has_eos, None, 2.0), [2.0, -0.5, 1.2, -2.0])
    assert torch.equal(shaped_scores(scores, has_eos), scores)
    assert torch.equal(scores, torch.tensor([3.0, -0.5, 1.2, -4.0]))  # the input is not changed


def test_ensemble_reward_by_hand():
    # three members, two sequences:  seq 0 scores 1, 2, 3;  seq 1 scores -1, -1, 2
    scores = torch.tensor([[1.0, -1.0], [2.0, -1.0], [3.0, 2.0]])
    # seq 0: mean 2, population var ((1)^2 + 0 + 1^2) / 3 = 2/3, std 0.816497
    # seq 1: mean 0, var (1 + 1 + 4) / 3 = 2, std 1.414214
    mean, std = ensemble_reward(scores, "mean")
    close(mean, [2.0, 0.0], atol=1e-6)
    close(std, [math.sqrt(2 / 3), math.sqrt(2)], atol=1e-6)
    low, _ = ensemble_reward(scores, "min")
    close(low, [1.0, -1.0], atol=0)
    # mean - 0.5 std: 2 - 0.408248 = 1.591752; 0 - 0.707107 = -0.707107
    cons, _ = ensemble_reward(scores, "mean_minus_std", std_coef=0.5)
    close(cons, [2 - 0.5 * math.sqrt(2 / 3), -0.5 * math.sqrt(2)], atol=1e-6)
    # the conservative reward ranks the disputed sequence lower than the plain mean does:
    # two sequences with equal mean, one agreed on, one disputed
    agreed_vs_disputed = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    r, d = ensemble_reward(agreed_vs_disputed, "mean_minus_std", std_coef=1.0)
    close(d, [0.0, 1.0], atol=1e-6)
    assert r[0] > r[1]
    # one member: every reduction is that member's score, disagreement 0
    one = torch.tensor([[0.3, -0.2]])
    for how in ("mean", "min", "mean_minus_std"):
        r, d = ensemble_reward(one, how)
        close(r, [0.3, -0.2], atol=1e-7)
        close(d, [0.0, 0.0], atol=0)
    with pytest.raises(ValueError):
        ensemble_reward(scores, "median")
    with pytest.raises(ValueError):
        ensemble_reward(torch.zeros(3), "mean")


def test_adaptive_kl_controller_reaches_and_holds_its_target_on_a_toy():
    # Toy policy: the KL it drifts to is inversely proportional to the penalty, KL(beta) = c / beta
    # (the optimum of  score - beta * KL  for a score that grows like 2c * log KL ... any decreasing
    # response does). With c = 0.05 and target 1.0 the fixed point is beta* = 0.05. Starting at
    # beta = 0.01 (KL 5, far above target) the controller must raise beta to beta* and stay there.
    c_toy, target = 0.05, 1.0
    ctl = AdaptiveKLController(0.01, target=target, horizon=640)
    kls = []
    for _ in range(300):
        kl = c_toy / ctl.value
        kls.append(kl)
        ctl.update(kl, 64)  # 64 episodes per update: at most x(1 +- 0.02) per update
    assert kls[0] == pytest.approx(5.0)
    # the error is clipped at +-0.2, so the climb from 0.01 to 0.05 takes log(5)/log(1.02) ~ 81 updates
    assert all(k > 1.0 for k in kls[:80])
    # ... then it holds: the last 100 updates all lie within 2 % of the target
    assert all(abs(k - target) < 0.02 for k in kls[-100:])
    assert ctl.value == pytest.approx(c_toy / target, rel=0.02)
