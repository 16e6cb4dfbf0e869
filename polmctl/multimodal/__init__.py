"""Vision-language models (LLaVA-style): a vision encoder and a projector in front of a causal LM.

    polmctl run recipe=vlm_adapter

model.py builds / loads the model, data.py turns picture-question rows into batches,
evaluate.py scores answers; polmctl/methods/vlm.py is the ``method`` node and the training step,
polmctl/runners/vlm.py runs it.
"""
