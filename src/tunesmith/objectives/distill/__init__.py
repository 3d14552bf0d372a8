"""Knowledge distillation: a saved tunesmith checkpoint teaches the model being trained.

``settings``: the ``distill`` section; ``student``: a student made of some of the
teacher's layers; ``teacher``: teacher logits (precomputed and cached, or live)
and the distillation term of the training objective.
"""
