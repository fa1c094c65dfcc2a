"""The RL math: small, pure tensor functions, free of trainer imports (PPO's losses and
advantages, KL estimators, masked statistics, log-probs from logits), below every stage.

In the style of cleanrl and torchtune (``torchtune/rlhf/rewards.py``,
``torchtune/rlhf/loss/ppo.py``): every function takes and returns tensors, names follow
the papers (``logprobs``, ``ref_logprobs``, ``values``, ``advantages``, ``returns``) and
each docstring gives shapes and the equation it implements.

Conventions
-----------
* Per-token tensors are ``[B, T]`` (batch, response length).
* ``mask`` is ``[B, T]``, 1 (or ``True``) on response tokens and 0 on padding; it may be
  ``bool``, integer or floating with values in {0, 1}. Each row's ones are a prefix
  (``mask_after_eos`` builds exactly such masks).
* Masks, never sentinels (docs/pitfalls.md#6): every function that takes a mask first
  replaces masked positions of its inputs by 0 with ``torch.where``, so garbage there
  (NaN, ±inf, huge numbers) changes neither the outputs nor the gradients.
* A "masked mean" is the mean over all unmasked positions of the whole batch: a global
  token mean, not a mean of per-row means.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KL_KINDS",
    "approx_kl",
    "compute_gae",
    "critic_free_advantages",
    "ensemble_reward",
    "entropy_from_logits",
    "first_true_indices",
    "kl_penalty_loss",
    "kl_per_token",
    "loss_weight",
    "logprobs_from_logits",
    "mask_after_eos",
    "masked_mean",
    "masked_var",
    "policy_loss",
    "grpo_advantages",
    "rewards_with_kl",
    "rloo_advantages",
    "shaped_scores",
    "sequence_policy_loss",
    "value_loss",
    "whiten",
]

KL_KINDS = ("k1", "k2", "k3")
"""The per-token KL estimators accepted by :func:`kl_per_token` (Schulman 2020)."""
ENSEMBLE_REDUCTIONS = ("mean", "min", "mean_minus_std")
"""How :func:`ensemble_reward` combines the members' scores into one reward."""
LOSS_TYPES = ("dapo", "dr_grpo")
"""How token losses are aggregated (TRL's ``loss_type`` names), see :func:`loss_weight`."""

_WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------
def _as_bool_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor of ``x``'s shape (no broadcasting: counts must be right)."""
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != tensor shape {tuple(x.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    mean = Σ_i m_i x_i / Σ_i m_i

    Args:
        x: any shape, e.g. ``[B, T]``.
        mask: same shape as ``x``; 1/True = counted, 0/False = ignored (its values there
            may be garbage, even NaN or inf).
        dim: ``None`` for the global mean over every unmasked element (a scalar; for
            ``[B, T]`` this is the token mean of the whole batch), or a dimension to
            reduce (e.g. ``dim=1`` gives one mean per row, ``[B]``).

    Returns:
        scalar tensor if ``dim is None``, else ``x`` reduced over ``dim``.

    An empty mask (no unmasked element, globally or in one slice) gives 0, not NaN: the
    count is clamped to at least 1 and the masked sum of nothing is 0.
    """
    m = _as_bool_mask(x, mask)
    x = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return x.sum() / m.sum().clamp(min=1).to(x.dtype)
    return x.sum(dim=dim) / m.sum(dim=dim).clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the positions where ``mask`` is 1 (a scalar, global).

    var = Σ_i m_i (x_i − μ)² / (n − 1)   if ``unbiased`` (Bessel's correction), else / n,
    with μ = masked_mean(x, mask) and n = Σ_i m_i.

    Bias choice: the default ``unbiased=True`` matches TRL's and torchtune's ``masked_var``
    (and ``torch.var``), so :func:`whiten` gives the same numbers as they do; with the
    thousands of tokens of a PPO batch the two differ by a factor n/(n−1) ≈ 1.

    Guards: with n = 0 (empty mask) the result is 0; with n = 1 the spread is exactly 0
    and Bessel's factor is undefined, so the result is 0 as well (no NaN, no division by
    zero, no exception in the middle of a training run). Both come from clamping the
    denominator to at least 1, so there is no data-dependent branch.
    """
    m = _as_bool_mask(x, mask)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(m, x, zero)
    n = m.sum()
    mean = x.sum() / n.clamp(min=1).to(x.dtype)
    centered = torch.where(m, x - mean, zero)
    denom = (n - 1) if unbiased else n
    return centered.square().sum() / denom.clamp(min=1).to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``x`` over its unmasked positions (advantage normalisation).

    x̂ = (x − μ) / sqrt(σ² + 1e-8),   and with ``shift_mean=False``: x̂ + μ,
    where μ, σ² are the masked mean and (unbiased) masked variance, see
    :func:`masked_mean`, :func:`masked_var`.

    Args:
        x: ``[B, T]`` (any shape works).
        mask: same shape, or ``None`` to use every element.
        shift_mean: if ``False`` the mean is added back: only the scale is normalised
            (TRL uses this for the rewards before GAE when ``whiten_rewards`` is set).

    Returns:
        same shape as ``x``; when a mask is given its masked positions are 0.
    """
    if mask is None:
        m = torch.ones_like(x, dtype=torch.bool)
    else:
        m = _as_bool_mask(x, mask)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(m, x, zero)  # garbage out before any arithmetic (gradients too)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero)


# --------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------
@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11–16).

    δ_t = r_t + γ V(s_{t+1}) − V(s_t)
    Â_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ Â_{t+1}     (computed backwards over t)
    R_t = Â_t + V(s_t)                                    (the value targets)

    The episode ends at each row's last response token: the value after it (and the
    advantage after it) is 0, whatever ``values`` holds at the padding.

    Args:
        rewards: ``[B, T]`` per-token rewards r_t (e.g. from :func:`rewards_with_kl`).
        values: ``[B, T]`` value estimates V(s_t) of the rollout (old) value head.
        mask: ``[B, T]`` response mask, ones a prefix of each row.
        gamma: discount γ. lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, 0 at masked positions. They are
        targets, so they are computed without autograd (no graph, detached).

    Vectorised over the batch; a Python loop over T from the end. Garbage (even NaN) at
    masked positions of ``rewards``/``values`` is ignored.
    """
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ")
    m = _as_bool_mask(values, mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    r = torch.where(m, rewards.to(dtype), zero)
    v = torch.where(m, values.to(dtype), zero)
    B, T = v.shape
    advantages = torch.zeros_like(v)
    next_value = torch.zeros(B, dtype=dtype, device=v.device)
    next_adv = torch.zeros(B, dtype=dtype, device=v.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = torch.where(m[:, t], delta + gamma * lam * next_adv, zero)
        advantages[:, t] = adv_t
        # v and adv_t are 0 at masked t, so the step before the last response token
        # sees V(s_{t+1}) = 0 and Â_{t+1} = 0: the episode ended.
        next_value = v[:, t]
        next_adv = adv_t
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


# --------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimator of KL(π ‖ π_ref) from sampled tokens (Schulman 2020, "Approximating KL").

    With log r = ref_logprobs − logprobs (tokens sampled from π):
        k1 = −log r = logprobs − ref_logprobs           (unbiased, can be negative)
        k2 = ½ (log r)²                                  (biased, ≥ 0)
        k3 = (r − 1) − log r = exp(ref − logp) − 1 − (ref − logp)   (unbiased, ≥ 0)

    Args:
        logprobs, ref_logprobs: ``[B, T]`` log-probabilities of the sampled tokens under
            the policy and the reference model.
        kind: ``"k1"``, ``"k2"`` or ``"k3"``; anything else raises ``ValueError``.

    Returns:
        ``[B, T]`` elementwise (no mask: mask the result, or use :func:`rewards_with_kl`).
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        log_ratio = ref_logprobs - logprobs
        # expm1 keeps precision for small log-ratios; the clamp only removes rounding
        # below 0 (the exact value is ≥ 0, and its gradient is 0 there anyway).
        return (torch.expm1(log_ratio) - log_ratio).clamp(min=0.0)
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {KL_KINDS}")


@torch.no_grad()
def rewards_with_kl(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: KL penalty on every response token, score at the last one.

    Ziegler et al. 2019 eq. (2) / Ouyang et al. 2022 eq. (2), spread over tokens:
        r_t = −β · KL_t                         for every response token t,
        r_t += score   at t = last response token of the row (mask.sum(1) − 1),
    and 0 at masked positions, where KL_t = :func:`kl_per_token` (``kind``), β = ``kl_coef``.

    Args:
        scores: ``[B]`` (or ``[B, 1]``) reward-model score of each sequence.
        logprobs, ref_logprobs: ``[B, T]`` sampled-token log-probs of policy and reference.
        mask: ``[B, T]`` response mask, ones a prefix of each row. A row with no response
            token gets no score (and no KL).
        kl_coef: β ≥ 0 (a float, e.g. ``controller.value``).
        kind: KL estimator, see :func:`kl_per_token`.

    Returns:
        ``(rewards, kl)``, both ``[B, T]``, 0 at masked positions; ``kl`` is the per-token
        KL (before multiplying by β), e.g. for the controller's ``update`` and metrics.
        Computed without autograd (rewards are constants in PPO); for a KL term with
        gradients call :func:`kl_per_token` directly.
    """
    m = _as_bool_mask(logprobs, mask)
    B, T = logprobs.shape
    scores = scores.reshape(-1)
    if scores.numel() != B:
        raise ValueError(f"scores has {scores.numel()} elements, expected one per row ({B})")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logp = torch.where(m, logprobs, zero)
    ref = torch.where(m, ref_logprobs.to(logprobs.dtype), zero)
    kl = torch.where(m, kl_per_token(logp, ref, kind), zero)
    rewards = -kl_coef * kl
    lengths = m.sum(dim=1)
    last = (lengths - 1).clamp(min=0)
    at_last = torch.nn.functional.one_hot(last, T).to(torch.bool) & (lengths > 0).unsqueeze(1)
    rewards = rewards + torch.where(at_last, scores.to(rewards.dtype).unsqueeze(1), zero)
    return rewards, kl


def _groups(rewards: torch.Tensor, who: str) -> torch.Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"{who}: rewards must be [prompts, k] (k samples of each prompt), got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"{who}: needs at least 2 samples per prompt (k >= 2), got k = {rewards.shape[1]}; "
                         "with one sample the baseline is the sample itself and every advantage is 0")
    return rewards.float() if not rewards.is_floating_point() else rewards


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics"; TRL's RLOOTrainer).

    Each sample's baseline is the mean reward of the *other* k − 1 samples of its prompt, so it
    never contains the sample itself (the estimator stays unbiased):

        A_i = r_i − 1/(k−1) · Σ_{j≠i} r_j  =  k/(k−1) · (r_i − mean_j r_j)

    Args:
        rewards: ``[P, k]`` sequence rewards, k ≥ 2 samples for each of P prompts (for RLHF:
            the score minus β·KL of each sample, as in TRL).

    Returns:
        ``[P, k]`` advantages; each row sums to 0.
    """
    rewards = _groups(rewards, "rloo_advantages")
    k = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def grpo_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath; TRL's GRPOTrainer).

        A_i = (r_i − mean_j r_j) / (std_j r_j + eps)      (scale=True: GRPO)
        A_i =  r_i − mean_j r_j                            (scale=False: Dr. GRPO, Liu et al. 2025)

    ``std`` is the sample standard deviation over the k samples (unbiased, as ``torch.std`` and
    TRL); ``eps`` keeps a group of equal rewards at 0 instead of 0/0. Dividing by the std
    weights prompts whose samples barely differ as much as any other: Dr. GRPO drops it to
    remove that difficulty bias.

    Args:
        rewards: ``[P, k]``, k ≥ 2.

    Returns:
        ``[P, k]``.
    """
    rewards = _groups(rewards, "grpo_advantages")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps) if scale else centred


def critic_free_advantages(algorithm: str, scores: torch.Tensor, kl_seq: torch.Tensor, num_generations: int,
                           kl_coef: float, scale_rewards: bool = True) -> torch.Tensor:
    """One advantage per episode for the estimators without a value model, as TRL computes them.

    Episodes come in groups of k = ``num_generations`` consecutive samples of one prompt.

        rloo:  r_i = s_i − β · KL_i,  A = :func:`rloo_advantages` (r)     (KL in the reward)
        grpo:  A = :func:`grpo_advantages` (s, scale_rewards)           (KL in the loss: :func:`kl_penalty_loss`)

    where s_i is the episode's score and KL_i its per-token KL summed over the response (with
    k1, Σ_t log π_old − log π_ref, as TRL's RLOOTrainer). As a reward, the k1 sum is an unbiased estimate of the
    sequence's KL(π ‖ π_ref), and the score-function gradient of s − β·KL is an unbiased gradient
    of the KL-regularised objective (RLOO's derivation; the missing ∇ log π inside the reward has
    expectation 0).

    Args:
        scores: ``[B]`` shaped scores, B = prompts × k.
        kl_seq: ``[B]`` KL_i (used by rloo only).

    Returns:
        ``[B]``; every token of a response gets its episode's advantage.
    """
    if algorithm not in ("rloo", "grpo"):
        raise ValueError(f"critic_free_advantages: algorithm must be 'rloo' or 'grpo', got {algorithm!r}")
    if scores.numel() % num_generations:
        raise ValueError(f"{scores.numel()} episodes do not form groups of num_generations={num_generations}")
    if algorithm == "rloo":
        return rloo_advantages((scores - kl_coef * kl_seq).reshape(-1, num_generations)).reshape(-1)
    return grpo_advantages(scores.reshape(-1, num_generations), scale=scale_rewards).reshape(-1)


def kl_penalty_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL term (Shao et al. 2024, eq. 4; TRL's ``beta`` term), added to the loss as β × this:

        L_KL = masked_mean( exp(ref − logp) − (ref − logp) − 1 )      (k3, per token, with gradients)

    Its bias, stated: on tokens sampled from π the value is an unbiased estimate of
    KL(π ‖ π_ref), but its gradient is, in expectation,
        E_π[(1 − π_ref/π) ∇ log π] = −Σ_a π_ref(a) ∇ log π(a) = ∇ KL(π_ref ‖ π),
    the gradient of the *forward* KL, not of KL(π ‖ π_ref) that the objective names (Tang & Munos
    2025). Both are 0 at π = π_ref and pull π back toward it; they differ away from it.

    Args:
        logprobs: ``[B, T]`` current policy (with gradients); ref_logprobs: ``[B, T]`` constants.

    Returns:
        scalar, the global token mean over ``mask``.
    """
    m = _as_bool_mask(logprobs, mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = kl_per_token(torch.where(m, logprobs, zero), torch.where(m, ref_logprobs.to(logprobs.dtype), zero), "k3")
    return masked_mean(kl, m)


def loss_weight(loss_type: str, micro_tokens: torch.Tensor, minibatch_tokens: torch.Tensor,
                minibatch_episodes: int, response_length: int) -> torch.Tensor:
    """The factor that turns a micro-batch's token-mean loss into its share of the minibatch's loss.

        dapo:     w = n_micro / N          → Σ_minibatch ℓ_t / N, the global token mean over the
                                             N response tokens of the minibatch (PPO's; DAPO's)
        dr_grpo:  w = n_micro / (E · R)    → Σ_minibatch ℓ_t / (E · R), a constant divisor: no
                                             length normalisation (Dr. GRPO, Liu et al. 2025)

    with n_micro the micro-batch's response tokens, E the minibatch's episodes and R the
    response length. Summing w × (the micro-batch's token mean) over the micro-batches gives
    the minibatch loss, whatever the split.
    """
    if loss_type == "dapo":
        return micro_tokens / minibatch_tokens
    if loss_type == "dr_grpo":
        return micro_tokens / (minibatch_episodes * response_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def shaped_scores(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_penalty: float | None = None,
                  score_clip: float | None = None) -> torch.Tensor:
    """The sequence-level reward PPO trains on: a penalty for a response cut off without EOS, then clipping.

    s'_b = clip(s_b − penalty · [no EOS in row b], −c, c)

    Args:
        scores: ``[B]`` reward-model (or function) scores.
        has_eos: ``[B]`` bool, the response ended with EOS within the length limit.
        missing_eos_penalty: subtracted where ``has_eos`` is False (TRL's ``missing_eos_penalty``); None = no penalty.
        score_clip: c > 0, clip to [−c, c] after the penalty; None = no clipping.

    Returns:
        ``[B]``, a new tensor.
    """
    out = scores.clone()
    if missing_eos_penalty is not None:
        out = torch.where(has_eos, out, out - missing_eos_penalty)
    if score_clip is not None:
        out = out.clamp(-score_clip, score_clip)
    return out


def ensemble_reward(scores: torch.Tensor, reduction: str = "mean", std_coef: float = 1.0,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One conservative reward from K reward models (Coste et al. 2023), and their disagreement.

    ``scores`` is ``[K, B]``: member k's score of sequence b, each member already on a
    common scale (standardised by its own held-out mean and std, see the trainer). With
    mean_b = (1/K) sum_k s_kb and std_b = sqrt((1/K) sum_k (s_kb - mean_b)^2):

        "mean"            r_b = mean_b
        "min"             r_b = min_k s_kb                 (worst-case optimisation)
        "mean_minus_std"  r_b = mean_b - std_coef * std_b  (uncertainty-weighted)

    Returns ``(r, std)``, both ``[B]``; ``std`` (population std, 0 for one member) is the
    disagreement, an over-optimisation signal that needs no gold: it grows where the
    policy's samples leave the region the reward models agree on.
    """
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be [K, B] with K >= 1, got shape {tuple(scores.shape)}")
    mean = scores.mean(0)
    std = scores.std(0, unbiased=False)
    if reduction == "mean":
        return mean, std
    if reduction == "min":
        return scores.min(0).values, std
    if reduction == "mean_minus_std":
        return mean - std_coef * std, std
    raise ValueError(f"unknown ensemble reduction {reduction!r}; expected one of {ENSEMBLE_REDUCTIONS}")


class FixedKLController:
    """A constant KL coefficient β (``value``); ``update`` changes nothing."""

    def __init__(self, kl_coef: float):
        kl_coef = float(kl_coef)
        if not math.isfinite(kl_coef) or kl_coef < 0:
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns ``value``."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        """``{"value": β}`` (plain floats, JSON-serialisable)."""
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict`; wrong or missing keys raise ``ValueError``."""
        _check_keys(state, {"value"}, type(self).__name__)
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(kl_coef={self.value})"


class AdaptiveKLController:
    """Adaptive KL coefficient β of Ziegler et al. 2019 (§2.2), as in their code and TRL.

    After each PPO batch, with KL the measured KL (per sequence) and n = ``n_steps``:
        e      = clip(KL / target − 1, −0.2, 0.2)     (proportional error)
        β     ←  β · (1 + e · n / horizon)

    so β grows while the KL is above ``target`` and shrinks while it is below, by at most
    a factor 1 ± 0.2·n/horizon per update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        init_kl_coef, target, horizon = float(init_kl_coef), float(target), float(horizon)
        if not math.isfinite(init_kl_coef) or init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be a finite number >= 0, got {init_kl_coef}")
        if not math.isfinite(target) or target <= 0:
            raise ValueError(f"target must be a finite number > 0, got {target}")
        if not math.isfinite(horizon) or horizon <= 0:
            raise ValueError(f"horizon must be a finite number > 0, got {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one update (see the class docstring) and return the new ``value``.

        ``current_kl`` may be a float or a 0-d tensor; a NaN/inf KL raises ``ValueError``
        rather than silently turning β into NaN.
        """
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value

    def state_dict(self) -> dict[str, float]:
        """``{"value", "target", "horizon"}`` as plain floats (JSON-serialisable)."""
        return {"value": float(self.value), "target": float(self.target), "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore all three fields from :meth:`state_dict`; wrong keys raise ``ValueError``."""
        _check_keys(state, {"value", "target", "horizon"}, type(self).__name__)
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


def _check_keys(state: dict, expected: set[str], who: str) -> None:
    keys = set(state)
    if keys != expected:
        raise ValueError(
            f"{who}.load_state_dict: expected keys {sorted(expected)}, got {sorted(keys)}"
        )


# --------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------
def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), to minimise.

    ρ_t = exp(logprobs_t − old_logprobs_t)
    L   = masked_mean( max(−Â_t ρ_t, −Â_t clip(ρ_t, 1−ε, 1+ε)) )    (= −L^CLIP)
    clipfrac = masked_mean( 1[−Â_t clip(ρ_t, 1−ε, 1+ε) > −Â_t ρ_t] )   (strict)

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy
            (with gradients).
        old_logprobs: ``[B, T]`` the same under the rollout policy (constants).
        advantages: ``[B, T]`` Â_t (constants, usually whitened).
        mask: ``[B, T]`` response mask.
        clip_range: ε ≥ 0.

    Returns:
        ``(loss, clipfrac)``: scalar loss (global token mean) and the detached fraction of
        unmasked tokens where the clipped term is active.
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    m = _as_bool_mask(logprobs, mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Garbage out *before* exp, so no inf/NaN reaches the graph (gradients stay finite).
    log_ratio = torch.where(m, logprobs - old_logprobs, zero)
    adv = torch.where(m, advantages.to(logprobs.dtype), zero)
    ratio = torch.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), m)
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).to(logprobs.dtype), m)
    return loss, clipfrac


def sequence_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    length_normalise: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate with one ratio per response (``importance_sampling_level="sequence"``).

    log ρ_i = Σ_t m_it (logprobs_it − old_logprobs_it) / D_i
              D_i = 1:   ρ_i = π(y_i|x) / π_old(y_i|x), the whole response as one action
                         (TRL's RLOOTrainer; Ahmadian et al. 2024)
              D_i = n_i: the per-token geometric mean of the ratios, n_i = Σ_t m_it
                         (GSPO, Zheng et al. 2025; TRL's GRPOTrainer) — ``length_normalise``
    ℓ_i     = max(−A_i ρ_i, −A_i clip(ρ_i, 1−ε, 1+ε))
    clipped_i = 1[−A_i clip(ρ_i, 1−ε, 1+ε) > −A_i ρ_i]   (strict)

    The caller averages ℓ over the responses of a minibatch: every response weighs the same,
    whatever its length, and with D_i = 1 its gradient sums (not averages) over its tokens.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (with gradients).
        old_logprobs: ``[B, T]`` the same under the rollout policy (constants).
        advantages: ``[B]`` A_i, one per response.
        mask: ``[B, T]`` response mask (every response at least one token).
        clip_range: ε ≥ 0.

    Returns:
        ``(losses, clipped)``: ``[B]`` per-response losses and ``[B]`` detached 0/1 clip indicators.
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    m = _as_bool_mask(logprobs, mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs - old_logprobs, zero).sum(1)
    if length_normalise:
        log_ratio = log_ratio / m.sum(1).clamp(min=1).to(logprobs.dtype)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logprobs.dtype)
    losses = -adv * ratio
    losses_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    with torch.no_grad():
        clipped = (losses_clipped > losses).to(logprobs.dtype)
    return torch.max(losses, losses_clipped), clipped


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's ``approxkl`` metric: masked_mean(½ (logprobs − old_logprobs)²), a scalar.

    The k2 estimator of KL(π_old ‖ π) over the minibatch (Schulman 2020); ≥ 0.
    Shapes ``[B, T]``. Not detached (call ``.item()`` for logging).
    """
    m = _as_bool_mask(logprobs, mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    diff = torch.where(m, logprobs - old_logprobs, zero)
    return masked_mean(0.5 * diff.square(), m)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (OpenAI baselines ppo2 / Ziegler et al. 2019 / TRL).

    V_clip = V_old + clip(V − V_old, −ε, +ε)
    L_V    = ½ · masked_mean( max((V − R)², (V_clip − R)²) )
    clipfrac = masked_mean( 1[(V_clip − R)² > (V − R)²] )   (strict)

    Args:
        values: ``[B, T]`` current value predictions V (with gradients).
        old_values: ``[B, T]`` value predictions of the rollout (constants).
        returns: ``[B, T]`` targets R from :func:`compute_gae`.
        mask: ``[B, T]`` response mask.
        clip_range: ε ≥ 0 (TRL's ``cliprange_value``).

    Returns:
        ``(loss, clipfrac)``: scalar loss and the detached clipped fraction.
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    m = _as_bool_mask(values, mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(m, values, zero)
    v_old = torch.where(m, old_values.to(values.dtype), zero)
    ret = torch.where(m, returns.to(values.dtype), zero)
    # = V_old + clip(V - V_old, -ε, ε), but V itself (bit for bit) inside the band, so that
    # rounding cannot count an unclipped token as clipped (the gradient is the same)
    v_clipped = torch.clamp(v, v_old - clip_range, v_old + clip_range)
    vf_losses = (v - ret).square()
    vf_losses_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), m)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), m)
    return loss, clipfrac


# --------------------------------------------------------------------------------------
# logits -> log-probs, entropy
# --------------------------------------------------------------------------------------
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / bfloat16 logits (their log-sum-exp is too coarse), else unchanged."""
    return torch.promote_types(dtype, torch.float32)


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under softmax(logits / temperature).

    log π(y_t) = z_t[y_t]/τ − logsumexp_v(z_t[v]/τ)

    Args:
        logits: ``[B, T, V]`` (the logits that *predict* each token, i.e. already shifted).
        tokens: ``[B, T]`` integer ids; padding positions must hold a valid id (e.g. the
            pad id); their results are meaningless and are to be masked by the caller.
        temperature: τ > 0, the sampling temperature (TRL divides logits by it too).

    Returns:
        ``[B, T]``, in ``logits.dtype`` promoted to at least float32.

    Memory-lean: no ``[B, T, V]`` log_softmax is materialised. The token's logit is taken
    with ``gather`` and the log-sum-exp is computed one batch row at a time, so the extra
    memory is one ``[T, V]`` row (the scaled / upcast copy), as in TRL's
    ``selective_log_softmax``. Half-precision logits are upcast to float32 per row.
    """
    temperature = _check_temperature(temperature)
    if logits.dim() != 3 or tokens.shape != logits.shape[:-1]:
        raise ValueError(f"expected logits [B,T,V] and tokens [B,T], got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    work = _work_dtype(logits.dtype)
    index = tokens.long().unsqueeze(-1)
    rows = []
    for row_logits, row_index in zip(logits, index):  # row: [T, V]
        row = row_logits.to(work)
        if temperature != 1.0:
            row = row / temperature
        picked = row.gather(-1, row_index).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    if not rows:
        return logits.new_zeros(tokens.shape, dtype=work)
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position.

    H_t = −Σ_v p_t(v) log p_t(v),   p_t = softmax(z_t / τ);   0 ≤ H_t ≤ log V.

    Args:
        logits: ``[B, T, V]``. ``-inf`` logits (banned tokens) are fine: their 0·log 0
            terms count as 0, in the value and in the gradient.
        temperature: τ > 0.

    Returns:
        ``[B, T]`` (≥ 0), in ``logits.dtype`` promoted to at least float32. Computed one
        batch row at a time. Mask it before averaging (:func:`masked_mean`).
    """
    temperature = _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"expected logits [B,T,V], got {tuple(logits.shape)}")
    work = _work_dtype(logits.dtype)
    rows = []
    for row_logits in logits:  # [T, V]
        row = row_logits.to(work)
        if temperature != 1.0:
            row = row / temperature
        logp = torch.log_softmax(row, dim=-1)
        p = logp.exp()
        safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=work, device=row.device))
        rows.append((-(p * safe_logp).sum(-1)).clamp(min=0.0))
    if not rows:
        return logits.new_zeros(logits.shape[:-1], dtype=work)
    return torch.stack(rows)


# --------------------------------------------------------------------------------------
# stop tokens
# --------------------------------------------------------------------------------------
def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first ``True`` along the last dimension, or its length if there is none.

    Args:
        bools: ``[..., T]`` bool tensor (e.g. ``tokens == eos_id``).

    Returns:
        ``[...]`` long tensor with values in ``[0, T]`` (TRL's ``first_true_indices``).
    """
    T = bools.size(-1)
    if T == 0:
        return torch.zeros(bools.shape[:-1], dtype=torch.long, device=bools.device)
    positions = torch.arange(T, device=bools.device)
    # T where False, the position where True; the row minimum is the first True (or T).
    candidates = torch.where(bools.bool(), positions, torch.full_like(positions, T))
    return candidates.min(dim=-1).values


def mask_after_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Response mask that keeps each row up to and including its first EOS.

    mask[b, t] = 1 if t ≤ first index of ``eos_id`` in row b (all ones without an EOS).

    Args:
        tokens: ``[B, T]`` generated response token ids.
        eos_id: the stop token id.

    Returns:
        ``[B, T]`` **bool** mask whose ones are a prefix of each row (``.long()`` it for an
        ``attention_mask``). Everything after the first EOS is padding to be ignored.
    """
    first = first_true_indices(tokens == eos_id)  # [B], T if no EOS
    positions = torch.arange(tokens.size(-1), device=tokens.device)
    return positions <= first.unsqueeze(-1)
