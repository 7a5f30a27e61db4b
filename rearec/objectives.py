"""Training objectives, all full-softmax cross entropy over every row of the item table.

states: (B, K+1, d) reasoning states r_0..r_K; items: (N, d) the item table; targets: (B,) ids.

- base: CE of r_0 (plain SASRec).
- ERL (ensemble): CE of mean_s r_s, MINUS kl_weight × the mean over ordered pairs i ≠ j of
  KL(p_j ‖ stopgrad(p_i)), p_s = softmax(r_s · Eᵀ / τ): the term pushes the steps apart. It is
  unbounded, so ERL can diverge; the trainer watches for that.
- PRL (progressive): CE(r_K / τ) + pl_weight × mean over s < K of CE at temperature τ·α^(K−s)
  + cl_weight × InfoNCE between a noisy copy's states and the clean states of the batch, steps 1..K.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rearec.distributed import gather_rows


def _logits(states: torch.Tensor, items: torch.Tensor, temperature) -> torch.Tensor:
    return states @ items.T / temperature


def base_loss(states, items, targets, temperature):
    return F.cross_entropy(_logits(states[:, 0], items, temperature), targets)


def erl_loss(states, items, targets, temperature, kl_weight):
    ensemble = F.cross_entropy(_logits(states.mean(dim=1), items, temperature), targets)
    steps = states.shape[1]
    if steps < 2 or kl_weight == 0:
        return ensemble
    log_p = F.log_softmax(_logits(states, items, temperature), dim=-1)  # (B, S, N)
    p = log_p.exp()
    # KL(p_j ‖ sg(p_i)) = Σ p_j log p_j − Σ p_j log sg(p_i), for all (j, i) at once.
    neg_entropy = (p * log_p).sum(-1)  # (B, S): index j
    cross = p @ log_p.detach().transpose(1, 2)  # (B, S_j, S_i)
    kl = neg_entropy[:, :, None] - cross
    off_diagonal = ~torch.eye(steps, dtype=torch.bool, device=states.device)
    return ensemble - kl_weight * kl[:, off_diagonal].mean()


def prl_loss(states, items, targets, temperature, temp_scale, pl_weight, cl_weight, noisy_states=None,
             **contrastive_options):
    K = states.shape[1] - 1
    loss = F.cross_entropy(_logits(states[:, K], items, temperature), targets)
    if K > 0 and pl_weight > 0:
        # Earlier steps see softer targets: step s < K at temperature τ·α^(K−s).
        scale = temp_scale ** torch.arange(K, 0, -1, device=states.device, dtype=states.dtype)
        logits = _logits(states[:, :K], items, 1.0) / (temperature * scale)[None, :, None]  # (B, K, N)
        loss = loss + pl_weight * F.cross_entropy(logits.flatten(0, 1), targets.repeat_interleave(K))
    if noisy_states is not None and K > 0 and cl_weight > 0:
        loss = loss + cl_weight * contrastive_loss(states, noisy_states, temperature, **contrastive_options)
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


def training_loss(model, histories, lengths, targets, epoch: int = 0, users=None) -> torch.Tensor:
    """The configured objective for one batch (runs the model, with PRL's noisy copy when active);
    ``users`` (B,): each sample's user, for ``cl_mask_same_user``."""
    cfg = model.config
    items = model.item_embedding.weight
    noisy: Optional[torch.Tensor] = None
    if contrastive_active(cfg, epoch):
        states, noisy = model.forward_with_noisy_copy(histories, lengths, cfg.noise_std)
    else:
        states = model(histories, lengths)
    return objective_loss(cfg, states, items, targets, noisy, users)


def objective_loss(cfg, states, items, targets, noisy_states=None, users=None) -> torch.Tensor:
    """The configured objective on given states (what the golden parity test checks)."""
    if cfg.objective == "base":
        return base_loss(states, items, targets, cfg.temperature)
    if cfg.objective == "erl":
        return erl_loss(states, items, targets, cfg.temperature, cfg.kl_weight)
    if cfg.cl_mask_same_user and noisy_states is not None and users is None:
        raise ValueError("cl_mask_same_user needs each sample's user: pass users to training_loss")
    return prl_loss(
        states, items, targets, cfg.temperature, cfg.temp_scale, cfg.pl_weight, cfg.cl_weight, noisy_states,
        cosine=cfg.cl_similarity == "cosine", users=users if cfg.cl_mask_same_user else None,
        cl_temperature=cfg.cl_temperature,
    )
