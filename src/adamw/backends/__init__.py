"""One module per backend; each exposes ``step(params, grads, exp_avgs, ..., **hyper)``.

Every backend receives the same arguments (see :class:`adamw.functional.StepArgs`), so the dispatch in
:mod:`adamw.functional` is a lookup, not a chain of flags.
"""
