"""Small synthetic data and tiny networks for the prior tests (no phantom generator needed)."""

import numpy as np

TINY_ARCH = {"channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
             "norm_num_groups": 4, "use_mr": True, "slab": 3}


def blobs(shape, seed=0, n=4):
    """A positive 'brain-like' volume (sum of Gaussian blobs on a low background) and a matching 'MR'."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    pet = np.zeros(shape, np.float32)
    mr = np.zeros(shape, np.float32)
    cz, cy, cx = (np.array(shape) - 1) / 2
    head = ((z - cz) / (shape[0] / 1.8)) ** 2 + ((y - cy) / (shape[1] / 2.6)) ** 2 + ((x - cx) / (shape[2] / 2.6)) ** 2 < 1
    pet[head] = 1.0
    mr[head] = 0.6
    for _ in range(n):
        c = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        r = rng.uniform(1.5, 3.0)
        g = np.exp(-(((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * r * r)))
        pet += 4.0 * g.astype(np.float32) * head
        mr -= 0.3 * g.astype(np.float32) * head
    return pet, np.clip(mr, 0, None)
