"""A small synthetic sequential task for training tests: next item = perm[previous] with prob 0.9.

A most-popular baseline cannot exploit the order; a sequential model can.
"""
import torch


def markov_sequences(n_users=300, n_items=40, length=12, follow=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_items, generator=g)
    seqs = torch.empty(n_users, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(n_items, (n_users,), generator=g)
    for t in range(1, length):
        jump = torch.rand(n_users, generator=g) > follow
        seqs[:, t] = torch.where(jump, torch.randint(n_items, (n_users,), generator=g), perm[seqs[:, t - 1]])
    return seqs


def next_item_samples(seqs, min_len=1):
    """Every prefix -> next item, right-padded: (histories (S, T), lengths (S,), targets (S,))."""
    n, T = seqs.shape
    hist, lens, targets = [], [], []
    for end in range(min_len, T):
        h = torch.zeros(n, T - 1, dtype=torch.long)
        h[:, :end] = seqs[:, :end]
        hist.append(h)
        lens.append(torch.full((n,), end))
        targets.append(seqs[:, end])
    return torch.cat(hist), torch.cat(lens), torch.cat(targets)


def write_log(path, n_users=50, n_items=12, length=8, seed=0, late_user=False):
    """A Markov-chain interaction log as CSV (user_id, item_id, rating 4 or 5, timestamp): user u's t-th
    event at time t*1000+u. ``late_user`` adds a user whose only interaction (with an item nobody else
    has) comes after the training period. Returns the path as a string."""
    seqs = markov_sequences(n_users=n_users, n_items=n_items, length=length, seed=seed)
    with open(path, "w") as f:
        f.write("user_id,item_id,rating,timestamp\n")
        for u, row in enumerate(seqs.tolist()):
            for t, item in enumerate(row):
                f.write(f"u{u},i{item},{4 + (u + t) % 2},{t * 1000 + u}\n")
        if late_user:
            f.write(f"late,fresh,5,{length * 1000}\n")
    return str(path)
