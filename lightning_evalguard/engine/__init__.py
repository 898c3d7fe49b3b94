"""The engine: everything that does the work, with no import of Lightning.

Callbacks in :mod:`lightning_evalguard.callbacks` translate Lightning hooks into calls on these
objects, so every hard part here can be tested without a Trainer. Modules import ``torch`` only
where a tensor is touched.
"""
