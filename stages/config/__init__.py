"""Config models of the stage kinds whose code needs torch, in modules that do not.

Validating a recipe (every ``baton`` command, before anything runs) needs each stage's config model;
importing the kind modules for it would import torch, torchvision and transformers (about 8 s here)
in a process that never trains. So these kinds keep their ``Config`` here, one module per kind (a
stage's code digest covers only its own config), and the kind module re-exports it: the stage
contract (``stages.<kind>.Config`` and ``run``) is unchanged. A new kind may simply define ``Config``
in its own module; listing it in ``stages.CONFIGS`` is only the fast path.
"""
