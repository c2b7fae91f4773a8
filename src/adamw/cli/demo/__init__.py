"""``adamw demo``: train one small model with torch.optim.AdamW and with each low-bit mode, and compare.

``model`` holds the character-level transformer and the text it learns (``data/shakespeare.txt``,
shipped as package data), ``train`` the modes, the training and the checks, ``report`` the table
and the loss plot, and ``command`` the command line.
"""
