"""Testbed: a synthetic, seeded stand-in for "CLIP + CIFAR" that trains on 2 CPU cores.

- ``shapes``: the object kinds as signed-distance silhouettes, rasterized into an atlas.
- ``render``: batched rendering of scenes (object, occluder, textured background).
- ``world``: seeded scenes, captions and image-caption batches (``generate``).
- ``tasks``: the zero-shot tasks ``object10`` / ``object_color100`` and ``generic_prompts``.
- ``train``: contrastive training of the built-in tiny CLIPs (``python -m ...train``).

Nothing is imported here, so ``python -m d4c_core.testbed.train`` loads torch only once the
caller's environment (e.g. ``OMP_WAIT_POLICY``) is in place.
"""
