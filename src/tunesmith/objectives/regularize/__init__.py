"""Regularisation and anti-forgetting: dropout overrides, L2-SP, EWC, replay, forgetting report.

``settings``: the ``regularize`` and ``forgetting`` sections; ``dropout``:
dropout overrides at load time; ``penalties``: L2-SP and EWC as regularisers
of the training objective; ``fisher``: the diagonal Fisher estimate;
``replay``: the sampler mixing reference examples into training; ``reference``:
loading the reference model and data, and the forgetting report.
"""
