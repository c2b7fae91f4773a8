"""``adamw bench``: time one optimizer step of each implementation on named workloads.

``workloads`` says what is measured (parameter shapes, implementations, the GPT-2 shape table),
``timing`` how, ``report`` prints it, ``floor`` (with ``floor.c``) is the memory-floor row, and
``command`` is the command line. Nothing here is imported by ``import adamw``.
"""
