"""One module per method family: its ``method`` schema (a help string per field), its data adapter
(encode / collate), its training step (calling polmctl/losses/), its hooks (reference, extra heads,
the batch source of an online method), and a docstring with the command that runs it.
``registry.METHODS`` is the one table from a method's name to all of that and its runner."""
