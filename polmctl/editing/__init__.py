"""Knowledge editing (recipe=edit): rewrite a fact a model stores, in its weights, without training.

    polmctl run recipe=edit                                  # ROME on builtin facts the model knows
    polmctl run recipe=edit method.algorithm=memit method.max_requests=10
    polmctl run recipe=edit method.requests=my_edits.jsonl method.layer=6

  requests  edit requests ({subject, prompt with {}, target_new, ...}): validation, loading
            (builtin:counterfacts, files, hub datasets) and the subject's last token in a prompt
  facts     builtin:counterfacts, counterfactual requests about real facts, and the check that keeps
            the ones the model answers before the edit
  hooks     reading and changing one module's input or output at chosen token positions
  trace     causal tracing: the layer whose hidden state at the subject carries the fact
  memory    the MLP as a key-value memory: context prefixes, the keys' second moment C, the
            subject's key, the optimised value (what ROME and MEMIT share)
  rome      ROME (Meng et al. 2022): the rank-one update of one layer
  memit     MEMIT (Meng et al. 2023): a batch of edits spread over several layers
  evaluate  efficacy, generalisation, specificity (the editing literature's measures)

Written from the papers; the reference code (github.com/kmeng01/rome and kmeng01/memit) was read
to match its choices (context prefixes, the KL prompt, the norm clamp), not copied.
"""
