"""Training objectives, all full-softmax cross entropy over every row of the item table (but cold
items, ``config.cold_items``: they have no interactions to learn from).

states: (B, K+1, d) reasoning states r_0..r_K; items: (N, d) the item table; targets: (B,) ids.

- base: CE of r_0 (plain SASRec).
- ERL (ensemble): CE of mean_s r_s, MINUS kl_weight × the mean over ordered pairs i ≠ j of
  KL(p_j ‖ stopgrad(p_i)), p_s = softmax(r_s · Eᵀ / τ): the term pushes the steps apart. It is
  unbounded, so ERL can diverge; the trainer watches for that.
- BERT4Rec backbone: RecBole's cloze loss (:func:`cloze_loss`) is its base objective; ERL and PRL
  add their terms on the next-item states (history + mask token), as for SASRec.
- PRL (progressive): CE(r_K / τ) + pl_weight × mean over s < K of CE at temperature τ·α^(K−s)
  + cl_weight × InfoNCE between a noisy copy's states and the clean states of the batch, steps 1..K.

``fused_ce=True`` (the default) computes every cross-entropy over the item table, and ERL's KL term,
with :mod:`rearec_kernels.linear_cross_entropy`: one cache-sized chunk of logits at a time (a small
table is one chunk), so memory no longer grows with B × N; ``bench/test_ce_bench.py`` times it
against the dense path. ``fused_ce=False`` is the plain PyTorch formulation
(``F.cross_entropy(states @ Eᵀ / τ)``); both give the same loss and gradients up to float rounding.
The InfoNCE term compares B states with B states and stays dense.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rearec.distributed import gather_rows, sum_across
from rearec_kernels.linear_cross_entropy import fused_linear_cross_entropy, fused_mean_pairwise_kl


def _logits(states: torch.Tensor, items: torch.Tensor, temperature) -> torch.Tensor:
    return states @ items.T / temperature


def item_cross_entropy(hidden, items, targets, temperature, fused_ce=True):
    """Mean CE of ``hidden @ items.T / temperature`` (hidden (B, d)) against targets (B,)."""
    if fused_ce:
        return fused_linear_cross_entropy(hidden, items, targets, scale=1.0 / temperature)
    return F.cross_entropy(_logits(hidden, items, temperature), targets)


def base_loss(states, items, targets, temperature, fused_ce=True):
    return item_cross_entropy(states[:, 0], items, targets, temperature, fused_ce)


def erl_loss(states, items, targets, temperature, kl_weight, fused_ce=True):
    ensemble = item_cross_entropy(states.mean(dim=1), items, targets, temperature, fused_ce)
    steps = states.shape[1]
    if steps < 2 or kl_weight == 0:
        return ensemble
    if fused_ce:
        return ensemble - kl_weight * fused_mean_pairwise_kl(states, items, scale=1.0 / temperature)
    # The KL in float32 under bf16 autocast too, as the fused path computes it: CPU autocast leaves
    # log_softmax of bf16 logits in bf16 and runs the cross product in bf16, errors of ~2^-8 of terms of
    # several nats, the size of the KL between close steps. Only the logits' product is bf16.
    logits = _logits(states, items, temperature)  # (B, S, N)
    with torch.autocast(states.device.type, enabled=False):
        log_p = F.log_softmax(logits.float(), dim=-1)
        p = log_p.exp()
        # KL(p_j ‖ sg(p_i)) = Σ p_j log p_j − Σ p_j log sg(p_i), for all (j, i) at once.
        neg_entropy = (p * log_p).sum(-1)  # (B, S): index j
        cross = p @ log_p.detach().transpose(1, 2)  # (B, S_j, S_i)
    kl = neg_entropy[:, :, None] - cross
    off_diagonal = ~torch.eye(steps, dtype=torch.bool, device=states.device)
    return ensemble - kl_weight * kl[:, off_diagonal].mean()


def prl_loss(states, items, targets, temperature, temp_scale, pl_weight, cl_weight, noisy_states=None,
             fused_ce=True, **contrastive_options):
    K = states.shape[1] - 1
    loss = item_cross_entropy(states[:, K], items, targets, temperature, fused_ce)
    if K > 0 and pl_weight > 0:
        # Earlier steps see softer targets: step s < K at temperature τ·α^(K−s).
        scale = temp_scale ** torch.arange(K, 0, -1, device=states.device, dtype=states.dtype)
        step_targets = targets.repeat_interleave(K)
        if fused_ce:  # one call for all K steps: each step's temperature folded into its states
            tempered = (states[:, :K] / (temperature * scale)[None, :, None]).flatten(0, 1)  # (B·K, d)
            loss = loss + pl_weight * fused_linear_cross_entropy(tempered, items, step_targets)
        else:
            logits = _logits(states[:, :K], items, 1.0) / (temperature * scale)[None, :, None]  # (B, K, N)
            loss = loss + pl_weight * F.cross_entropy(logits.flatten(0, 1), step_targets)
    if noisy_states is not None and K > 0 and cl_weight > 0:
        # The noisy states come without the scoring view's extra column (BERT4Rec's bias entry, a
        # constant): the clean ones are cut to their width, so that the cosine option normalises the
        # states alone (the dot product only shifts by a constant there, which InfoNCE ignores).
        clean = states[..., :noisy_states.shape[-1]]
        loss = loss + cl_weight * contrastive_loss(clean, noisy_states, temperature, **contrastive_options)
    return loss


def contrastive_loss(states, noisy_states, temperature, cosine=False, users=None, cl_temperature=None):
    """InfoNCE over steps 1..K: the noisy state of user b should match the clean state of user b among
    the clean states of the whole batch at that step.

    Under DDP "the whole batch" is the global batch: the clean states of every rank are gathered with
    gradients (:func:`rearec.distributed.gather_rows`), so each rank's rows see the same negatives as
    in one process and the negatives' gradients return to the ranks that own them."""
    clean, noisy = states[:, 1:], noisy_states[:, 1:]  # (B_r, K, d): this rank's rows
    if cl_temperature is not None:  # study option: the InfoNCE's own temperature
        temperature = cl_temperature
    if cosine:  # study option (config cl_similarity="cosine"): cosine similarity instead of the dot product
        clean, noisy = F.normalize(clean, dim=-1), F.normalize(noisy, dim=-1)
    clean_all, first = gather_rows(clean)  # (B, K, d): every rank's rows; ours start at `first`
    similarity = torch.einsum("bkd,ckd->kbc", noisy, clean_all) / temperature  # (K, B_r, B)
    target = (torch.arange(states.shape[0], device=states.device) + first).repeat(states.shape[1] - 1)
    if users is not None:  # study option (cl_mask_same_user): the user's other samples are no negatives
        if clean_all.shape[0] != clean.shape[0]:
            raise ValueError("cl_mask_same_user runs in one process only; train without torchrun")
        same = (users[:, None] == users[None, :]) & ~torch.eye(len(users), dtype=torch.bool, device=users.device)
        similarity = similarity.masked_fill(same[None], float("-inf"))
    return F.cross_entropy(similarity.flatten(0, 1), target)


