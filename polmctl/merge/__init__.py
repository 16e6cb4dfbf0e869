"""Model merging (``recipe=merge``): linear, task arithmetic, TIES, DARE and SLERP over full
models and LoRA adapters on a common base, streamed one tensor at a time.

    polmctl run recipe=merge "method.models=[<run dir A>,<run dir B>]" method.merge=ties

sources.py  lazy per-tensor readers: full model dirs, LoRA adapter dirs, run dirs
methods.py  the per-tensor merge functions (peft's merge_utils, plus SLERP); the method node is
            polmctl/methods/merge.py
write.py    safetensors shards written as tensors are merged
merge.py    checks that the inputs fit together, then merges them into a model dir
"""
