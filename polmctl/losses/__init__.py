"""The maths of every method: pure functions of tensors, checked against the papers' formulas.

    preference        DPO and its variants, SimPO, CPO, ORPO, KTO
    reward            Bradley-Terry (reward modelling)
    process           a label per reasoning step (process reward models)
    policy_gradient   advantages, clipped policy losses, KL estimators, GAE, the value loss
    distill           KL / generalised JSD between a student's and a teacher's distributions
    sft               token negative log-likelihood

Nothing here imports polmctl or calls a model: a method in polmctl/methods/ runs the model and
hands these functions log-probs, logits or scores. Each function is tested on hand-computed inputs
(tests/losses/) and, where TRL implements the same loss, against TRL's numbers.
"""

IGNORE_INDEX = -100  # the label of a token no loss trains on (PyTorch's cross_entropy default)