def contrastive_active(config, epoch: int) -> bool:
    """PRL's contrastive term runs once ``warmup_epochs`` epochs (0-based count) have passed."""
    return (
        config.objective == "prl"
        and config.cl_weight > 0
        and config.noise_std > 0
        and config.reason_steps > 0
        and epoch >= config.warmup_epochs
    )


def training_loss(model, histories, lengths, targets, epoch: int = 0, fused_ce: bool = True,
                  users=None) -> torch.Tensor:
    """The configured objective for one batch (runs the model, with PRL's noisy copy when active);
    ``users`` (B,): each sample's user, for ``cl_mask_same_user``."""
    cfg = model.config
    if cfg.backbone == "bert4rec" and cfg.objective == "base":
        return cloze_loss(model, histories, lengths, targets, fused_ce=fused_ce)
    noisy: Optional[torch.Tensor] = None
    if contrastive_active(cfg, epoch):
        states, noisy = model.forward_with_noisy_copy(histories, lengths, cfg.noise_std)
    else:
        states = model(histories, lengths)
    states, items = model.scoring_view(states)  # the item table; BERT4Rec's output bias as one more column
    items = items[:cfg.trained_items]  # cold items (no interactions) are no negatives: config.cold_items
    loss = objective_loss(cfg, states, items, targets, noisy, users, fused_ce=fused_ce)
    if cfg.backbone == "bert4rec":
        loss = loss + cloze_loss(model, histories, lengths, targets, fused_ce=fused_ce)
    return loss


