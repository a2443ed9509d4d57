"""Meta-learning: settings (``config``), the one entry point (``learner.MetaLearner``), its backends
(``fast``, ``vmap``, ``reference``) and the LightningModule (``module``)."""
