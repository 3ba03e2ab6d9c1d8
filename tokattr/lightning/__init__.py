"""The Lightning layer: the benchmark runner (:mod:`~tokattr.lightning.runner`: a
``LightningModule`` and ``LightningDataModule`` over prompt sets, the results writer), the
training of the reference model (:mod:`~tokattr.lightning.train`) and the W&B logging
(:mod:`~tokattr.lightning.wandb_log`).

The only place besides :mod:`tokattr.cli` that imports ``lightning`` or ``wandb``; the core
(``tokattr`` itself) runs without them.
"""