def objective_loss(cfg, states, items, targets, noisy_states=None, users=None,
                   fused_ce: bool = True) -> torch.Tensor:
    """The configured objective on given states (what the golden parity test checks)."""
    if cfg.objective == "base":
        return base_loss(states, items, targets, cfg.temperature, fused_ce)
    if cfg.objective == "erl":
        return erl_loss(states, items, targets, cfg.temperature, cfg.kl_weight, fused_ce)
    if cfg.cl_mask_same_user and noisy_states is not None and users is None:
        raise ValueError("cl_mask_same_user needs each sample's user: pass users to training_loss")
    return prl_loss(
        states, items, targets, cfg.temperature, cfg.temp_scale, cfg.pl_weight, cfg.cl_weight, noisy_states,
        fused_ce=fused_ce, cosine=cfg.cl_similarity == "cosine", users=users if cfg.cl_mask_same_user else None,
        cl_temperature=cfg.cl_temperature,
    )


def cloze_loss(model, histories, lengths, targets, generator: Optional[torch.Generator] = None,
               fused_ce: bool = True) -> torch.Tensor:
    """BERT4Rec's cloze objective, after RecBole's, on each history followed by its target.

    Each sequence (the newest ``max_len`` items of history + target) has every item replaced by the
    mask token with probability ``mask_ratio``; a row where none was drawn masks its newest item (the
    next-item task). Cross entropy over the whole item table (at temperature τ), at every masked slot.
    Where RecBole differs (it masks the history only, skips rows without a mask, keeps the newest
    ``int(mask_ratio * max_len)`` masked slots, and scores at τ = 1): README, Backbones.
    """
    cfg = model.config
    B, L = histories.shape
    sequences = torch.cat([histories, histories.new_zeros(B, 1)], dim=1)
    sequences[torch.arange(B, device=histories.device), lengths] = targets
    lengths = lengths + 1
    if L + 1 > cfg.max_len:  # keep the newest max_len items: shift the rows that overflow
        start = (lengths - cfg.max_len).clamp(min=0)
        columns = (start[:, None] + torch.arange(cfg.max_len, device=histories.device)).clamp(max=L)
        sequences, lengths = sequences.gather(1, columns), lengths.clamp(max=cfg.max_len)
    slots = torch.arange(sequences.shape[1], device=histories.device)[None, :]
    valid = slots < lengths[:, None]
    masked = valid & (cloze_draws(sequences, generator) < cfg.mask_ratio)
    masked |= (slots == (lengths - 1)[:, None]) & ~masked.any(dim=1, keepdim=True)
    queries, items = model.scoring_view(model.masked_item_states(sequences, lengths, masked))
    items = items[:cfg.trained_items]  # without the cold items (config.cold_items)
    loss = item_cross_entropy(queries, items, sequences[masked], cfg.temperature, fused_ce)
    # Under DDP the Trainer weighs each rank's loss by its share of the batch's ROWS; this mean is over
    # the rank's masked SLOTS, whose share can differ. Reweighted so that the ranks' contributions add
    # up to the mean over every masked slot of the global batch (one process: a factor of 1).
    mine_masked, mine_rows = float(masked.sum()), float(B)
    all_masked, all_rows = sum_across([mine_masked, mine_rows])
    return loss * (mine_masked * all_rows / (all_masked * mine_rows))


def cloze_draws(sequences: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One uniform [0, 1) draw per slot of ``sequences`` (B, L); a slot whose draw is below
    ``mask_ratio`` is masked. (Its own function so that a test can make the draws per sample.)"""
    return torch.rand(sequences.shape, device=sequences.device, generator=generator)
